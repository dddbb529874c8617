"""Document masking for zigzag ring attention: where packed documents lie, and the block table.

A packed sequence holds several documents; attention `document` lets the query at global
position i see the key at j iff j <= i and both lie in one document. Every rank is handed the
whole sequence's document starts (a few int64s), so it derives the document of any row of any
shard from the zigzag layout (rank r holds chunks r and 2P-1-r of 2P) and nothing extra travels
with K/V. Each ring step's block, as zigzag.plan_block cuts it, is then one of

    skip    no query of the block sees any of its keys: nothing is computed (the K/V and the
            dK/dV accumulator still travel, so the ring stays in lock-step)
    dense   every pair the plain plan computes lies inside one document: the plain kernel runs
            unchanged, so a single document is today's causal ring, bit for bit
    masked  some pairs the plain plan computes cross a document boundary: the masked kernel
            (kernels.masked_block_forward/backward) with a (q rows, kv rows) boolean mask

Classifying is counting, O(rows) per block, without building a mask; a masked block keeps only
the positions and documents of its rows and builds its mask a chunk of query rows at a time.
One layout serves the whole batch (packed rows share their document starts).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ray_jobs.ring_attention.zigzag import BlockPlan, plan_block

SKIP, DENSE, MASKED = "skip", "dense", "masked"


@dataclass(frozen=True)
class DocumentMask:
    """The mask (True = attend) of a masked block, built on demand for a slice of its query rows:
    mask[rows] is (rows, kv rows) bool. Holding O(rows) positions instead of the O(rows^2) mask
    keeps a long block's plan small between forward and backward."""

    q_pos: torch.Tensor
    q_doc: torch.Tensor
    kv_pos: torch.Tensor
    kv_doc: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.q_pos), len(self.kv_pos)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        q_pos, q_doc = self.q_pos[rows], self.q_doc[rows]
        return ((self.kv_pos[None, :] <= q_pos[:, None])
                & (self.kv_doc[None, :] == q_doc[:, None]))


@dataclass(frozen=True)
class DocumentBlock:
    """One ring step of one rank under document masking: the plain plan, its kind, the allowed
    (query, key) pairs it holds, and the mask of a masked block, else None."""

    plan: BlockPlan
    kind: str
    pairs: int
    mask: DocumentMask | None


@dataclass(frozen=True)
class DocumentTable:
    """Block kinds of a whole ring, kinds[rank][step], and the allowed pairs each rank computes."""

    kinds: list[list[str]]
    pairs: list[int]


def check_doc_starts(doc_starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """doc_starts as a CPU int64 vector, or a ValueError that names it and says how to fix it.

    doc_starts holds the global start position of every document of the sequence, the first 0,
    strictly increasing, each below seq_len (cu_seqlens without its final entry).
    """
    fix = ("doc_starts must be a 1-D integer tensor of the documents' global start positions: "
           "first 0, strictly increasing, each below the sequence length (cu_seqlens without "
           "its last entry)")
    if not isinstance(doc_starts, torch.Tensor) or doc_starts.dim() != 1 or (
            doc_starts.dtype.is_floating_point or doc_starts.dtype == torch.bool
            or doc_starts.is_complex()):
        shape = tuple(doc_starts.shape) if isinstance(doc_starts, torch.Tensor) else None
        raise ValueError(f"{fix}; got {type(doc_starts).__name__} of shape {shape}, "
                         f"dtype {getattr(doc_starts, 'dtype', None)}")
    starts = doc_starts.detach().to("cpu", torch.int64)
    if starts.numel() == 0 or starts[0].item() != 0:
        raise ValueError(f"{fix}; got {starts.tolist()[:8]}, which does not start at 0")
    if bool((starts[1:] <= starts[:-1]).any()):
        raise ValueError(f"{fix}; got {starts.tolist()[:8]}..., not strictly increasing")
    if starts[-1].item() >= seq_len:
        raise ValueError(f"{fix}; the last start {starts[-1].item()} is not below the sequence "
                         f"length {seq_len}")
    return starts


def shard_ranges(rank: int, world: int, local_len: int, rows: slice) -> list[tuple[int, int]]:
    """Global [start, end) ranges of rows `rows` of ring rank `rank`'s zigzag shard.

    The shard is chunk `rank` then chunk 2*world-1-rank, each local_len / 2 long; a slice of it
    (plan_block's halves) is one or two contiguous ranges of global positions.
    """
    chunk = local_len // 2
    first, stop, _ = rows.indices(local_len)
    ranges = []
    for half, chunk_index in enumerate((rank, 2 * world - 1 - rank)):
        lo, hi = max(first, half * chunk), min(stop, (half + 1) * chunk)
        if lo < hi:
            offset = chunk_index * chunk - half * chunk
            ranges.append((lo + offset, hi + offset))
    return ranges


def _positions(ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges])


def _documents(positions: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(starts, positions, right=True) - 1


def document_index(positions: torch.Tensor, doc_starts: torch.Tensor) -> torch.Tensor:
    """The document (0, 1, ...) each of `positions` lies in, for any global positions of the
    sequence (a rank's zigzag or Ulysses shard): the segment ids of those tokens."""
    starts = doc_starts.to(positions.device, torch.int64)
    return torch.searchsorted(starts, positions, right=True) - 1


def document_position_ids(positions: torch.Tensor, doc_starts: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at each document (position_ids: per_document): each global
    position minus the start of its document, for any positions of the sequence, so a rank
    computes its own shard's without the others'."""
    starts = doc_starts.to(positions.device, torch.int64)
    return positions - starts[document_index(positions, starts)]


def document_position_rows(positions: torch.Tensor,
                           doc_starts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, S_local) RoPE positions of a batch under position_ids per_document: this rank's
    global `positions`, restarted at the documents of each row (doc_starts: one per row)."""
    return torch.stack([document_position_ids(positions, starts) for starts in doc_starts])


def _count_pairs(q_pos: torch.Tensor, kv_ranges, lo: torch.Tensor, hi: torch.Tensor) -> int:
    # Keys of range [a, b) that query p sees: those in [max(a, lo_p), min(b, hi_p)).
    total = 0
    for a, b in kv_ranges:
        total += int((torch.minimum(hi, torch.tensor(b)) - lo.clamp(min=a)).clamp(min=0).sum())
    return total


def plan_document_block(rank: int, src: int, world: int, local_len: int, starts: torch.Tensor,
                        build_mask: bool = True) -> DocumentBlock:
    """What rank `rank` computes against ring rank `src`'s K/V under document masking.

    The block is plan_block's (causal zigzag). Its allowed pairs are counted per query row p of
    document [s, e): keys in [max(a, s), min(b, e, p + 1)) of each visiting range [a, b). The
    plain plan's pairs are counted the same way with the document left out (every pair, for an
    off-diagonal block). skip: none allowed; dense: all the plain plan's pairs allowed; masked:
    otherwise, with its DocumentMask when `build_mask` (the table needs only the kinds).
    """
    plan = plan_block(rank, src, local_len, causal=True)
    q_pos = _positions(shard_ranges(rank, world, local_len, plan.q_rows))
    kv_ranges = shard_ranges(src, world, local_len, plan.kv_rows)
    q_doc = _documents(q_pos, starts)
    ends = torch.cat([starts[1:], torch.tensor([world * local_len])])
    pairs = _count_pairs(q_pos, kv_ranges, starts[q_doc], torch.minimum(ends[q_doc], q_pos + 1))
    zero = torch.zeros_like(q_pos)
    plain = (_count_pairs(q_pos, kv_ranges, zero, q_pos + 1) if plan.causal
             else len(q_pos) * sum(b - a for a, b in kv_ranges))
    if pairs == 0:
        return DocumentBlock(plan, SKIP, 0, None)
    if pairs == plain:
        return DocumentBlock(plan, DENSE, pairs, None)
    mask = None
    if build_mask:
        kv_pos = _positions(kv_ranges)
        mask = DocumentMask(q_pos, q_doc, kv_pos, _documents(kv_pos, starts))
    return DocumentBlock(plan, MASKED, pairs, mask)


def plan_document_steps(rank: int, world: int, local_len: int,
                        starts: torch.Tensor) -> list[DocumentBlock]:
    """Rank `rank`'s blocks in ring-step order (step s visits rank (rank - s) mod world)."""
    return [plan_document_block(rank, (rank - step) % world, world, local_len, starts)
            for step in range(world)]


@functools.lru_cache(maxsize=16)
def _cached_steps(rank: int, world: int, local_len: int,
                  starts: tuple[int, ...]) -> tuple[DocumentBlock, ...]:
    return tuple(plan_document_steps(rank, world, local_len,
                                     torch.tensor(starts, dtype=torch.int64)))


def document_steps(rank: int, world: int, local_len: int,
                   starts: torch.Tensor) -> tuple[DocumentBlock, ...]:
    """plan_document_steps once per sample: every layer of a model's forward (and its
    recomputation) asks for the same plan, which costs O(world x local_len) to build; the last
    16 samples' plans are kept (their masks are positions, O(local_len) each, not matrices)."""
    return _cached_steps(rank, world, local_len, tuple(starts.tolist()))


def plan_document_table(world: int, seq_len: int, doc_starts: torch.Tensor) -> DocumentTable:
    """The block kind of every (rank, step) of a causal zigzag ring under document masking, and
    the allowed (query, key) pairs per rank; over all ranks these add up to the sum over
    documents of len * (len + 1) / 2 (each query sees itself and its document's earlier keys).

    seq_len must be a multiple of 2 * world (zigzag chunks). O(world^2 * seq_len / world) time,
    no masks built: cheap enough for a planner to ask how much work each rank does.
    """
    if world < 1 or seq_len % (2 * world):
        raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of 2 * world "
                         f"(world={world}); pad the sequence")
    starts = check_doc_starts(doc_starts, seq_len)
    local_len = seq_len // world
    kinds, pairs = [], []
    for rank in range(world):
        blocks = [plan_document_block(rank, (rank - step) % world, world, local_len, starts,
                                      build_mask=False) for step in range(world)]
        kinds.append([b.kind for b in blocks])
        pairs.append(sum(b.pairs for b in blocks))
    return DocumentTable(kinds, pairs)
