"""Replacing a file so that a reader, or a crash, sees the old contents or the new, never half.

The one way every module replaces a file: write a temporary file in the same directory, fsync
it, `os.replace` it over the target, then fsync the directory so the rename itself survives a
power loss (POSIX makes the rename atomic, not durable).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` (text is written as UTF-8) atomically and durably."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:  # keep the file's mode (mkstemp's 0600 would hide a shared run's files from others)
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: str | Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writable_dir_problem(directory: str | Path) -> str | None:
    """Why `directory` cannot be created or written (e.g. "No such file or directory"), or None
    once it exists and a file could be written in it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return str(e.strerror or e)
    return None
