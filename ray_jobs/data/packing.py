"""Packing in the prepare job's driver: documents appended to one uint32 token stream of
.npy shards, each followed by EOS, upsampled copies in later passes."""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

import numpy as np

from ray_jobs.data.prepared import (
    sha256_file,
)
from specs.run import RunSpec


class StreamWriter:
    """Appends uint32 tokens (and 0/1 masks) to shards of `shard_tokens`, saved as .npy."""

    def __init__(self, out: Path, shard_tokens: int, with_mask: bool):
        self.out, self.size, self.with_mask = out, shard_tokens, with_mask
        self.buf = np.empty(shard_tokens, np.uint32)
        self.mbuf = np.empty(shard_tokens, np.uint8) if with_mask else None
        self.fill, self.total, self.shards = 0, 0, []
        self.maps: dict[tuple[str, int], np.ndarray] = {}

    def append(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        at = 0
        while at < len(tokens):
            take = min(len(tokens) - at, self.size - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[at:at + take]
            if self.with_mask:
                self.mbuf[self.fill:self.fill + take] = 1 if mask is None else mask[at:at + take]
            self.fill, self.total, at = self.fill + take, self.total + take, at + take
            if self.fill == self.size:
                self._save()

    def read(self, offset: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens and mask [offset, offset + n) written so far (saved shards or the buffer)."""
        toks, masks = [], []
        at, left = offset, n
        while left > 0:
            i, lo = divmod(at, self.size)
            take = min(left, self.size - lo)
            if i < len(self.shards):
                toks.append(self._saved("file", i)[lo:lo + take])
                if self.with_mask:
                    masks.append(self._saved("mask", i)[lo:lo + take])
            else:
                toks.append(self.buf[lo:lo + take])
                if self.with_mask:
                    masks.append(self.mbuf[lo:lo + take])
            at, left = at + take, left - take
        return np.concatenate(toks), (np.concatenate(masks) if self.with_mask else None)

    def _saved(self, kind: str, i: int) -> np.ndarray:
        if (kind, i) not in self.maps:
            self.maps[(kind, i)] = np.load(self.out / self.shards[i][kind], mmap_mode="r")
        return self.maps[(kind, i)]

    def _save(self) -> None:
        i = len(self.shards)
        entry = {"file": f"tokens-{i:05d}.npy", "tokens": self.fill}
        np.save(self.out / entry["file"], self.buf[:self.fill])
        entry["sha256"] = sha256_file(self.out / entry["file"])
        if self.with_mask:
            entry["mask"] = f"mask-{i:05d}.npy"
            np.save(self.out / entry["mask"], self.mbuf[:self.fill])
        self.shards.append(entry)
        self.fill = 0

    def close(self) -> None:
        if self.fill:
            self._save()


def copies(factor: float, digest: bytes, seed: int) -> int:
    """floor(factor) copies, plus one more with probability frac(factor), decided by the
    content hash (reproducible, and the same for a document wherever it sits)."""
    whole = int(factor)
    u = int.from_bytes(hashlib.blake2b(digest + str(seed).encode(), digest_size=8).digest(),
                       "little") / 2**64
    return whole + (u < factor - whole)


class Packer:
    """Filters, dedups and weights documents in input order and writes the stream."""

    def __init__(self, run: RunSpec, out: Path, eos: int, with_mask: bool):
        self.spec, self.seed, self.eos = run.data.prepared, run.data.seed, eos
        self.writer = StreamWriter(out, self.spec.shard_tokens, with_mask)
        self.buckets = sorted((b.min_tokens, b.factor) for b in self.spec.upsample)
        self.seen: set[bytes] = set()
        # 8 bytes per kept document each (arrays, not lists of ints: billions of tokens are
        # millions of documents)
        self.starts, self.lengths, self.counts = array("q"), array("q"), array("q")
        self.doc_sources = array("H")
        n = len(self.spec.sources)
        self.stats = [{"name": s.name, "documents": 0, "too_short": 0, "too_long": 0,
                       "duplicates": 0, "weighted_out": 0, "kept": 0, "copies": 0, "tokens": 0}
                      for s in self.spec.sources][:n]

    def factor(self, source: int, n_tokens: int) -> float:
        f = self.spec.sources[source].weight
        for lo, factor in reversed(self.buckets):
            if n_tokens >= lo:
                return f * factor
        return f

    def add(self, source: int, ids: np.ndarray, mask: np.ndarray | None, digest: bytes) -> None:
        st = self.stats[source]
        st["documents"] += 1
        n = len(ids)
        if n < self.spec.min_tokens:
            st["too_short"] += 1
            return
        if self.spec.max_tokens is not None and n > self.spec.max_tokens:
            st["too_long"] += 1
            return
        if self.spec.dedup:
            if digest in self.seen:
                st["duplicates"] += 1
                return
            self.seen.add(digest)
        count = copies(self.factor(source, n), digest, self.seed)
        if count == 0:
            st["weighted_out"] += 1
            return
        st["kept"] += 1
        self.starts.append(self.writer.total)
        self.lengths.append(n + 1)
        self.counts.append(count)
        self._write(source, np.append(ids, self.eos).astype(np.uint32),
                    None if mask is None else np.append(mask, 1).astype(np.uint8))

    def _write(self, source: int, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        self.doc_sources.append(source)
        self.stats[source]["copies"] += 1
        self.stats[source]["tokens"] += len(tokens)
        self.writer.append(tokens, mask)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Write the extra copies (pass r holds every document with more than r copies) and
        close the stream; (document starts, their sources)."""
        doc_starts = array("q", self.starts)
        counts = np.frombuffer(self.counts, np.int64)
        for r in range(1, max(self.counts, default=1)):
            for d in np.flatnonzero(counts > r):  # d: the d-th kept document, in input order
                start, length, source = self.starts[d], self.lengths[d], self.doc_sources[d]
                doc_starts.append(self.writer.total)
                tokens, mask = self.writer.read(start, length)
                self._write(source, tokens.copy(), None if mask is None else mask.copy())
        self.writer.close()
        return np.asarray(doc_starts, np.int64), np.asarray(self.doc_sources, np.uint16)


