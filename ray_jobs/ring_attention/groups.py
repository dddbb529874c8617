"""Ring and data-parallel process groups built from a plan's ordered rings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist

from ray_jobs.ring_attention.comm import Ring


@dataclass(frozen=True)
class RingGroups:
    """This rank's place in a (ring x data-parallel) layout.

    ring: the ring this rank is in, with its order (pass it as `group=` to ring_attention).
    dp_group: the ranks at the same ring position in every ring (gradient all-reduce).
    dp_rank: index of this rank's ring in the plan (use it to pick the data shard); it can
    differ from the rank inside dp_group, whose ranks torch sorts.
    """

    ring: Ring
    ring_rank: int
    ring_size: int
    dp_group: dist.ProcessGroup
    dp_rank: int
    dp_size: int

    @property
    def ring_group(self) -> dist.ProcessGroup:
        return self.ring.group


def check_rings(rings: Sequence[Sequence[int]], world_size: int) -> list[tuple[int, ...]]:
    """Validate a plan's rings against the world: equal lengths, each rank exactly once."""
    rings = [tuple(int(r) for r in ring) for ring in rings]
    if not rings or not rings[0]:
        raise ValueError(f"rings must be a non-empty list of non-empty rank lists, got {rings}")
    lengths = sorted({len(ring) for ring in rings})
    if len(lengths) != 1:
        raise ValueError(f"all rings must have the same size, got sizes {lengths} in {rings}")
    flat = sorted(r for ring in rings for r in ring)
    if flat != list(range(world_size)):
        raise ValueError(
            f"rings {rings} must hold every global rank 0..{world_size - 1} exactly once "
            f"(world size {world_size}); fix the plan's ring groups"
        )
    return rings


def build_ring_groups(rings: Sequence[Sequence[int]]) -> RingGroups:
    """Create one ring group per ring and one DP group per ring position; return this rank's view.

    Every rank must call this with the same `rings` (new_group is collective and must be called
    by all ranks for every group in the same order): rings first, in plan order, then the DP
    groups by ring position. Example: rings [[0, 2], [1, 3]] give rings {0->2}, {1->3} and DP
    groups {0, 1}, {2, 3}, whatever the global numbering.
    """
    rings = check_rings(rings, dist.get_world_size())
    me = dist.get_rank()
    mine: Ring | None = None
    dp_group = None
    ring_index = position = -1
    for index, ranks in enumerate(rings):
        group = dist.new_group(ranks=list(ranks))
        if me in ranks:
            mine, ring_index, position = Ring(group=group, ranks=ranks), index, ranks.index(me)
    for pos in range(len(rings[0])):
        group = dist.new_group(ranks=[ranks[pos] for ranks in rings])
        if pos == position:
            dp_group = group
    return RingGroups(
        ring=mine, ring_rank=position, ring_size=len(rings[0]),
        dp_group=dp_group, dp_rank=ring_index, dp_size=len(rings),
    )


def apply_gradient_reduction(parameters, groups: RingGroups) -> None:
    """Make every rank's .grad the full-batch gradient, in place.

    Sum over the ring (each rank's ring_causal_lm_loss backpropagates only its share of the
    sequence), then average over data parallel (each ring saw its own batch).
    """
    for param in parameters:
        if param.grad is None:
            continue
        dist.all_reduce(param.grad, group=groups.ring_group)
        if groups.dp_size > 1:
            dist.all_reduce(param.grad, group=groups.dp_group)
            param.grad.div_(groups.dp_size)
