"""Per-rank bodies of the preflight tests, run in gloo worlds by tests.support.worlds."""

from __future__ import annotations

import torch

from ray_jobs.preflight.numerics import NumericsShape, attention_numerics
from ray_jobs.train.parallelize import build_mesh
from specs.degrees import ParallelDims


def numerics_world(rank: int, world: int, rings: list[list[int]], ulysses: int, dtype: str,
                   data_rings: list[list[int]] | None = None) -> dict | None:
    """The numerics check on a layout of `rings` (global ranks in ring order, each ring's
    Ulysses groups one after another). `data_rings`: where the sequence is cut instead (a
    layout's data side that disagrees with its rings: the check must catch it)."""
    ring = len(rings[0]) // ulysses
    dims = ParallelDims.of(ring, len(rings), ring * ulysses, ulysses)
    layout = build_mesh(dims, rings, "cpu")
    position = None
    if data_rings is not None:
        mine = next(r for r in data_rings if rank in r).index(rank)
        position = (mine // ulysses, mine % ulysses)
    shape = NumericsShape(heads=4, kv_heads=2, head_dim=16, dtype=dtype)
    return attention_numerics(layout, shape, torch.device("cpu"), shard_position=position)


def numerics_cases_world(rank: int, world: int) -> dict:
    """On 4 ranks: a ring of 4 in fp32 and bf16, Ulysses 2 x ring 2, two rings of 2 listed
    against the global numbering, and one ring listed out of order (the data cut in plan order,
    the ring around [0, 2, 1, 3]): each case's rank-0 result by name."""
    plain = [[0, 1, 2, 3]]
    cases = {"ring4 float32": (plain, 1, "float32", None),
             "ring4 bfloat16": (plain, 1, "bfloat16", None),
             "ulysses2 x ring2": (plain, 2, "float32", None),
             "two rings": ([[3, 0], [1, 2]], 1, "float32", None),
             "out of order": ([[0, 2, 1, 3]], 1, "float32", plain)}
    return {name: numerics_world(rank, world, *args) for name, args in cases.items()}


def probe_world(rank: int, world: int) -> dict:
    """Every probe on 3 ranks with small messages, and the refusals that need a world."""
    import pytest
    import torch.distributed as dist

    from ray_jobs.preflight.probe import (
        gather_records,
        time_collective,
        time_pairs,
        time_ring_hops,
    )
    from ray_jobs.preflight.run import _agree

    cpu = torch.device("cpu")
    out = {"ring": time_ring_hops([0, 1, 2], 4096, 3, cpu),
           "alone": time_ring_hops([rank], 4096, 2, cpu),
           "pairs": time_pairs([[(0, 2)], [(1, 0), (2, 1)]], 4096, 2, cpu),
           "world": {op: time_collective(None, op, 3000, 2, cpu)
                     for op in ("all_reduce", "all_gather", "reduce_scatter")}}
    pair = dist.new_group([0, 1])  # every rank creates it; rank 2 is outside
    out["pair group"] = time_collective(pair, "all_gather", 4096, 2, cpu)
    out["gathered"] = gather_records([{"rank": rank}, {"rank": rank, "second": True}])
    with pytest.raises(ValueError, match="is not in its ring"):
        time_ring_hops([r for r in range(world) if r != rank], 4096, 1, cpu)
    with pytest.raises(ValueError, match="a pair joins two different ranks"):
        time_pairs([[(1, 1)]], 4096, 1, cpu)
    # what rank 0 decides reaches every rank; its failure too, instead of a hang
    out["agreed"] = _agree(lambda: ("batches", dist.get_rank()))
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        _agree(lambda: 1 / 0)
    return out
