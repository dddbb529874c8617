"""The local search's moves: placements one step from a given one, most promising first."""

from __future__ import annotations

import itertools
import random

import numpy as np

from topology.cost import StageShape
from topology.graph import split_gpu_vertex
from topology.planner.evaluation import Evaluated
from topology.planner.orders import Orders
from topology.routes import route_table

FULL_NEIGHBOURHOOD = 32  # up to this many GPUs every move is tried; above, moves around hot hops


class Moves:
    """Moves on one cluster's placements: swap two GPUs, in one ring or across rings (a
    partition change); swap a GPU with an unused one; swap whole runs of a ring that share a
    PCIe switch, a socket or a node with equal runs of another ring (reversed or not); move
    such a run, or the whole ring, to unused GPUs of one domain; rotate a ring (other
    data-parallel peers); reverse a segment of a ring (2-opt); move a segment of 1-3 GPUs
    elsewhere in its ring (or-opt)."""

    def __init__(self, orders: Orders):
        self.orders = orders

    def generate(self, ev: Evaluated, flat: list[str], spare: list[str], shape: StageShape,
                 rng: random.Random):
        """Candidate moves from placement `flat` (rings back to back) and the unused GPUs:
        (kind, new flat, new unused), lazily, most promising first. Up to 16 GPUs the moves
        start at every position; above, at the ends of the slowest hops, partners on the
        hop's nodes first and then a sample drawn from `rng`."""
        n, total = shape.ring * shape.ulysses, len(flat)
        small = total <= FULL_NEIGHBOURHOOD
        node = [split_gpu_vertex(v)[0] for v in flat]
        for h in hot_positions(ev, shape, total):
            ring = h // n
            lo = ring * n
            near = {node[lo + (h - lo - 1) % n], node[lo + (h - lo + 1) % n], node[h]}
            others = [q for q in range(total) if q != h]
            if not small:  # GPUs on the hop's nodes first, then a sample of the rest
                close = [q for q in others if node[q] in near]
                far = [q for q in others if node[q] not in near]
                others = close[:64] + rng.sample(far, min(len(far), 32))
            for q in others:
                cand = flat[:]
                cand[h], cand[q] = cand[q], cand[h]
                yield ("swap in a ring" if q // n == ring else "swap across rings"), cand, spare
            yield from _unused_swaps(flat, h, spare, near, rng)
            yield from self._unit_swaps(flat, h, n, spare)
            yield from self._unused_unit_swaps(flat, h, n, spare)
            yield from _in_ring_moves(flat, h, n, spare)

    def _unused_unit_swaps(self, flat: list[str], h: int, n: int, spare: list[str]):
        """Replace the run of position h's ring that shares its switch / socket / node (and
        the whole ring) by as many unused GPUs of one domain, in locality order or reversed:
        moves a ring, or a node's share of it, to better GPUs in one step (one GPU at a time
        would pass through worse placements)."""
        if not spare:
            return
        ordered = sorted(spare, key=self.orders.locality_rank().get)
        for a, b in self._runs_of(flat, h, n):
            # 48 sets bound the moves per run on big clusters; the closest domains come first
            for new in itertools.islice(self._unused_sets(ordered, b - a), 48):
                for order in (list(new), list(new)[::-1]):
                    cand = flat[:a] + order + flat[b:]
                    rest = [v for v in spare if v not in new] + flat[a:b]
                    yield "move a run to unused GPUs", cand, rest

    def _runs_of(self, flat: list[str], h: int, n: int) -> list[tuple[int, int]]:
        """The [start, end) positions of h's run in its ring sharing its PCIe switch, its
        socket, its node, then the whole ring; each once."""
        index = route_table(self.orders.router).index
        lo, hi = h // n * n, h // n * n + n
        runs = []
        for dom in self.orders.domains()[:3]:
            key = [int(dom[index[v]]) for v in flat[lo:hi]]
            a = b = h - lo
            while a > 0 and key[a - 1] == key[h - lo]:
                a -= 1
            while b + 1 < n and key[b + 1] == key[h - lo]:
                b += 1
            runs.append((lo + a, lo + b + 1))
        runs.append((lo, hi))
        return list(dict.fromkeys(runs))

    def _unused_sets(self, ordered: list[str], size: int) -> dict[tuple[str, ...], None]:
        """Sets of `size` unused GPUs of one domain (of any level), the first of each domain
        in `ordered`; each set once, in order of discovery."""
        index = route_table(self.orders.router).index
        choices: dict[tuple[str, ...], None] = {}
        for dom in self.orders.domains():
            by_domain: dict[int, list[str]] = {}
            for v in ordered:
                by_domain.setdefault(int(dom[index[v]]), []).append(v)
            for gpus in by_domain.values():
                if len(gpus) >= size:
                    choices[tuple(gpus[:size])] = None
        return choices

    def _unit_swaps(self, flat: list[str], h: int, n: int, spare: list[str]):
        """Swap the run of position h's ring that shares its PCIe switch / socket / node with
        every equal run of another ring (as is and reversed): moves whole switch pairs,
        socket halves and nodes between rings."""
        index = route_table(self.orders.router).index
        doms = self.orders.domains()[:3]
        ring = h // n
        for level, dom in zip(("PCIe-switch", "socket", "node"), doms):
            key = [int(dom[index[v]]) for v in flat]
            a = h
            while a > ring * n and key[a - 1] == key[h]:
                a -= 1
            b = h
            while b + 1 < ring * n + n and key[b + 1] == key[h]:
                b += 1
            size = b - a + 1
            if size < 2 or size == n:
                continue
            for other in range(len(flat) // n):
                if other == ring:
                    continue
                s = other * n
                while s + size <= other * n + n:
                    if len(set(key[s:s + size])) == 1:
                        for rev in (False, True):
                            unit = flat[s:s + size][::-1] if rev else flat[s:s + size]
                            mine = flat[a:b + 1][::-1] if rev else flat[a:b + 1]
                            cand = flat[:]
                            cand[a:b + 1], cand[s:s + size] = unit, mine
                            yield f"swap a whole {level} run across rings", cand, spare
                        s += size
                    else:
                        s += 1


def hot_positions(ev: Evaluated, shape: StageShape, total: int) -> list[int]:
    """Ring positions at the ends of the slowest K/V hops first (all positions, slowest
    first, on small placements), then those whose hops cross the highest loaded tier."""
    pos = np.arange(total).reshape(shape.dp, shape.ring, shape.ulysses)
    pos = pos.transpose(0, 2, 1).reshape(-1, shape.ring)
    src, dst = pos.ravel(), np.roll(pos, -1, axis=1).ravel()
    times = np.asarray(ev.ring.hop_seconds)
    order = np.argsort(-times, kind="stable")
    if total > FULL_NEIGHBOURHOOD // 2:
        order = order[:4]
    out = list(dict.fromkeys(int(x) for f in order for x in (src[f], dst[f])))
    return out or list(range(total))


def _unused_swaps(flat: list[str], h: int, spare: list[str], near: set[str],
                  rng: random.Random):
    """Position h's GPU swapped with each unused one; among many, those on the hop's nodes
    (`near`) and a sample of the rest."""
    pool = list(range(len(spare)))
    if len(spare) > FULL_NEIGHBOURHOOD:
        close = [i for i in pool if split_gpu_vertex(spare[i])[0] in near]
        far = [i for i in pool if split_gpu_vertex(spare[i])[0] not in near]
        pool = close[:32] + rng.sample(far, min(len(far), FULL_NEIGHBOURHOOD))
    for i in pool:
        cand, rest = flat[:], spare[:]
        cand[h], rest[i] = rest[i], cand[h]
        yield "swap with an unused GPU", cand, rest


def _in_ring_moves(flat: list[str], h: int, n: int, spare: list[str]):
    """Moves inside position h's ring: rotations, 2-opt reversals from h, or-opt moves of
    h's segment of 1-3 GPUs."""
    lo, hi = h // n * n, h // n * n + n
    for k in range(1, n):  # rotate h's ring: the same hops, other data-parallel peers
        yield "rotate a ring", flat[:lo] + flat[lo + k:hi] + flat[lo:lo + k] + flat[hi:], spare
    for j in range(lo, hi):  # 2-opt: reverse the segment between h and j
        a, b = min(h, j), max(h, j)
        if b - a >= 1 and (a, b) != (lo, hi - 1):
            yield "reverse a segment", flat[:a] + flat[a:b + 1][::-1] + flat[b + 1:], spare
    for length in (1, 2, 3):  # or-opt: move h's segment elsewhere in the ring
        if h + length > hi or length >= n:
            continue
        seg, rest_ring = flat[h:h + length], flat[lo:h] + flat[h + length:hi]
        for j in range(len(rest_ring) + 1):
            if j == h - lo:
                continue
            moved = rest_ring[:j] + seg + rest_ring[j:]
            yield "move a segment", flat[:lo] + moved + flat[hi:], spare

