"""Ring sequence sharding: zigzag (causal) and contiguous shards, their inverses, the block plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ray_jobs.ring_attention.comm import Ring, resolve_ring

_ALL = slice(None)


def _check_split(length: int, parts: int, rank: int, world: int, what: str) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1, "
                         f"got rank={rank}, world={world}")
    if length % parts != 0:
        raise ValueError(
            f"{what} needs the sequence length ({length}) divisible by {parts}; pad or crop the "
            f"sequence to a multiple of {parts}"
        )


def zigzag_shard(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Ring rank `rank`'s zigzag shard of `x` along `dim`: chunks rank and 2*world-1-rank of
    2*world.

    Works for any tensor aligned with the sequence (hidden states, q/k/v, input ids, position
    ids, labels). Returns a new contiguous tensor of length x.size(dim) / world along `dim`.
    """
    _check_split(x.size(dim), 2 * world, rank, world, "zigzag sharding")
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim).contiguous()


def _shards_in_ring_order(x: torch.Tensor, world: int, group) -> list[torch.Tensor]:
    if isinstance(x, (list, tuple)):
        if len(x) != world:
            raise ValueError(f"got {len(x)} shards for world={world}; "
                             "pass one shard per ring rank, in ring order")
        return list(x)
    ring = resolve_ring(group)
    if ring.size != world:
        raise ValueError(f"world={world} but the ring group has {ring.size} ranks "
                         f"{list(ring.ranks)}; pass world=ring size")
    x = x.contiguous()
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x, group=ring.group)
    # all_gather orders by group rank (sorted global ranks); reorder to ring order.
    group_ranks = (dist.get_process_group_ranks(ring.group) if ring.group is not None
                   else list(range(world)))
    by_global = dict(zip(group_ranks, gathered))
    return [by_global[g] for g in ring.ranks]


def zigzag_unshard(
    x: "torch.Tensor | Sequence[torch.Tensor]",
    dim: int,
    world: int,
    group: "Ring | dist.ProcessGroup | None" = None,
) -> torch.Tensor:
    """Reassemble the full sequence from zigzag shards.

    x is either the list of all shards in ring order (no communication), or this rank's shard,
    in which case the shards are all-gathered over `group` (a Ring, a process group whose rank
    order is the ring order, or None for the world). Not differentiable; for checks and eval.
    """
    shards = _shards_in_ring_order(x, world, group)
    chunks: list[torch.Tensor | None] = [None] * (2 * world)
    for rank, shard in enumerate(shards):
        first, second = shard.chunk(2, dim=dim)
        chunks[rank], chunks[2 * world - 1 - rank] = first, second
    return torch.cat(chunks, dim=dim)


def zigzag_position_ids(seq_len: int, rank: int, world: int, device=None) -> torch.Tensor:
    """Global positions (long, shape (seq_len / world,)) of ring rank `rank`'s zigzag shard."""
    return zigzag_shard(torch.arange(seq_len, device=device), 0, rank, world)


def contiguous_shard(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Ring rank `rank`'s contiguous shard (block `rank` of `world`), the non-causal ring layout."""
    _check_split(x.size(dim), world, rank, world, "contiguous sharding")
    return x.chunk(world, dim=dim)[rank].contiguous()


def contiguous_unshard(x: "torch.Tensor | Sequence[torch.Tensor]", dim: int, world: int,
                       group=None) -> torch.Tensor:
    """Inverse of contiguous_shard, from a list of shards in ring order or by all-gather over
    `group`."""
    return torch.cat(_shards_in_ring_order(x, world, group), dim=dim)


@dataclass(frozen=True)
class BlockPlan:
    """Rows of the local queries and the visiting K/V that one ring step attends, and its mask."""

    q_rows: slice
    kv_rows: slice
    causal: bool


def plan_block(rank: int, src: int, local_len: int, causal: bool) -> BlockPlan:
    """What rank `rank` computes against the K/V shard of ring rank `src` (see ring.py's module
    docstring: the zigzag layout makes every off-diagonal block half a block, without a mask)."""
    if not causal:
        return BlockPlan(_ALL, _ALL, False)
    half = local_len // 2
    if src == rank:
        return BlockPlan(_ALL, _ALL, True)
    if src < rank:
        return BlockPlan(_ALL, slice(0, half), False)
    return BlockPlan(slice(half, None), _ALL, False)
