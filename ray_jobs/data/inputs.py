"""The prepare job's inputs: the listed files and their hashes, the tokenizer, and the
settings that decide the output (their fingerprint says whether to prepare again)."""

from __future__ import annotations

import hashlib
import json
from glob import glob
from pathlib import Path

from ray_jobs.data.prepared import (
    FORMAT_VERSION,
    PrepareError,
    resolve,
    sha256_tree,
    stat_key,
)
from specs.run import PreparedSpec, RunSpec

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".parquet": "parquet"}
# The index a `datasets` save_to_disk folder lists its Arrow files in (datasets.config.
# DATASET_STATE_JSON_FILENAME): read without importing datasets, which the core does not need.
SAVED_DATASET_INDEX = "state.json"


def list_files(spec: PreparedSpec, spec_dir: Path | None) -> list[dict]:
    """The input files in order: one dict per file (source index, path, format)."""
    files = []
    for si, src in enumerate(spec.sources):
        for pattern in src.paths:
            full = resolve(pattern, spec_dir)
            matches = sorted(glob(str(full)))
            if not matches:
                raise PrepareError(f"data.prepared.sources[{si}] ({src.name}): {pattern!r} "
                                   f"matches no file (looked for {full}); fix the path or glob")
            for m in matches:
                path = Path(m)
                fmt = src.format
                if fmt == "auto":
                    fmt = "hf_dataset" if path.is_dir() else EXTENSIONS.get(path.suffix.lower())
                if fmt is None:
                    raise PrepareError(f"{path}: unknown extension {path.suffix!r} (source "
                                       f"{src.name}); use .jsonl, .txt, .parquet or set "
                                       f"data.prepared.sources[{si}].format")
                if fmt == "hf_dataset" and not (path / SAVED_DATASET_INDEX).is_file():
                    raise PrepareError(f"{path}: not a `datasets` save_to_disk directory (no "
                                       f"{SAVED_DATASET_INDEX}); give files, or the saved "
                                       "dataset's folder")
                if fmt != "hf_dataset" and (not path.is_file() or path.stat().st_size == 0):
                    what = "is empty" if path.is_file() else "is not a file"
                    raise PrepareError(f"{path}: {what} (source {src.name}); remove it or fix "
                                       "the glob")
                files.append({"source": si, "path": str(path.resolve()), "format": fmt,
                              "kind": src.kind, "field": src.field})
    return files


def tokenizer_files(run: RunSpec, run_dir: Path, spec_dir: Path | None) -> tuple[Path, str | None]:
    """The run's tokenizer.json (trained into the run directory first if it has none) and the
    chat template found beside it (chat_template.jinja or tokenizer_config.json), if any."""
    from ray_jobs.data.tokenizer import build_tokenizer, resolve_tokenizer_source

    build_tokenizer(run, run_dir, spec_dir)
    source = resolve_tokenizer_source(run, spec_dir) or run_dir / "tokenizer" / "tokenizer.json"
    template = None
    jinja, config = source.parent / "chat_template.jinja", source.parent / "tokenizer_config.json"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    elif config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        template = value if isinstance(value, str) else None
    return source, template


def settings_of(run: RunSpec) -> dict:
    """What, beside the inputs and the tokenizer, decides the prepared bytes."""
    spec = run.data.prepared
    return {"format_version": FORMAT_VERSION, "seed": run.data.seed,
            **spec.model_dump(mode="json", exclude={"path"})}


def fingerprint(files: list[dict], tokenizer: Path, template: str | None, run: RunSpec,
                previous: dict | None) -> dict:
    """Inputs of the preparation with content hashes; a file whose (size, mtime, count) is as
    in `previous` keeps its recorded hash instead of being read again."""
    known = {f["path"]: f for f in (previous or {}).get("inputs", {}).get("files", [])}
    out = []
    for f in files:
        path = Path(f["path"])
        stat = stat_key(path)
        old = known.get(f["path"])
        digest = old["sha256"] if old and old.get("stat") == stat else sha256_tree(path)
        out.append({"source": f["source"], "path": f["path"], "format": f["format"],
                    "bytes": stat[0], "stat": stat, "sha256": digest})
    tok_hash = hashlib.sha256(tokenizer.read_bytes() + b"\0" + (template or "").encode())
    return {"tokenizer": tok_hash.hexdigest(), "tokenizer_path": str(tokenizer),
            "settings": settings_of(run), "files": out}


def input_key(inputs: dict) -> str:
    core = {"tokenizer": inputs["tokenizer"], "settings": inputs["settings"],
            "files": [(f["source"], f["path"], f["sha256"]) for f in inputs["files"]]}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two fingerprints, in words."""
    out = []
    if old.get("tokenizer") != new["tokenizer"]:
        out.append(f"the tokenizer changed ({new['tokenizer_path']})")
    old_settings = old.get("settings", {})
    for k in sorted(set(old_settings) | set(new["settings"])):
        if old_settings.get(k) != new["settings"].get(k):
            out.append(f"data.prepared setting {k!r} changed ({old_settings.get(k)!r} -> "
                       f"{new['settings'].get(k)!r})" if k not in ("seed", "format_version")
                       else f"{k} changed")
    before = {f["path"]: f["sha256"] for f in old.get("files", [])}
    after = {f["path"]: f["sha256"] for f in new["files"]}
    for p in sorted(set(after) - set(before)):
        out.append(f"new input {p}")
    for p in sorted(set(before) - set(after)):
        out.append(f"input gone: {p}")
    for p in sorted(set(before) & set(after)):
        if before[p] != after[p]:
            out.append(f"input changed: {p}")
    return out


