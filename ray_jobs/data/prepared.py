"""Prepared documents on disk, and how the trainer reads them by sample address.

Layout of a prepared directory (written by ray_jobs.data.prepare):

    manifest.json          what was prepared from what (written last; its presence = complete)
    tokens-00000.npy ...   one uint32 token stream cut into shards of `shard_tokens`
    mask-00000.npy ...     (only with a chat source) uint8, 1 where the token is trained on
    doc_starts.npy         int64 stream offset of every document copy (its first token)
    doc_sources.npy        uint16 source index of every document copy

Every document is followed by EOS. A stage of `seq_len` packs the stream into consecutive
sequences of seq_len + 1 tokens (the +1: labels are the inputs shifted by one), so one stream
serves every stage: sequence j of the stage is stream[j * (seq_len + 1) : (j + 1) * (seq_len + 1)]
and `doc_starts` gives the document boundaries inside it. Sequences are visited in a seeded
pseudo-random permutation computed per address (a Feistel network, O(1) time and memory), so a
worker's memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class PrepareError(ValueError):
    """Bad input or stale prepared data; the message names the file (and line) and the fix."""


def resolve(path: str, spec_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (spec_dir or Path.cwd()) / p


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a file, or of a directory's files (names and contents, sorted)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def stat_key(path: Path) -> list[int]:
    """(size, mtime_ns) of a file, or summed over a directory's files: the cheap change check."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [f.stat() for f in files]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0),
            len(files)]


def read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PrepareError(f"{out / MANIFEST}: unreadable ({e}); rerun `python -m "
                           "ray_jobs.prepare --run RUN.yaml` to prepare the data again") from None


def stage_sequences(total_tokens: int, seq_len: int) -> int:
    return total_tokens // (seq_len + 1)


class FeistelPermutation:
    """A seeded bijection of range(n), evaluated per index in O(1) time and memory.

    A balanced Feistel network over the smallest even power of two >= n, with cycle walking
    (re-encrypting until the value falls below n; fewer than 4 rounds of walking on average)."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int, *salt: object):
        if n <= 0:
            raise ValueError("empty permutation")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        base = ":".join(str(s) for s in (seed, *salt)).encode()
        self.keys = [int.from_bytes(hashlib.blake2b(base + bytes([r]), digest_size=8).digest(),
                                    "little") for r in range(self.ROUNDS)]

    def _round(self, x: int, key: int) -> int:
        x = (x * 0x9E3779B97F4A7C15 + key) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 32
        return x & self.mask

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for key in self.keys:
                left, right = right, left ^ self._round(right, key)
            x = (left << self.half) | right
            if x < self.n:
                return x


@dataclass(frozen=True)
class Window:
    """One packed sequence: seq_len + 1 tokens, their trained-on mask (None: all), boundaries."""

    tokens: np.ndarray  # int64, seq_len + 1
    mask: np.ndarray | None  # bool, seq_len + 1; None when every token is trained on
    doc_starts: np.ndarray  # offsets inside the window where a document begins


class PreparedCorpus:
    """Read-only view of a prepared directory: shards opened by memory map on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise PrepareError(f"{self.path}: no prepared data ({MANIFEST} missing); run "
                               "`python -m ray_jobs.prepare --run RUN.yaml`")
        self.manifest = manifest
        self.total_tokens = int(manifest["total_tokens"])
        self.eos = int(manifest["eos_token_id"])
        shards = manifest["shards"]
        self._files = [s["file"] for s in shards]
        self._masks = [s.get("mask") for s in shards]
        self._starts = np.cumsum([0] + [s["tokens"] for s in shards])
        self._open: dict[tuple[str, int], np.ndarray] = {}
        self._doc_starts: np.ndarray | None = None

    def _shard(self, kind: str, i: int) -> np.ndarray:
        key = (kind, i)
        if key not in self._open:
            name = self._files[i] if kind == "tokens" else self._masks[i]
            self._open[key] = np.load(self.path / name, mmap_mode="r")
        return self._open[key]

    def read(self, offset: int, n: int, kind: str = "tokens") -> np.ndarray:
        """Tokens (or mask values) [offset, offset + n) of the stream, copied out of the maps."""
        if offset < 0 or offset + n > self.total_tokens:
            raise IndexError(f"tokens [{offset}, {offset + n}) outside the stream of "
                             f"{self.total_tokens}")
        first = int(np.searchsorted(self._starts, offset, side="right")) - 1
        parts, at, left, i = [], offset, n, first
        while left > 0:
            shard = self._shard(kind, i)
            lo = at - int(self._starts[i])
            take = min(left, len(shard) - lo)
            parts.append(shard[lo:lo + take])
            at, left, i = at + take, left - take, i + 1
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    @property
    def has_mask(self) -> bool:
        return any(m is not None for m in self._masks)

    def sequences(self, seq_len: int) -> int:
        return stage_sequences(self.total_tokens, seq_len)

    def window(self, seq_len: int, j: int) -> Window:
        """Packed sequence j of a stage of `seq_len`."""
        n = seq_len + 1
        offset = j * n
        tokens = self.read(offset, n).astype(np.int64)
        mask = self.read(offset, n, "mask").astype(bool) if self.has_mask else None
        return Window(tokens, mask, self._starts_within(offset, n))

    def document_starts(self, seq_len: int, j: int) -> np.ndarray:
        """Where documents begin among the seq_len inputs of packed sequence j: int64 positions
        0 .. seq_len - 1, 0 first (a sequence that begins inside a document starts one there),
        strictly increasing. Reads doc_starts.npy alone (a binary search in its memory map),
        no token: every rank of a ring asks it for the whole sequence."""
        inside = self._starts_within(j * (seq_len + 1), seq_len)
        return np.concatenate([[0], inside[inside > 0]]).astype(np.int64)

    def _starts_within(self, offset: int, n: int) -> np.ndarray:
        # Document starts in the stream's [offset, offset + n), as offsets from `offset`.
        if self._doc_starts is None:
            self._doc_starts = np.load(self.path / "doc_starts.npy", mmap_mode="r")
        lo, hi = np.searchsorted(self._doc_starts, [offset, offset + n])
        return np.asarray(self._doc_starts[lo:hi]) - offset

