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
