"""Names that become paths (stage, task, checkpoint, run) and the one check that a path stays put.

A stage name read from a ledger, a task name read from a results file or a run name given on a
command line ends up as a directory or file name. Each is checked here where it is READ, so an
edited or hostile file cannot name `..`, an absolute path or a path with a separator, and
`contained` makes sure a path built from several of them, symlinks followed, is still inside the
directory it belongs to. Nothing else in ringpilot decides what a safe name is.
"""

from __future__ import annotations

import re
from pathlib import Path

# One path component: starts with a letter or digit (so never `.`, `..` or a hidden file),
# then letters, digits, `.`, `_`, `-`; no separator, no NUL, no newline, at most 128 characters.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(NAME_PATTERN)
MAX_PARTS = 16  # components of a stored relative path (checkpoints/<stage>/step-N is 3)


class UnsafePath(ValueError):
    """A name or path that would leave the directory it belongs to, or is not a simple name."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_name(value: object, what: str) -> str:
    """`value` if it is a simple name (one path component, see NAME_PATTERN), else UnsafePath
    naming `what`."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise UnsafePath(f"{what}: not a simple name (got {_shown(value)}; use 1 to 128 letters, "
                         "digits, '.', '_' or '-', starting with a letter or digit)")
    return value


def check_relative(value: object, what: str) -> str:
    """`value` if it is a relative path of simple names joined by '/' (no `.`, `..`, empty or
    absolute part, no backslash), else UnsafePath naming `what`."""
    if not isinstance(value, str) or not value:
        raise UnsafePath(f"{what}: not a relative path (got {_shown(value)}; give a path such "
                         "as checkpoints/<stage>/step-000050, relative to the run directory)")
    parts = value.split("/")
    if len(parts) > MAX_PARTS or not all(_NAME.fullmatch(p) for p in parts):
        raise UnsafePath(f"{what}: {_shown(value)} is not a path inside the run directory "
                         "(relative, made of simple names: no '.', '..', leading '/', empty part "
                         "or unusual character)")
    return value


def contained(root: str | Path, rel: str | Path, what: str,
              error: type[Exception] = UnsafePath) -> Path:
    """`root / rel`; `error` unless, symlinks followed, it stays inside `root` (or is it)."""
    real_root = Path(root).resolve()
    try:
        real = (real_root / rel).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise error(f"{what}: {str(rel)!r} cannot be resolved ({e}); fix or restore the file "
                    "that holds this path") from None
    if real != real_root and real_root not in real.parents:
        raise error(f"{what}: {str(rel)!r} leads to {real}, outside the run directory "
                    f"{real_root}; a run only reads and deletes inside its own directory. "
                    "Fix or restore the file that holds this path")
    return Path(root) / rel  # as the caller named the root (relative paths stay so)



def error_location(loc: tuple) -> str:
    """A pydantic error's `loc` as `a.b.0.c`, a key that is not a plain printable word shown as
    its repr: a key read from a hostile file (a newline, a NUL) must not break the one-line
    error that names it."""
    parts = [str(p) if isinstance(p, int) or (str(p).isprintable() and "." not in str(p)
                                               and str(p).strip() == str(p) and str(p))
             else repr(p) for p in loc]
    return ".".join(parts) or "the document"
