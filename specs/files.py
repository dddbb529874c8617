"""Reading an input file with a size bound: every failure is one SpecError naming the file."""

from __future__ import annotations

from pathlib import Path

from specs.errors import SpecError

# Caps by kind of file. Each is far above any real file of that kind, and far below what would
# exhaust a 24 GiB host: an input that big is a mistake or an attack, and is refused unread.
MiB = 1 << 20
LIMITS = {
    "spec": 4 * MiB,         # RunSpec / ClusterSpec YAML (the 64-node cluster file is ~10 KB)
    "topology": 4 * MiB,     # `nvidia-smi topo -m` text, NCCL topology XML
    "ledger": 256 * MiB,     # ledger.jsonl grows by ~1 KB per checkpoint
    "results": 64 * MiB,     # an evaluation's results JSON
    "metadata": 16 * MiB,    # small JSON beside a checkpoint (trainer state, pointers, configs)
}


def read_bounded(path: str | Path, kind: str, *, binary: bool = False) -> str | bytes:
    """The contents of `path`, refused with a SpecError when missing, too large or not UTF-8.

    The size is checked on the open file descriptor and the read stops one byte past the limit,
    so a file that grows (or a FIFO) cannot make us read more than the cap.
    """
    limit = LIMITS[kind]
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise SpecError(source, ["<file>: not found (check the path; relative paths start "
                                 f"at {Path.cwd()})"]) from None
    except IsADirectoryError:
        raise SpecError(source, ["<file>: is a directory (give the file inside it)"]) from None
    except OSError as e:
        raise SpecError(source, [f"<file>: cannot be read ({e.strerror or e.__class__.__name__})"]
                        ) from None
    if len(data) > limit:
        raise SpecError(source, [f"<file>: larger than the {limit // MiB} MiB allowed for a "
                                 f"{kind} file (is this the right file?)"])
    if binary:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(source, [f"<file>: not UTF-8 text (byte {e.start} is {data[e.start]:#04x}; "
                                 "save it as UTF-8)"]) from None
