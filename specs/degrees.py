"""ParallelDims: how a stage's workers split the work, one object from the planner to the trainer.

The world is a (dp_replicate, dp_shard, ring) grid of ranks. `ring` ranks split one sequence
(ring attention); the `dp_replicate x dp_shard` rings each train their own sequences (data
parallel). Parameters, gradients and optimizer state are sharded (FSDP2) over `shard` =
dp_shard x ring ranks, and replicated over dp_replicate groups of them (HSDP when > 1): a shard
group keeps its all-gathers among nearby GPUs while still splitting the model state.

    ring_degree          ring          GPUs per ring
    data_parallel_degree dp            rings = dp_replicate x dp_shard
    shard_degree         shard         GPUs a parameter is sharded over = dp_shard x ring

    ulysses_degree       ulysses       GPUs per ring position: a sequence is split over
                                       ring x ulysses GPUs; inside a Ulysses group heads are
                                       split by all-to-all, the ring runs across groups

With Ulysses, a plan's "ring" lists ring x ulysses GPUs, ring position by ring position: each
run of `ulysses` consecutive GPUs is one Ulysses group (put in one fast domain), and the K/V
rings connect the groups' members of the same index. The trainer builds its DeviceMesh from
exactly these numbers and the plan's ring order, and the planner's memory model divides the
model state by `shard`. plan.json and state.json spell them as the user-facing degree keys
(`degree_keys`, `from_degree_keys`), so files written before ParallelDims existed still load.

`resolve_degrees` is the one place 'auto' degrees become numbers (RunSpec validation, the
trainer's preflight, the planner, plans from Ray's placement and the operator's re-planning all
call it); a stage runs on ring x dp workers, which may be fewer than the run's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from math import isqrt
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

MESH_DIMS = ("dp_replicate", "dp_shard", "ring", "ulysses")

# Ceilings on the numbers a spec may hold, so that no input, however absurd, makes validation or
# planning loop for long (each is far above real use and stated in the field descriptions).
MAX_GPUS = 1 << 17       # 131,072: above the largest clusters trained on (~100k GPUs)
MAX_SEQ_LEN = 1 << 24    # 16M tokens per sequence: 16x the 1M-token runs this tool targets
MAX_BATCH = 1 << 20      # sequences per micro-step; a divisor search bounded by its square root
MAX_STEPS = 1 << 30      # optimizer steps in a stage (a billion: no run takes that many)


def divisors(n: int, at_most: int | None = None) -> list[int]:
    """The divisors of `n` (>= 1) up to `at_most`, ascending, by trial up to sqrt(n): the only way
    degrees are enumerated, so the work grows with sqrt(n), never with a user's number itself.

    >>> divisors(12), divisors(12, at_most=5)
    ([1, 2, 3, 4, 6, 12], [1, 2, 3, 4])
    """
    if n < 1:
        return []
    small = [d for d in range(1, isqrt(n) + 1) if n % d == 0]
    found = sorted(set(small) | {n // d for d in small})
    return found if at_most is None else [d for d in found if d <= at_most]


class ParallelDims(BaseModel):
    """Degrees of one stage; their product is the world size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dp_replicate: int = Field(1, gt=0, le=MAX_GPUS, description="Replicas of the sharded model "
                              "state (HSDP); at most 2**17, the GPU ceiling.")
    dp_shard: int = Field(1, gt=0, le=MAX_GPUS, description="Rings a shard group spans; at most "
                          "2**17, the GPU ceiling.")
    ring: int = Field(1, gt=0, le=MAX_GPUS, description="Ranks per ring (sequence split); at "
                      "most 2**17, the GPU ceiling.")
    ulysses: int = Field(1, ge=1, le=MAX_GPUS, description="Ranks of a Ulysses group (heads split "
                         "by all-to-all) at each ring position; at most 2**17, the GPU ceiling.")

    @classmethod
    def of(cls, ring: int, dp: int, shard: int, ulysses: int = 1) -> ParallelDims:
        """From the user-facing degrees (ring_degree, data_parallel_degree, shard_degree,
        ulysses_degree)."""
        bad = [f"{k} ({v!r})" for k, v in (("ring_degree", ring), ("data_parallel_degree", dp),
                                           ("shard_degree", shard), ("ulysses_degree", ulysses))
               if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be a whole number of GPUs, 1 or more")
        seq = ring * ulysses
        if problem := shard_problem(shard, ring, ulysses):
            raise ValueError(problem)
        what = f"ring_degree ({ring})" if ulysses == 1 else (
            f"ring_degree x ulysses_degree ({ring} x {ulysses} = {seq})")
        if dp % (shard // seq):
            options = [seq * d for d in divisors(dp)]
            raise ValueError(f"shard_degree ({shard}) must be {what} times a "
                             f"divisor of data_parallel_degree ({dp}); use one of {options}")
        return cls(dp_replicate=dp // (shard // seq), dp_shard=shard // seq, ring=ring,
                   ulysses=ulysses)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ring * self.ulysses

    @property
    def dp(self) -> int:
        """Data-parallel ways: rings, each training its own sequences."""
        return self.dp_replicate * self.dp_shard

    @property
    def shard(self) -> int:
        """Ranks a parameter is sharded over (FSDP2's shard group)."""
        return self.dp_shard * self.ring * self.ulysses

    @property
    def sequence(self) -> int:
        """Ranks one sequence is split over (ring x ulysses)."""
        return self.ring * self.ulysses

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        return (self.dp_replicate, self.dp_shard, self.ring, self.ulysses)

    def problems(self, *, seq_len: int, batch_size: int, heads: int | None = None,
                 kv_heads: int | None = None) -> list[str]:
        """What a stage's shape makes impossible for these degrees, one line each with a fix."""
        out = [p for p in [zigzag_problem(seq_len, self.ring, self.ulysses)] if p]
        if batch_size % self.dp:
            out.append(f"batch_size ({batch_size}) must be a multiple of data_parallel_degree "
                       f"({self.dp}); use batch_size {-(-batch_size // self.dp) * self.dp}")
        if heads is not None and kv_heads is not None and heads % kv_heads:
            out.append(f"num_attention_heads ({heads}) must be a multiple of "
                       f"num_key_value_heads ({kv_heads})")
        elif heads is not None and kv_heads is not None:
            out += ulysses_problems(heads, kv_heads, self.ulysses)
        return out

    def rings_grid(self, rings: list[list[int]]) -> list[list[list[list[int]]]]:
        """Ranks as the (dp_replicate, dp_shard, ring, ulysses) grid from a plan's rings in plan
        order: ring i is replica i // dp_shard, shard slot i % dp_shard (so consecutive rings
        share a shard group, and the planner puts consecutive rings side by side); within a
        ring, each run of `ulysses` ranks is one ring position's Ulysses group."""
        if len(rings) != self.dp or any(len(r) != self.sequence for r in rings):
            size = str(self.ring) if self.ulysses == 1 else f"{self.ring} x {self.ulysses}"
            raise ValueError(f"the plan has {len(rings)} rings of sizes "
                             f"{sorted({len(r) for r in rings})}, the degrees say {self.dp} "
                             f"rings of {size}")
        u = self.ulysses
        grid = [[r[p * u:(p + 1) * u] for p in range(self.ring)] for r in rings]
        return [grid[i * self.dp_shard:(i + 1) * self.dp_shard]
                for i in range(self.dp_replicate)]

    def degree_keys(self) -> dict[str, int]:
        """The layout in the user-facing keys plan.json and state.json have always carried."""
        return {"ring_degree": self.ring, "dp_degree": self.dp, "shard_degree": self.shard,
                "ulysses_degree": self.ulysses}

    @classmethod
    def from_degree_keys(cls, doc: Mapping[str, Any]) -> ParallelDims:
        """Back from `degree_keys` (older files may lack shard_degree, null meaning a
        sequence's GPUs, and ulysses_degree); the ValueError names the numbers and a fix."""
        ring, dp, ulysses = (doc.get("ring_degree", 1), doc.get("dp_degree", 1),
                             doc.get("ulysses_degree", 1))
        return cls.of(ring, dp, doc.get("shard_degree") or ring * ulysses, ulysses)

    def label(self) -> str:
        """A table cell: 8 x 1 (ring x dp), or 4u2 x 1 with Ulysses (a ring of 4 groups of 2)."""
        ring = f"{self.ring}" if self.ulysses == 1 else f"{self.ring}u{self.ulysses}"
        return f"{ring} x {self.dp}"

    def describe(self) -> str:
        ring = f"ring {self.ring}" if self.ulysses == 1 else (
            f"ring {self.ring} x ulysses {self.ulysses}")
        parts = [ring, f"dp {self.dp}", f"shard {self.shard}"]
        if self.dp_replicate > 1:
            parts.append(f"{self.dp_replicate} replicas (HSDP)")
        return " x ".join(parts[:2]) + ", " + ", ".join(parts[2:])


def shard_problem(shard: int, ring: int, ulysses: int = 1) -> str | None:
    """The one rule for a shard group: whole sequences' GPUs (ring x ulysses) shard the model
    state together; None when shard_degree is a multiple of them, else the line naming the fix."""
    seq = ring * ulysses
    if shard % seq == 0:
        return None
    what = f"ring_degree ({ring})" if ulysses == 1 else (
        f"ring_degree x ulysses_degree ({ring} x {ulysses} = {seq})")
    whose = "a ring's" if ulysses == 1 else "a sequence's"
    return (f"shard_degree ({shard}) must be a multiple of {what}: {whose} GPUs shard the model "
            f"together; use {seq * max(1, round(shard / seq))}")


def zigzag_problem(seq_len: int, ring: int, ulysses: int = 1) -> str | None:
    """The one rule for a sequence's split: zigzag sharding cuts seq_len into 2 x ring x ulysses
    chunks (a chunk pair per rank); None when it divides, else the line naming the fix."""
    n = 2 * ring * ulysses
    if ring * ulysses == 1 or seq_len % n == 0:
        return None
    if ulysses > 1:
        return (f"seq_len ({seq_len}) must be divisible by 2 x ring_degree x ulysses_degree ({n}) "
                f"for zigzag sharding and the Ulysses split; use {-(-seq_len // n) * n} or other "
                "degrees")
    return (f"seq_len ({seq_len}) must be divisible by 2 x ring_degree ({n}) for zigzag "
            f"sharding; use {-(-seq_len // n) * n} or another ring_degree")


def ulysses_problems(heads: int, kv_heads: int, ulysses: int) -> list[str]:
    """What a Ulysses degree cannot do with these head counts, one line each with the fix: each
    rank takes heads / ulysses query heads, and a whole share of the K/V heads (split when the
    degree divides them, each replicated when it is a multiple of them)."""
    out = []
    if heads % ulysses:
        out.append(f"ulysses_degree ({ulysses}) must divide the {heads} query heads; use one of "
                   f"{divisors(heads)}")
    elif kv_heads % ulysses and ulysses % kv_heads:
        out.append(f"ulysses_degree ({ulysses}) must divide the {kv_heads} key/value heads or be "
                   f"a multiple of them (then each is replicated); use a divisor or multiple of "
                   f"{kv_heads}")
    return out


def kv_replication_note(kv_heads: int, ulysses: int) -> list[str]:
    """The note a plan carries when a Ulysses degree exceeds the K/V heads."""
    if ulysses <= kv_heads:
        return []
    return [f"ulysses {ulysses} exceeds the {kv_heads} key/value heads: each is replicated "
            f"{ulysses // kv_heads} times (its K/V bytes in the all-to-alls and the ring too)"]


class DegreeError(ValueError):
    """Degrees that cannot be laid out on the workers; the message names the numbers and a fix."""


class NothingFits(DegreeError):
    """Every layout the degrees allow was tried and none fits memory."""

    def __init__(self, message: str, tried: list[tuple[int, int]]):
        super().__init__(message)
        self.tried = tried


class StageDegrees(Protocol):
    """What resolving needs of a stage (specs.run.StageSpec has it)."""

    name: str
    seq_len: int
    batch_size: int
    ring_degree: int | str
    data_parallel_degree: int | str
    shard_degree: int | str
    ulysses_degree: int | str


def ulysses_of(stage: StageDegrees) -> int:
    """The stage's Ulysses degree where a number is needed before planning: 'auto' is decided by
    the topology planner (on a cluster description) and counts as 1 until then."""
    u = getattr(stage, "ulysses_degree", 1)
    return 1 if u == "auto" else u


def degree_options(stage: StageDegrees, world: int, offer: str, *, strict: bool = True,
                   grow: str = "add workers") -> list[tuple[int, int]]:
    """Every (ring, dp) the stage's degrees allow on `world` workers, in preference order: the
    smallest ring first (least traffic per token), and for each ring the most rings side by side.

    A given degree is kept; 'auto' ring_degree ranges over the rings that zigzag-split seq_len,
    'auto' data_parallel_degree over the divisors of batch_size that fit the workers. Each ring
    position takes ulysses_degree workers. `strict`: a given ring_degree with 'auto' rings must
    divide the workers, so that none is left idle unnoticed. `offer` says where `world` comes
    from ("resources.workers is 8"), `grow` how to have more; DegreeError when nothing is left,
    naming the numbers and the fix."""
    r, d, seq, batch = (stage.ring_degree, stage.data_parallel_degree, stage.seq_len,
                        stage.batch_size)
    u = ulysses_of(stage)
    per = "" if u == 1 else f" x ulysses_degree {u}"
    if u > world:
        raise DegreeError(f"ulysses_degree {u} needs {u} workers, but {offer}; lower it or {grow}")
    positions = world // u  # ring positions the workers can fill
    if r != "auto" and d != "auto":
        if r * d * u > world:
            names = "ring_degree x data_parallel_degree" + ("" if u == 1 else " x ulysses_degree")
            nums = f"{r} x {d}" + ("" if u == 1 else f" x {u}")
            raise DegreeError(f"{names} = {nums} = {r * d * u} workers, but {offer}; lower the "
                              f"degrees or {grow}")
        problems = ParallelDims(ring=r, dp_shard=d, ulysses=u).problems(seq_len=seq,
                                                                         batch_size=batch)
        if problems:
            raise DegreeError(problems[0])
        return [(r, d)]
    if r != "auto":
        if r * u > world:
            raise DegreeError(f"ring_degree {r}{per} needs {r * u} workers, but {offer}; lower "
                              f"it or {grow}")
        if strict and positions % r:
            fits = [x for x in divisors(positions) if zigzag_problem(seq, x, u) is None]
            raise DegreeError(f"ring_degree {r}{per} does not divide the {world} workers "
                              f"({offer}); use one that does (e.g. {fits[-4:]}) or set "
                              "data_parallel_degree to leave workers idle on purpose")
    if d != "auto" and d * u > world:
        raise DegreeError(f"data_parallel_degree {d}{per} needs {d * u} workers, but {offer}; "
                          f"lower it or {grow}")
    rings = [r] if r != "auto" else _zigzag_rings(seq, u, positions)
    batch_divisors = divisors(batch) if d == "auto" else []
    options = []
    for x in rings:
        if problem := zigzag_problem(seq, x, u):
            raise DegreeError(problem)
        dps = [d] if d != "auto" else [y for y in reversed(batch_divisors) if y <= positions // x]
        options += [(x, y) for y in dps if x * y <= positions]
    return options


def _zigzag_rings(seq: int, ulysses: int, at_most: int) -> list[int]:
    """The ring degrees up to `at_most` that zigzag-split `seq` tokens with this Ulysses degree,
    ascending: 1 alone without Ulysses, else the divisors of seq / (2 x ulysses)."""
    chunks = 2 * ulysses
    rings = divisors(seq // chunks, at_most) if seq % chunks == 0 else []
    if ulysses == 1 and 1 not in rings:
        rings.insert(0, 1)
    return rings


def resolve_degrees(stage: StageDegrees, world: int, offer: str, *,
                    shard_for: Callable[[int, int], ParallelDims | None] | None = None,
                    strict: bool = True, grow: str = "add workers"
                    ) -> tuple[ParallelDims, list[str]]:
    """The stage's layout on `world` workers, with notes on every choice made for it.

    With a memory model (`shard_for(ring, dp)`: the layout of that ring x dp whose shard group
    fits memory, or None), the first of `degree_options` that fits; without one (plain workers,
    no cluster description), the largest ring: the sequence split as thinly as the workers
    allow. The one resolver of 'auto' degrees: RunSpec validation, the trainer's preflight, the
    topology planner, plans from Ray's placement and the operator's re-planning all call it."""
    options = degree_options(stage, world, offer, strict=strict, grow=grow)
    uly = ulysses_of(stage)
    auto = stage.ring_degree == "auto" or stage.data_parallel_degree == "auto"
    notes = []
    if shard_for is None:
        big = max(x for x, _ in options)
        ring, dp = next((x, y) for x, y in options if x == big)
        shard = ring * uly if stage.shard_degree == "auto" else stage.shard_degree
        why = "no memory model without a cluster description: the largest ring"
        try:
            dims = ParallelDims.of(ring, dp, shard, uly)
        except ValueError as e:
            raise DegreeError(str(e)) from None
    else:
        found, skip = None, set()
        for x, y in options:
            if x in skip:
                continue
            found = shard_for(x, y)
            if found is not None:
                break
            skip.add(x)  # fewer rings only shrink the shard groups: try the next ring
        if found is None:
            raise NothingFits(f"no layout of {stage.name!r} on {world} workers fits memory "
                              f"(tried ring x dp {sorted(set(options))[:6]}); shorten seq_len "
                              "or add GPUs", tried=options)
        dims, ring, dp = found, found.ring, found.dp
        why = "the smallest ring that fits memory, then the most rings the workers allow"
    if auto:
        notes.append(f"auto degrees: ring {ring} x dp {dp}, shard {dims.shard} ({why}, with "
                     f"batch_size {stage.batch_size} divisible by dp)")
    elif stage.shard_degree == "auto" and dims.shard != dims.sequence:
        notes.append(f"auto shard_degree: {dims.shard} GPUs ({dims.shard // ring} rings) shard "
                     "the model state: the smallest group whose memory fits")
    if uly > 1:
        notes.append(f"ulysses {uly}: each ring position's {uly} GPUs split the heads "
                     "(all-to-all), a sequence spans ring x ulysses = "
                     f"{dims.sequence} GPUs")
    if dims.world < world:
        layout = f"ring {ring} x dp {dp}" + ("" if uly == 1 else f" x ulysses {uly}")
        notes.append(f"uses {dims.world} of {world} workers ({layout}); the other "
                     f"{world - dims.world} stay idle in this stage")
    return dims, notes


# Activation checkpointing of the decoder layers: `full` keeps each layer's input and recomputes
# the layer in backward (ring attention included: its K/V travel the ring again), `attention`
# recomputes all but ring attention (its output and log-sum-exp are kept), `none` recomputes
# nothing.
CheckpointPolicy = Literal["full", "attention", "none"]
CHECKPOINT_POLICIES: tuple[str, ...] = ("full", "attention", "none")

# What a token of a packed sequence attends to: `causal` every earlier token of the sequence,
# whichever document it belongs to; `document` only the earlier tokens of its own document.
# RoPE positions: `continuous` along the sequence, `per_document` from 0 at each document.
# Per-stage choices of the RunSpec that plan.json and state.json record beside the layout.
AttentionMasking = Literal["causal", "document"]
PositionIds = Literal["continuous", "per_document"]
