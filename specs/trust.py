"""The trust boundary: checkpoints and run directories are data, and nothing in them ever runs.

Two checks, each one clear `TrustError` naming the file, the reason and the fix:

- `check_checkpoint_is_data(path)`, before a model or tokenizer is loaded from a folder: Hugging
  Face runs code shipped inside a model directory when a config names it (`auto_map`,
  `custom_pipelines`) and the loader trusts remote code. ringpilot never trusts it, and refuses
  the folder outright, so no loader (ours, lm-eval's, a library's default) gets the chance to.
- `check_run_dir(path)`, before anything unpickles from a run directory: torch's DCP reader
  unpickles its `.metadata` file and byte items, so whoever can write those files runs code in
  the trainer. Only folders and files owned by this user (or root) and writable by no one else
  are read.

Torch-free and transformers-free (ground floor); see docs/security.md, "Trust boundary".
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from specs.checkpoint import CheckpointError, locate
from specs.errors import SpecError
from specs.files import read_bounded

# Files Python imports or executes. Hugging Face only imports `.py` files named by `auto_map`,
# but a model directory has no business holding any of these.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw")
# Keys through which a Hugging Face config points a loader at code of its own.
CODE_KEYS = ("auto_map", "custom_pipelines")
# A checkpoint is a few dozen files plus one DCP shard per rank; a tree this big is not one, and
# walking it must not take forever.
MAX_ENTRIES = 100_000


class TrustError(CheckpointError):
    """A checkpoint or run directory that would make ringpilot run code it did not ship."""


def _refuse(path: Path, problem: str, fix: str) -> TrustError:
    return TrustError(f"{path}: {problem}; ringpilot treats checkpoints and run directories as "
                      f"data and never runs code from them ({fix})")


def _walk(root: Path, *, follow: bool = False):
    """(path, is_dir) of every entry under `root`, into symlinked folders only if `follow`;
    bounded (a symlink loop ends at MAX_ENTRIES)."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=follow):
        for name in dirnames + filenames:
            n += 1
            if n > MAX_ENTRIES:
                raise _refuse(root, f"holds more than {MAX_ENTRIES:,} files and folders, which no "
                              "checkpoint does", "give the checkpoint folder itself")
            full = Path(dirpath) / name
            yield full, name in dirnames


def _is_config(name: str) -> bool:
    """A JSON file a Hugging Face loader reads as a config (config.json, tokenizer_config.json,
    generation_config.json, preprocessor_config.json, ...); tokenizer.json and weight indexes
    are not configs and can be large."""
    low = name.lower()
    return low.endswith(".json") and "config" in low


def _code_key(doc) -> tuple[str, str] | None:
    """(dotted place, key) of the first code-naming key in a JSON document, searched without
    recursion (a deeply nested document cannot exhaust the stack)."""
    todo = [("", doc)]
    while todo:
        where, node = todo.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                place = f"{where}.{key}" if where else str(key)
                if key in CODE_KEYS:
                    return _printable(place), key
                todo.append((place, value))
        elif isinstance(node, list):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(node))
    return None


def _printable(text: str, limit: int = 200) -> str:
    """`text` for a one-line message: control characters escaped, at most `limit` characters."""
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return out if len(out) <= limit else f"...{out[-limit:]}"


def check_checkpoint_is_data(path: str | Path) -> Path:
    """`path` (a checkpoint or model directory, or a file inside one: its folder is checked),
    refused with TrustError when it carries code: a Python file anywhere in it, or a config
    naming code (`auto_map`, `custom_pipelines`). Returns the folder checked."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    if folder is None:
        raise CheckpointError(f"{path}: does not exist; give a local checkpoint or model "
                              "directory (models are never fetched by name)")
    for entry, is_dir in _walk(folder):
        if not is_dir and entry.name.lower().endswith(CODE_SUFFIXES):
            raise _refuse(entry, "a Python file in a checkpoint (Hugging Face imports such "
                          "files when a config names them)",
                          "delete it, and any `auto_map` naming it, or load the model with "
                          "the code reviewed and installed as a package")
    for entry in sorted(folder.iterdir()):
        if not (entry.is_file() and _is_config(entry.name)):
            continue
        try:
            doc = json.loads(read_bounded(entry, "metadata"))
        except SpecError as e:
            raise _refuse(entry, "; ".join(e.lines), "restore the file Hugging Face "
                          "wrote") from None
        except (ValueError, RecursionError) as e:
            problem = _printable(str(e).splitlines()[0]) if str(e) else type(e).__name__
            raise _refuse(entry, f"not JSON a loader could read ({problem})",
                          "restore the file Hugging Face wrote (save_pretrained)") from None
        found = _code_key(doc)
        if found is not None:
            place, key = found
            raise _refuse(entry, f"`{place}` names code for the loader to import",
                          f"remove `{key}` from {entry.name}; ringpilot loads Llama with "
                          "transformers' own classes only")
    return folder


def _check_owned(path: Path, *, what: str) -> None:
    """`path` (followed if a symlink: what is read is its target) owned by this user or root,
    and writable by its owner only."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TrustError(f"{path}: cannot be checked before loading ({e.strerror}); give a "
                         "readable checkpoint") from None
    me = os.getuid()
    if st.st_uid not in (me, 0):
        raise TrustError(
            f"{path}: {what} is owned by uid {st.st_uid}, not by this user (uid {me}) or root; "
            "its DCP files are unpickled, which runs whatever their writer put there (fix: "
            f"`chown -R {me} {path}` once you trust its contents, or copy the checkpoint "
            "into a run directory of your own)")
    loose = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if loose:
        who = " and ".join(w for bit, w in ((stat.S_IWGRP, "its group"),
                                           (stat.S_IWOTH, "everyone")) if loose & bit)
        raise TrustError(
            f"{path}: {what} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o}); its DCP "
            "files are unpickled, which runs whatever another writer put there (fix: "
            f"`chmod -R go-w {path}`, after checking no one else wrote into it)")


def check_run_dir(path: str | Path) -> Path:
    """Before DCP unpickles from checkpoint `path`: the folders from its run directory down to
    it, and everything inside it (through symlinks), owned by this user (or root) and not
    group/world-writable; TrustError naming the first that is not, with the chmod/chown that
    fixes it. Returns `path`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; give a committed checkpoint "
                              "directory of the run")
    place = locate(path)
    chain = [path]
    if place is not None:  # checkpoints/<stage>/ and the run directory above the checkpoint
        chain += [path.parent, path.parent.parent, place.run_dir]
    for folder in reversed(chain):
        _check_owned(folder, what="a folder of the run")
    for entry, is_dir in _walk(path, follow=True):  # what DCP reads is what links point to
        _check_owned(entry, what="a folder of the checkpoint" if is_dir
                     else "a file of the checkpoint")
    return path
