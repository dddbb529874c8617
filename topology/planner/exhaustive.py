"""Exhaustive placement search: every partition into rings and every ring order (the yardstick)."""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Protocol

from topology.cost import StageShape
from topology.planner.evaluation import Evaluated


class Placer(Protocol):
    """What the exhaustive search asks of a Planner (whose module builds on this one)."""

    def evaluate(self, rings: list[list[str]], shape: StageShape) -> Evaluated: ...

    def locality_order(self) -> list[str]: ...


def plan_exhaustive(planner: Placer, gpus: list[str], shape: StageShape) -> Evaluated:
    """The best placement of shape.ring x shape.dp on exactly `gpus` by trying every partition
    and ring order (the yardstick for small clusters; factorial time)."""
    best = None
    for groups in partitions(tuple(range(len(gpus))), shape.ring, limit=10**7):
        for orders in itertools.product(*[cycles(gr) for gr in groups]):
            ev = planner.evaluate([[gpus[i] for i in o] for o in orders], shape)
            if best is None or ev.key() < best.key():
                best = ev
    return best


def plan_exhaustive_any(planner: Placer, shape: StageShape) -> Evaluated:
    """`plan_exhaustive` over every choice of the stage's GPUs among the cluster's too."""
    total = shape.ring * shape.ulysses * shape.dp
    return min((plan_exhaustive(planner, list(gpus), shape)
                for gpus in itertools.combinations(planner.locality_order(), total)),
               key=lambda ev: ev.key())


def exhaustive_count(n_gpus: int, total: int, ring: int) -> int:
    """Placements `plan_exhaustive_any` tries: choices of `total` of `n_gpus` GPUs, times
    their partitions into rings of `ring`, times each ring's orders."""
    k = total // ring
    return (math.comb(n_gpus, total) * math.factorial(total)
            // (ring**k * math.factorial(k)))


def cycles(group: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Distinct ring orders of a group: fix the first element; a ring and its reverse differ
    (transfers go one way), so all (k-1)! orders."""
    first, rest = group[0], group[1:]
    return [(first, *p) for p in itertools.permutations(rest)]


def partitions(items: tuple[int, ...], size: int, limit: int):
    """Partitions of `items` into groups of `size` (first group holds items[0]); stops after
    `limit` partitions (the caller then falls back to chunks)."""
    count = 0

    @lru_cache(maxsize=None)
    def rec(rest: tuple[int, ...]) -> list[tuple[tuple[int, ...], ...]]:
        if not rest:
            return [()]
        out = []
        for others in itertools.combinations(rest[1:], size - 1):
            group = (rest[0], *others)
            remaining = tuple(x for x in rest if x not in group)
            for tail in rec(remaining):
                out.append((group, *tail))
        return out

    for p in rec(items):
        count += 1
        if count > limit:
            return
        yield p
