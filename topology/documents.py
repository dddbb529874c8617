"""Document masking priced: packed sequences drawn from a document-length histogram, and the
allowed (query, key) pairs of every block of a causal zigzag ring.

Under attention `document` the query at position i sees the key at j iff j <= i and both lie in
one document, so a sequence's attention work is the sum over its documents of len * (len + 1) / 2
pairs instead of seq_len * (seq_len + 1) / 2, and the zigzag layout (ring rank r holds chunks r
and 2R-1-r of 2R) that balances one causal sequence no longer balances it: a rank's work depends
on where the documents fall. This module counts both from document starts, in numpy (topology
may not import the kernel's own table, ray_jobs.ring_attention.documents; a test pins these
counts against it), and estimates them for a stage from the histogram by sampling packed
sequences with a fixed seed. It also holds where sharding per document puts each document's
tokens (balanced_slots: the kernel's balanced_layout is built from it, and the trainer shards
every packed row on a ring that way), so the planner prices the layout the trainer runs.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specs.run import DataSpec, DocumentLengthBucket, RunSpec

# (max_tokens, share of the tokens) per bucket, bounds increasing, shares summing to 1
Histogram = tuple[tuple[int, float], ...]

MANIFEST = "manifest.json"  # ray_jobs.data.prepared.MANIFEST (a test pins it)
SAMPLES = 256  # packed sequences drawn per (histogram, seq_len, ring)
MIN_SAMPLES = 4
DOCUMENT_BUDGET = 1 << 22  # documents drawn in all, per estimate: fewer samples of many tiny ones
BALANCED_SAMPLES = 32  # of those, sharded per document, per estimate on a ring
PLACEMENT_BUDGET = 1 << 15  # documents placed in all, per estimate on a ring
SEED = 0


def histogram_of(buckets: Sequence[DocumentLengthBucket]) -> Histogram | None:
    """data.document_lengths as a normalised, hashable Histogram; None when it is empty."""
    if not buckets:
        return None
    total = sum(b.share for b in buckets)
    return tuple((b.max_tokens, b.share / total) for b in buckets)


# ---------------------------------------------------------------------------------------------
# Counting: the allowed pairs of each block, given where the documents start.


def chunk_pairs(world: int, seq_len: int, doc_starts: np.ndarray) -> np.ndarray:
    """Allowed pairs between the 2 * world zigzag chunks: P[i, j] counts the queries of chunk i
    with the keys of chunk j that they may see under document masking (0 for j > i).

    A document's piece of m tokens in one chunk gives that chunk's diagonal m (m + 1) / 2 pairs;
    a document spanning chunks i > j gives P[i, j] the product of its pieces' lengths (every
    query sees every earlier key of its document). Only documents that cross a chunk boundary
    (at most 2 * world - 1) reach off the diagonal. O(documents + world^2) time. seq_len is a
    multiple of 2 * world; doc_starts begins at 0 and increases (the kernel's check_doc_starts).
    """
    chunks = 2 * world
    size = seq_len // chunks
    starts = np.asarray(doc_starts, dtype=np.int64)
    cuts = np.union1d(starts, np.arange(chunks, dtype=np.int64) * size)
    pieces = np.diff(np.append(cuts, seq_len)).astype(np.float64)
    chunk = cuts // size
    doc = np.searchsorted(starts, cuts, side="right") - 1
    pairs = np.zeros((chunks, chunks))
    pairs[np.diag_indices(chunks)] = np.bincount(chunk, weights=pieces * (pieces + 1) / 2,
                                                 minlength=chunks)
    crossing = np.bincount(doc, minlength=len(starts)) > 1  # the documents crossing a boundary
    of_crossing = crossing[doc]
    rows = np.cumsum(crossing)[doc[of_crossing]] - 1
    spans = np.zeros((int(crossing.sum()), chunks))  # [crossing document, chunk]: its piece
    spans[rows, chunk[of_crossing]] = pieces[of_crossing]
    return pairs + np.tril(spans.T @ spans, -1)


def zigzag_block_pairs(world: int, seq_len: int, doc_starts: np.ndarray, *,
                       balanced: bool = False) -> np.ndarray:
    """Allowed pairs of ring rank r's block at ring step k, as [r, k] (step k visits rank
    (r - k) mod world's K/V): the queries of r's two chunks with the keys of the visitor's two
    chunks. Causal zigzag computes no other pairs (a visitor's other half lies after the
    queries), so these are exactly the pairs the kernel's block table counts. `balanced`: the
    sequence sharded per document first (balanced_slots), as the trainer shards it on a ring."""
    slots = balanced_slots(list(map(int, doc_starts)), seq_len, world) if balanced else None
    pairs = (chunk_pairs(world, seq_len, doc_starts) if slots is None
             else slot_pairs(world, slots))
    ranks = np.arange(world)
    held = np.zeros((world, 2 * world))  # rank r holds chunks r and 2 world - 1 - r
    held[ranks, ranks] = held[ranks, 2 * world - 1 - ranks] = 1
    by_rank = held @ pairs @ held.T  # [rank, visitor]
    steps = np.arange(world)
    return by_rank[ranks[:, None], (ranks[:, None] - steps[None, :]) % world]


# ---------------------------------------------------------------------------------------------
# Balancing per document: where each document's tokens go among the 2R zigzag slots.

Run = tuple[int, int, int]  # (document, its first position in the sequence, length)
# The busiest rank's allowed pairs over the mean that per-document sharding aims for.
BALANCE_TARGET = 1.02


def chunk_sizes(length: int, parts: int, rotate: int) -> list[int]:
    """`length` cut into `parts` sizes differing by at most 1; the larger ones start at part
    `rotate` (mod parts), so consecutive documents spread their remainders over all parts."""
    base, extra = divmod(length, parts)
    return [base + ((k - rotate) % parts < extra) for k in range(parts)]


def piece_pairs(sizes: Sequence[int]) -> list[int]:
    """Allowed pairs of each chunk of one document cut into consecutive chunks of `sizes`:
    a chunk sees its own earlier tokens and every token of the chunks before it."""
    pairs, before = [], 0
    for n in sizes:
        pairs.append(n * (n + 1) // 2 + n * before)
        before += n
    return pairs


def _place(lengths: list[int], firsts: list[int], world: int, slot: int,
           cut: set[int]) -> tuple[list[list[Run]], list[int]]:
    """Fill the 2P zigzag slots of `slot` tokens each: documents in `cut` as 2P chunks of their
    own (chunk k in slot k), then the others longest first, each whole on the rank with the
    least work among those with room in its two slots (first slot first); a document no rank
    has room for fills the free space of slots in slot order. Returns each slot's runs and the
    allowed pairs per rank."""
    slots = 2 * world
    content: list[list[Run]] = [[] for _ in range(slots)]
    free = [slot] * slots
    work = [0] * world
    owner = [min(k, slots - 1 - k) for k in range(slots)]
    rotate = 0
    for d in sorted(cut):
        sizes = chunk_sizes(lengths[d], slots, rotate)
        rotate = (rotate + lengths[d] % slots) % slots
        offset = firsts[d]
        for k, (n, pairs) in enumerate(zip(sizes, piece_pairs(sizes))):
            if n:
                content[k].append((d, offset, n))
                free[k] -= n
                work[owner[k]] += pairs
            offset += n
    whole = sorted((d for d in range(len(lengths)) if d not in cut),
                   key=lambda d: (-lengths[d], d))
    for d in whole:
        n, offset = lengths[d], firsts[d]
        roomy = [r for r in range(world) if free[r] + free[slots - 1 - r] >= n]
        if roomy:
            r = min(roomy, key=lambda r: (work[r], -(free[r] + free[slots - 1 - r]), r))
            targets = [r, slots - 1 - r]
            work[r] += n * (n + 1) // 2
        else:
            targets = list(range(slots))
        pieces = []
        for k in targets:
            take = min(free[k], n - sum(pieces))
            if take:
                content[k].append((d, offset + sum(pieces), take))
                free[k] -= take
                pieces.append(take)
                if not roomy:
                    work[owner[k]] += piece_pairs(pieces)[-1]
            if sum(pieces) == n:
                break
    return content, work


def plain_rank_work(lengths: list[int], world: int, slot: int) -> list[int]:
    """Allowed pairs per rank of the sequence as it is (zigzag sharding alone)."""
    work, owner = [0] * world, [min(k, 2 * world - 1 - k) for k in range(2 * world)]
    position = 0
    for n in lengths:
        pieces = []
        while sum(pieces) < n:
            k = position // slot
            pieces.append(min(n - sum(pieces), (k + 1) * slot - position))
            work[owner[k]] += piece_pairs(pieces)[-1]
            position += pieces[-1]
    return work


def balanced_slots(starts: Sequence[int], seq_len: int, world: int, *,
                   target: float = BALANCE_TARGET) -> list[list[Run]] | None:
    """Each zigzag slot's runs (slot k: chunk k of 2 * world; ring rank r holds slots r and
    2 world - 1 - r) of a sequence sharded per document, or None where the sequence as it is
    balances as well.

    Starts with every document whole (each on the rank with the least work that has room: no
    document crosses ranks, blocks stay skipped or dense); while the busiest rank is over
    `target` x the mean, cuts more documents, the longest first (one, then twice as many each
    round), into 2 world chunks of their own (chunk k in slot k, as zigzag cuts one sequence),
    which spreads each one's work evenly. Returns the most even placement tried. A document's
    runs keep its order along the slots, so causality inside it holds in the layout's order.
    seq_len is a multiple of 2 * world; starts begin at 0 and increase.
    """
    lengths = [b - a for a, b in zip(starts, [*starts[1:], seq_len])]
    slot = seq_len // (2 * world)
    plain = plain_rank_work(lengths, world, slot)
    best, best_max = None, max(plain)
    longest = sorted(range(len(lengths)), key=lambda d: (-lengths[d], d))
    cut: set[int] = set()
    while best_max > target * sum(plain) / world:
        content, work = _place(lengths, list(starts), world, slot, cut)
        if max(work) < best_max:
            best, best_max = content, max(work)
        candidates = [d for d in longest if d not in cut and lengths[d] >= 2 * world]
        if not candidates:
            break
        cut.update(candidates[:max(1, len(cut))])
    return best


def slot_pairs(world: int, slots: list[list[Run]]) -> np.ndarray:
    """chunk_pairs of a sequence sharded per document: P[i, j] the allowed pairs of slot i's
    queries with slot j's keys (a document's runs in slots i > j: the product of their
    lengths; its run in slot i: m (m + 1) / 2 on the diagonal)."""
    chunks = 2 * world
    pairs = np.zeros((chunks, chunks))
    where: dict[int, list[tuple[int, int]]] = {}
    for k, runs in enumerate(slots):
        for doc, _, n in runs:
            pairs[k, k] += n * (n + 1) / 2
            for j, m in where.get(doc, ()):
                pairs[k, j] += n * m
            where.setdefault(doc, []).append((k, n))
    return pairs


# ---------------------------------------------------------------------------------------------
# Sampling: packed sequences from the histogram.


def _buckets(hist: Histogram) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per bucket: lowest and highest length, token share, document share (lengths uniform
    over lowest..highest, so a bucket's documents average (lowest + highest) / 2 tokens)."""
    upper = np.array([b for b, _ in hist], dtype=np.int64)
    lower = np.concatenate(([1], upper[:-1] + 1))
    tokens = np.array([w for _, w in hist])
    tokens = tokens / tokens.sum()
    docs = tokens / ((lower + upper) / 2)
    return lower, upper, tokens, docs / docs.sum()


def sample_doc_starts(hist: Histogram, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """Document starts of one packed sequence of `seq_len` tokens cut at a uniformly random
    place of an endless stream of documents drawn independently from `hist`.

    The cut falls in a document with probability proportional to its length: its bucket is
    drawn by token share, its length within the bucket with probability proportional to the
    length, and the cut uniformly inside it, so the sequence opens with that document's rest.
    The documents after it are drawn by document share (token share over mean length).
    """
    lower, upper, tokens, docs = _buckets(hist)
    k = rng.choice(len(tokens), p=tokens)
    a, b = float(lower[k] - 1), float(upper[k])
    first = min(max(math.ceil(math.sqrt(a * a + rng.random() * (b * b - a * a))),
                    int(lower[k])), int(upper[k]))
    end = int(rng.integers(1, first + 1))  # the first document's tokens left in the sequence
    ends = [np.array([end], dtype=np.int64)]
    mean = float(docs @ ((lower + upper) / 2))
    while end < seq_len:
        n = int((seq_len - end) / mean * 1.1) + 8
        picked = rng.choice(len(docs), size=n, p=docs)
        more = end + np.cumsum(rng.integers(lower[picked], upper[picked] + 1))
        ends.append(more)
        end = int(more[-1])
    ends = np.concatenate(ends)
    return np.concatenate(([0], ends[ends < seq_len]))


@dataclass(frozen=True)
class DocumentWork:
    """Allowed pairs of every block of sampled sequences, relative to a causal block.

    blocks[sample, rank, step] is the block's allowed pairs over seq_len (seq_len + 1) / 2 /
    ring^2 (a causal zigzag block's mean): a rank's row sums to `ring` for one document filling
    the sequence, as under causal attention."""

    blocks: np.ndarray

    @property
    def ring(self) -> int:
        return self.blocks.shape[1]

    @property
    def rank_work(self) -> np.ndarray:
        """[sample, rank]: each rank's allowed pairs over a causal rank's."""
        return self.blocks.sum(axis=2) / self.ring

    @property
    def mean(self) -> float:
        """Allowed pairs over causal pairs: the whole sequence's share of causal work."""
        return float(self.rank_work.mean())

    @property
    def busiest(self) -> float:
        """The busiest rank's work over a causal rank's, averaged over the samples."""
        return float(self.rank_work.max(axis=1).mean())

    @property
    def imbalance(self) -> float:
        """Busiest rank over the mean rank: what zigzag's balance loses to the documents."""
        return self.busiest / self.mean

    @property
    def skipped(self) -> float:
        """Share of blocks in which no query sees any key (skipped; their K/V still travel)."""
        return float((self.blocks == 0).mean())

    def phase_seconds(self, block_seconds: float, hop_seconds: float,
                      overlap: float) -> tuple[float, float]:
        """(compute, exposed transfer) seconds of one ring pass, averaged over the samples.

        Each rank computes its blocks in step order, block k in blocks[k] x block_seconds (a
        causal block's time), while the K/V for step k + 1 travel (hop_seconds; none after the
        last step); a transfer hides behind its step's block as far as `overlap` allows, so a
        skipped block exposes its transfer whole. The rank whose pass is longest sets the pace
        of the ring (the ranks meet at every layer): its compute and exposed time are returned.
        """
        compute = self.blocks * block_seconds  # [sample, rank, step]
        exposed = np.zeros_like(compute)
        if self.ring > 1:
            during = compute[:, :, :-1]
            exposed[:, :, :-1] = hop_seconds - overlap * np.minimum(hop_seconds, during)
        work, wait = compute.sum(axis=2), exposed.sum(axis=2)
        slowest = np.argmax(work + wait, axis=1)
        rows = np.arange(len(slowest))
        return float(work[rows, slowest].mean()), float(wait[rows, slowest].mean())


@functools.lru_cache(maxsize=64)
def document_work(hist: Histogram, seq_len: int, ring: int) -> DocumentWork:
    """Sampled block work of packed sequences of `seq_len` on a causal zigzag ring of `ring`
    ranks (with Ulysses, a ring position's group is the unit: it splits heads, not tokens),
    each sequence sharded per document as the trainer shards it on a ring (balanced_slots).

    SAMPLES sequences with seed SEED, fewer (at least MIN_SAMPLES) when the documents are so
    short that a sequence holds more than DOCUMENT_BUDGET / SAMPLES of them: their work then
    varies little from sequence to sequence. On a ring, placing documents is a Python loop, so
    the first BALANCED_SAMPLES of them (fewer when they hold more than PLACEMENT_BUDGET
    documents in all) are sharded per document and give the work's shape over ranks and steps;
    its level, the allowed pairs, is that of all the sequences (a ratio estimate: a few long
    documents make a small sample's level vary, balancing does not change a sequence's total).
    The sequence is cut to a multiple of 2 * ring."""
    length = seq_len - seq_len % (2 * ring)
    lower, upper, _, docs = _buckets(hist)
    per_sequence = max(length / float(docs @ ((lower + upper) / 2)), 1)
    samples = int(max(MIN_SAMPLES, min(SAMPLES, DOCUMENT_BUDGET // per_sequence)))
    rng = np.random.default_rng(SEED)
    causal_block = length * (length + 1) / 2 / ring**2
    starts = [sample_doc_starts(hist, length, rng) for _ in range(samples)]
    blocks = np.stack([zigzag_block_pairs(ring, length, s) for s in starts])
    if ring > 1:
        few = int(max(MIN_SAMPLES, min(BALANCED_SAMPLES, PLACEMENT_BUDGET // per_sequence)))
        shaped = np.stack([zigzag_block_pairs(ring, length, s, balanced=True)
                           for s in starts[:few]])
        blocks = shaped * (blocks.sum() / len(blocks)) / (shaped.sum() / len(shaped))
    return DocumentWork(blocks / causal_block)


# ---------------------------------------------------------------------------------------------
# Where the histogram comes from: the prepared corpus's manifest, else the run file.


def corpus_document_lengths(run: RunSpec, spec_dir: Path | None
                            ) -> tuple[list[DocumentLengthBucket] | None, str | None]:
    """The prepared corpus's histogram (the manifest the prepare job writes beside its token
    shards), validated as data.document_lengths is, and where it came from; (None, None)
    without prepared data, (None, why) for a manifest from before the prepare job wrote one."""
    prepared = run.data.prepared
    if prepared is None:
        return None, None
    path = Path(prepared.path).expanduser()
    manifest = (path if path.is_absolute() else (spec_dir or Path.cwd()) / path) / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        raise ValueError(f"{manifest}: unreadable ({e}); rerun `python -m ray_jobs.prepare --run "
                         "RUN.yaml` to prepare the data again") from None
    buckets = data.get("document_lengths") if isinstance(data, dict) else None
    if buckets is None:
        return None, (f"{manifest} has no document-length histogram (prepared before the "
                      "prepare job wrote one); rerun `python -m ray_jobs.prepare --run RUN.yaml "
                      "--force` to price attention `document` by the corpus")
    try:
        spec = DataSpec.model_validate({"document_lengths": buckets})
    except ValueError as e:
        first = str(e).splitlines()[1:3]
        raise ValueError(f"{manifest}: document_lengths is not a histogram ({'; '.join(first)}); "
                         "rerun `python -m ray_jobs.prepare --run RUN.yaml --force`") from None
    docs = data.get("documents")
    return spec.document_lengths, (f"the prepared corpus's ({manifest}"
                                   + (f", {docs:,} documents" if isinstance(docs, int) else "")
                                   + ")")


def with_corpus_document_lengths(run: RunSpec, spec_dir: Path | None
                                 ) -> tuple[RunSpec, list[str]]:
    """The run with the histogram the planner should price: the prepared corpus's when its
    manifest has one, else data.document_lengths as written; and a note saying which."""
    buckets, source = corpus_document_lengths(run, spec_dir)
    if buckets is not None:
        data = run.data.model_copy(update={"document_lengths": buckets})
        run = run.model_copy(update={"data": data})
        return run, [f"document lengths: {source}, in place of data.document_lengths"]
    notes = [source] if source else []
    if run.data.document_lengths:
        notes.append("document lengths: data.document_lengths of the run file, an assumption "
                     "until the corpus is prepared (its manifest then gives the measured one)")
    return run, notes
