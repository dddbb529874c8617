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

Zigzag balances one causal sequence, not many documents: a rank whose chunks hold the long
documents' later parts does several times the work of one holding short documents. A
`DocumentLayout` says where each token of the sequence sits before zigzag sharding: the plain
one keeps the sequence as it is; `balanced_layout` cuts long documents into 2P chunks of their
own (chunk k in zigzag slot k: rank r gets chunks r and 2P-1-r, as zigzag does for the whole
sequence) and places short documents whole, each on the rank with the least work that has room,
so every rank's allowed pairs come within a few percent of the mean. Each document's tokens keep
their order in the layout, so "j <= i in one document" is the same test in layout coordinates:
the block plan, its kinds and masks are computed on layout positions and each position's
document, and the caller shards the permuted sequence (DocumentLayout.shard), its RoPE positions
included (the original ones, so attention is that of the unpermuted sequence, exactly).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ray_jobs.ring_attention.zigzag import BlockPlan, plan_block, zigzag_shard
from topology.documents import BALANCE_TARGET, Run, balanced_slots

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


Rect = tuple[slice, slice, bool]  # (query rows, key rows, causal) of a block


@dataclass(frozen=True)
class DocumentBlock:
    """One ring step of one rank under document masking: the plain plan, its kind, the allowed
    (query, key) pairs it holds, and for a masked block its mask and, where they cost less
    than the masked kernel, the rectangles that cover its allowed pairs exactly (`rects`: each
    one document's query rows against its key rows, whole or causal; the plain kernel runs
    each and their log-sum-exps merge them), else None (the masked kernel)."""

    plan: BlockPlan
    kind: str
    pairs: int
    mask: DocumentMask | None
    rects: tuple[Rect, ...] | None = None


# A masked block runs as rectangles of the plain kernel when that costs less than the masked
# kernel's fp32 math over the whole block: a rectangle costs its area times FLASH_VS_MASKED
# (per query-key element, flash over masked), plus FLASH_CALL_ELEMENTS for the call itself.
# Measured here, one thread, fwd+bwd of one causal n x n block, 8 query and 2 K/V heads of 128
# (benchmarks/ring_attention.py docmask_rects_vs_masked_by_piece times the choice itself):
# bf16 flash 588 ms at n = 512 against 86 ms masked (this CPU has no native bf16: 6.8x),
# fp32 flash 60 ms against 92 ms (0.65x); a 16-token call costs about 1,000 masked elements.
# On a CPU with native bf16 the bf16 figure overstates flash: masked blocks then run as
# rectangles less often than they could, never wrongly.
FLASH_VS_MASKED = {torch.float32: 0.65, torch.float64: 0.65}
FLASH_VS_MASKED_HALF = 6.8
FLASH_CALL_ELEMENTS = 1024


def rects_cost(rects, dtype: torch.dtype) -> float:
    """The rectangles' cost in masked-kernel elements (see FLASH_VS_MASKED)."""
    per = FLASH_VS_MASKED.get(dtype, FLASH_VS_MASKED_HALF)
    return sum((r.stop - r.start) * (k.stop - k.start) * per + FLASH_CALL_ELEMENTS
               for r, k, _ in rects)


def _runs(pos: torch.Tensor, doc: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) rows of each stretch of consecutive positions of one document."""
    cut = torch.nonzero((pos[1:] != pos[:-1] + 1) | (doc[1:] != doc[:-1])).flatten() + 1
    bounds = [0, *cut.tolist(), len(pos)]
    return list(zip(bounds, bounds[1:]))


def block_rects(mask: DocumentMask, dtype: torch.dtype | None = None) -> tuple[Rect, ...] | None:
    """The rectangles covering a masked block's allowed pairs exactly, or None where the masked
    kernel costs less (rects_cost, for `dtype`; None: always the rectangles) or a stretch of
    keys overlaps a stretch of queries of its document without being the same stretch (then
    the masked kernel: never so in a zigzag ring, whose blocks pair disjoint or equal stretches).
    A query stretch of positions [p0, p1) of document d against a key stretch [c0, c1) of d:
    every pair if c1 <= p0, the causal triangle if they are the same stretch, nothing if
    c0 >= p1 (layout positions: a document's tokens keep their order)."""
    q_runs, kv_runs = _runs(mask.q_pos, mask.q_doc), _runs(mask.kv_pos, mask.kv_doc)
    by_doc: dict[int, list[tuple[int, int]]] = {}
    for a, b in kv_runs:
        by_doc.setdefault(int(mask.kv_doc[a]), []).append((a, b))
    q_pos, kv_pos = mask.q_pos.tolist(), mask.kv_pos.tolist()
    q_doc = mask.q_doc.tolist()
    rects = []
    for a, b in q_runs:
        p0, p1 = q_pos[a], q_pos[b - 1] + 1
        for c, e in by_doc.get(q_doc[a], ()):
            c0, c1 = kv_pos[c], kv_pos[e - 1] + 1
            if c1 <= p0:
                rects.append((slice(a, b), slice(c, e), False))
            elif (c0, c1) == (p0, p1):
                rects.append((slice(a, b), slice(c, e), True))
            elif c0 < p1:
                return None
    if dtype is not None and rects_cost(rects, dtype) >= mask.shape[0] * mask.shape[1]:
        return None
    return tuple(rects)


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


@dataclass(frozen=True, eq=True)
class DocumentLayout:
    """Where the tokens of a packed sequence sit before zigzag sharding: `runs`, in layout
    order, each a stretch of one document's tokens in their original order (document, first
    original position, length), covering the sequence once. `world` is the ring size the layout
    was balanced for (None: the plain layout, good for any ring). Hashable: one sample's plan is
    cached by its layout."""

    seq_len: int
    runs: tuple[Run, ...]
    world: int | None = None

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """Original position of each layout position (int64, seq_len)."""
        return torch.cat([torch.arange(first, first + n) for _, first, n in self.runs])

    @functools.cached_property
    def documents(self) -> torch.Tensor:
        """Document of each layout position (int64, seq_len)."""
        docs = torch.tensor([d for d, _, _ in self.runs], dtype=torch.int64)
        return torch.repeat_interleave(docs, torch.tensor([n for _, _, n in self.runs]))

    @functools.cached_property
    def is_plain(self) -> bool:
        return bool(torch.equal(self.positions, torch.arange(self.seq_len)))

    def pairs_per_rank(self, world: int) -> list[int]:
        """Allowed (query, key) pairs each rank of a ring of `world` computes on this layout:
        the query at original position i of a document starting at s sees i - s + 1 keys,
        wherever the layout puts it. O(seq_len); the block table counts the same block by
        block."""
        seen = (self.positions - self._starts[self.documents] + 1).reshape(2 * world, -1).sum(1)
        return [int(seen[r] + seen[2 * world - 1 - r]) for r in range(world)]

    @functools.cached_property
    def _starts(self) -> torch.Tensor:
        """Each document's first original position."""
        starts = torch.full((int(self.documents.max()) + 1,), self.seq_len, dtype=torch.int64)
        for d, first, _ in self.runs:
            starts[d] = min(int(starts[d]), first)
        return starts

    def shard(self, x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
        """Ring rank `rank`'s shard of `x` (aligned with the original sequence along `dim`):
        x in layout order, then zigzag_shard. Input ids, labels, RoPE positions and q/k/v alike."""
        if self.world is not None and world != self.world:
            raise ValueError(f"this layout was balanced for a ring of {self.world}, not "
                             f"{world}; build it with balanced_layout(..., world={world})")
        return zigzag_shard(x.index_select(dim, self.positions.to(x.device)), dim, rank, world)

    def unpermute(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x in layout order (zigzag_unshard of the shards) back in the original order."""
        back = torch.empty_like(self.positions)
        back[self.positions] = torch.arange(self.seq_len)
        return x.index_select(dim, back.to(x.device))


def plain_layout(doc_starts: torch.Tensor, seq_len: int) -> DocumentLayout:
    """The sequence as it is: one run per document, in order."""
    starts = check_doc_starts(doc_starts, seq_len).tolist()
    ends = starts[1:] + [seq_len]
    return DocumentLayout(seq_len, tuple((d, a, b - a) for d, (a, b) in
                                         enumerate(zip(starts, ends))))


def balanced_layout(doc_starts: torch.Tensor, seq_len: int, world: int, *,
                    target: float = BALANCE_TARGET) -> DocumentLayout:
    """A layout whose ranks' allowed (query, key) pairs under document masking are within
    `target` of their mean where cutting documents can get them there (topology.documents.
    balanced_slots: documents whole on the least busy rank with room, the longest cut into 2P
    chunks of their own until the ranks are even); the plain layout where zigzag alone is as
    even (a single document always). seq_len must be a multiple of 2 * world."""
    if world < 1 or seq_len % (2 * world):
        raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of 2 * world "
                         f"(world={world}); pad the sequence")
    starts = check_doc_starts(doc_starts, seq_len).tolist()
    slots = balanced_slots(starts, seq_len, world, target=target)
    if slots is None:
        lengths = [b - a for a, b in zip(starts, starts[1:] + [seq_len])]
        return DocumentLayout(seq_len, tuple((d, a, n) for d, (a, n) in
                                             enumerate(zip(starts, lengths))), world)
    return DocumentLayout(seq_len, tuple(run for runs in slots for run in runs), world)


def as_layout(doc_starts: "torch.Tensor | DocumentLayout", seq_len: int) -> DocumentLayout:
    """A DocumentLayout from ring_attention's doc_starts: a layout as given (its length
    checked), a tensor of document starts as the plain layout."""
    if isinstance(doc_starts, DocumentLayout):
        if doc_starts.seq_len != seq_len:
            raise ValueError(f"the document layout covers {doc_starts.seq_len} tokens, the "
                             f"sequence is {seq_len}; build it for this sequence")
        return doc_starts
    return plain_layout(doc_starts, seq_len)


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
    global `positions` (one vector for every row, or (B, S_local), a row's own under a
    document-balanced layout), restarted at the documents of each row (doc_starts: one per
    row)."""
    rows = positions if positions.dim() == 2 else [positions] * len(doc_starts)
    return torch.stack([document_position_ids(pos, starts)
                        for pos, starts in zip(rows, doc_starts)])


@dataclass(frozen=True)
class _DocumentCounts:
    """How many tokens of a document lie before a layout position: count(doc, x) over layout
    positions < x, by binary search in the positions sorted by (document, position)."""

    keys: torch.Tensor  # document * seq_len + layout position, sorted
    seq_len: int

    @classmethod
    def of(cls, layout: DocumentLayout) -> "_DocumentCounts":
        n = layout.seq_len
        return cls(torch.sort(layout.documents * n + torch.arange(n)).values, n)

    def count(self, doc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        base = doc * self.seq_len
        return (torch.searchsorted(self.keys, base + x)
                - torch.searchsorted(self.keys, base))


def _count_pairs(q_pos: torch.Tensor, q_doc: torch.Tensor, kv_ranges,
                 counts: _DocumentCounts) -> int:
    # Keys of layout range [a, b) that the query at layout position p sees: its document's
    # tokens in [a, min(b, p + 1)) (a document's tokens keep their order in the layout).
    total = 0
    for a, b in kv_ranges:
        hi = torch.clamp(q_pos + 1, max=b)
        seen = counts.count(q_doc, hi) - counts.count(q_doc, torch.full_like(q_pos, a))
        total += int(seen.clamp(min=0).sum())
    return total


def _plain_pairs(q_pos: torch.Tensor, kv_ranges, causal: bool) -> int:
    if not causal:
        return len(q_pos) * sum(b - a for a, b in kv_ranges)
    return sum(int((torch.clamp(q_pos + 1, max=b) - a).clamp(min=0).sum())
               for a, b in kv_ranges)


def plan_document_block(rank: int, src: int, world: int, local_len: int,
                        layout: "DocumentLayout | torch.Tensor",
                        build_mask: bool = True,
                        dtype: torch.dtype | None = torch.float32,
                        counts: _DocumentCounts | None = None) -> DocumentBlock:
    """What rank `rank` computes against ring rank `src`'s K/V under document masking.

    The block is plan_block's (causal zigzag) over the layout's positions. Its allowed pairs
    are counted per query row at layout position p: the keys of its document among the visiting
    layout positions up to p. The plain plan's pairs are counted the same way with the document
    left out (every pair, for an off-diagonal block). skip: none allowed; dense: all the plain
    plan's pairs allowed; masked: otherwise, with its DocumentMask (layout positions and their
    documents) when `build_mask` (the table needs only the kinds), and its rectangles where
    they cost less for `dtype` (block_rects). `layout` may be the documents' starts (the plain
    layout); `counts`, its _DocumentCounts, when the caller plans several blocks of it.
    """
    layout = as_layout(layout, world * local_len)
    plan = plan_block(rank, src, local_len, causal=True)
    q_pos = _positions(shard_ranges(rank, world, local_len, plan.q_rows))
    kv_ranges = shard_ranges(src, world, local_len, plan.kv_rows)
    docs = layout.documents
    q_doc = docs[q_pos]
    pairs = _count_pairs(q_pos, q_doc, kv_ranges, counts or _DocumentCounts.of(layout))
    if pairs == 0:
        return DocumentBlock(plan, SKIP, 0, None)
    if pairs == _plain_pairs(q_pos, kv_ranges, plan.causal):
        return DocumentBlock(plan, DENSE, pairs, None)
    mask = rects = None
    if build_mask:
        kv_pos = _positions(kv_ranges)
        mask = DocumentMask(q_pos, q_doc, kv_pos, docs[kv_pos])
        rects = block_rects(mask, dtype)
    return DocumentBlock(plan, MASKED, pairs, mask, rects)


def plan_document_steps(rank: int, world: int, local_len: int,
                        layout: "DocumentLayout | torch.Tensor",
                        dtype: torch.dtype | None = torch.float32) -> list[DocumentBlock]:
    """Rank `rank`'s blocks in ring-step order (step s visits rank (rank - s) mod world)."""
    layout = as_layout(layout, world * local_len)
    counts = _DocumentCounts.of(layout)  # built once per plan, not kept with it
    return [plan_document_block(rank, (rank - step) % world, world, local_len, layout,
                                dtype=dtype, counts=counts)
            for step in range(world)]


@functools.lru_cache(maxsize=16)
def _cached_steps(rank: int, world: int, local_len: int, layout: DocumentLayout,
                  dtype: torch.dtype | None) -> tuple[DocumentBlock, ...]:
    return tuple(plan_document_steps(rank, world, local_len, layout, dtype))


def document_steps(rank: int, world: int, local_len: int,
                   layout: "DocumentLayout | torch.Tensor",
                   dtype: torch.dtype | None = torch.float32) -> tuple[DocumentBlock, ...]:
    """plan_document_steps once per sample: every layer of a model's forward (and its
    recomputation) asks for the same plan, which costs O(world x local_len) to build; the last
    16 samples' plans are kept (their masks are positions, O(local_len) each, not matrices)."""
    return _cached_steps(rank, world, local_len, as_layout(layout, world * local_len), dtype)


def plan_document_table(world: int, seq_len: int,
                        doc_starts: "torch.Tensor | DocumentLayout") -> DocumentTable:
    """The block kind of every (rank, step) of a causal zigzag ring under document masking, and
    the allowed (query, key) pairs per rank; over all ranks these add up to the sum over
    documents of len * (len + 1) / 2 (each query sees itself and its document's earlier keys).
    doc_starts: the documents' starts (the plain layout) or a DocumentLayout.

    seq_len must be a multiple of 2 * world (zigzag chunks). O(world^2 * seq_len / world) time,
    no masks built: cheap enough for a planner to ask how much work each rank does.
    """
    if world < 1 or seq_len % (2 * world):
        raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of 2 * world "
                         f"(world={world}); pad the sequence")
    layout = as_layout(doc_starts, seq_len)
    local_len = seq_len // world
    kinds, pairs = [], []
    counts = _DocumentCounts.of(layout)
    for rank in range(world):
        blocks = [plan_document_block(rank, (rank - step) % world, world, local_len, layout,
                                      build_mask=False, counts=counts) for step in range(world)]
        kinds.append([b.kind for b in blocks])
        pairs.append(sum(b.pairs for b in blocks))
    return DocumentTable(kinds, pairs)
