"""Placement planner: ring x data-parallel degrees, which GPUs form each ring, in which order."""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from functools import lru_cache

import networkx as nx
import numpy as np

from specs.cluster import ClusterSpec
from specs.degrees import DegreeError, NothingFits, ParallelDims, resolve_degrees, ulysses_of
from specs.run import RunSpec, StageSpec
from topology.cost import (
    FlowResult,
    LinkLoads,
    StageCost,
    StageShape,
    check_fits,
    evaluate_flows,
    evaluate_index_flows,
    predict_stage,
    ring_flows,
    ring_index_flows,
)
from topology.graph import Router, build_graph, gpu_vertex, split_gpu_vertex
from topology.profile import HardwareProfile, get_profile
from topology.routes import route_table

TIE = 0.005  # relative step-time (and ring-hop) difference below which placements count as equal
SEARCH_SECONDS = 0.25  # default local-search budget per placement (a stage, or a Ulysses split)
GREEDY_GPUS = 512  # up to this many GPUs the nearest-neighbour construction is a start
FULL_NEIGHBOURHOOD = 32  # up to this many GPUs every move is tried; above, moves around hot hops
TIERS = ("core uplinks", "leaf uplinks", "NIC links", "socket links")  # highest first


class PlanError(ValueError):
    """A stage that cannot be placed as asked."""


@dataclass
class Evaluated:
    rings: list[list[str]]
    ring: FlowResult
    dp: FlowResult
    cost: StageCost
    a2a: FlowResult | None = None  # the Ulysses all-to-alls (None without Ulysses)
    traffic: tuple[float, ...] = field(default=())  # bytes a step sends over each of TIERS

    def key(self) -> tuple:
        return (round(self.cost.step_seconds, 9), self.ring.seconds, self.dp.seconds,
                sum(self.ring.hop_seconds))


class Planner:
    """Plans every stage of a run on one cluster; built once, reused across stages."""

    def __init__(self, spec: ClusterSpec, graph=None, profile: HardwareProfile | None = None,
                 search_seconds: float = SEARCH_SECONDS, seed: int = 0):
        if not search_seconds > 0:
            raise PlanError(f"search_seconds is {search_seconds}; the placement search needs a "
                            f"budget > 0 seconds (e.g. --search-seconds {SEARCH_SECONDS:g}; it "
                            "stops sooner when no move helps)")
        self.spec = spec
        self.graph = graph if graph is not None else build_graph(spec)
        self.router = Router(spec, self.graph)
        self.profile = profile or get_profile(spec.profile)
        self.search_seconds = search_seconds
        self.seed = seed
        self._node_types = {n.name: n.node_type for n in spec.nodes}
        self._template: dict[tuple[str, int], list[list[int]]] = {}
        self._health: dict[str, float] = {}
        self._tier_of_link: np.ndarray | None = None
        self._pairs: tuple | None = None
        self._domains: list[np.ndarray] | None = None

    # ---- orders -------------------------------------------------------------------------------
    def _local_order(self, node_type: str) -> list[int]:
        """GPUs of a node type by (socket, switch, index): neighbours share a switch."""
        nt = self.spec.node_types[node_type]
        return [g for s in nt.sockets for sw in s.switches for g in sorted(sw.gpus)]

    def node_order(self) -> list[str]:
        """Nodes grouped by fabric position (a leaf's nodes together, a spine's leaves together)."""
        def key(node):
            g = self.spec.node_types[node.node_type].gpus[0]
            return (list(reversed(self.router.leaf_path(node.name, g))), node.name)
        return [n.name for n in sorted(self.spec.nodes, key=key)]

    def locality_order(self) -> list[str]:
        return [gpu_vertex(n, g) for n in self.node_order()
                for g in self._local_order(self._node_types[n])]

    def ray_default_order(self, seed: int = 0) -> list[str]:
        """Ray Train's world ranks: nodes in discovery order (unrelated to the network: a seeded
        shuffle here), each node's workers by GPU id."""
        nodes = sorted(self._node_types)
        random.Random(seed).shuffle(nodes)
        return [gpu_vertex(n, g) for n in nodes
                for g in self.spec.node_types[self._node_types[n]].gpus]

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, rings: list[list[str]], shape: StageShape) -> Evaluated:
        """The stage's prediction for these rings (each lists ring x ulysses GPUs: with
        Ulysses, one ring position's group after another)."""
        index = route_table(self.router).index
        idx = np.array([[index[v] for v in r] for r in rings], dtype=np.int64)
        u = shape.ulysses
        # K/V rings: member k of each Ulysses group passes to member k of the next group
        kv = idx.reshape(len(rings), shape.ring, u).transpose(0, 2, 1).reshape(-1, shape.ring)
        ring = evaluate_index_flows(self.router, *ring_index_flows(kv), shape.kv_block_bytes)
        # data-parallel groups: the same ring rank across rings, in ring order
        dp = evaluate_index_flows(self.router, *ring_index_flows(idx.T if len(rings) > 1 else
                                                                 idx[:, :1]), shape.kv_block_bytes)
        a2a = around = None
        if u > 1:  # every member of a Ulysses group sends to every other one, all at once
            groups = idx.reshape(-1, u)
            src = np.repeat(groups, u, axis=1).ravel()
            dst = np.tile(groups, (1, u)).ravel()
            other = src != dst
            a2a = evaluate_index_flows(self.router, src[other], dst[other],
                                       shape.all_to_all_bytes)
            # FSDP's collectives go around the whole sequence group, in its order
            around = evaluate_index_flows(self.router, *ring_index_flows(idx),
                                          shape.kv_block_bytes)
        traffic = (self._tier_bytes(ring, _ring_weight(shape))
                   + self._tier_bytes(dp, _dp_weight(shape)))
        if a2a is not None:
            traffic = (traffic + self._tier_bytes(a2a, _a2a_weight(shape))
                       + self._tier_bytes(around, _shard_weight(shape)))
        return Evaluated(rings, ring, dp,
                         predict_stage(shape, ring, dp, self.profile, a2a, around), a2a,
                         tuple(float(x) for x in traffic))

    def tier_of_link(self) -> np.ndarray:
        """Per directed link (Router numbering) its index in TIERS: spine-core links 0,
        leaf-spine 1, NIC-leaf 2, socket-socket 3; len(TIERS) for the PCIe links inside a
        node, which no tier counts."""
        if self._tier_of_link is None:
            kind = dict(self.graph.nodes(data="kind"))
            rank = {"core": 0, "spine": 1, "leaf": 2, "socket": 3}
            tiers = []
            for u, v in self.router.links:
                ku, kv = kind.get(u), kind.get(v)
                if ku == kv == "socket":
                    tiers.append(3)
                elif {ku, kv} == {"nic", "leaf"}:
                    tiers.append(2)
                elif ku in rank and kv in rank:  # fabric: by the higher end
                    tiers.append(min(rank[ku], rank[kv]))
                else:
                    tiers.append(len(TIERS))
            self._tier_of_link = np.array(tiers, dtype=np.int64)
        return self._tier_of_link

    def _tier_bytes(self, res: FlowResult, weight: float) -> np.ndarray:
        """Bytes a step sends over each tier for these flows: transfers per link (the
        result's load counts) times the bytes each transfer moves per step."""
        if not isinstance(res.loads, LinkLoads):  # no flows: an empty mapping
            return np.zeros(len(TIERS))
        used, counts = res.loads.counts()
        if not len(used):
            return np.zeros(len(TIERS))
        per_tier = np.bincount(self.tier_of_link()[used], weights=counts,
                               minlength=len(TIERS) + 1)
        return per_tier[:len(TIERS)] * weight

    # ---- candidates ---------------------------------------------------------------------------
    def _subnode_template(self, node_type: str, ring: int) -> list[list[int]]:
        """Best split of one node's GPUs into rings of `ring` and their order, by exhaustive
        search over the node type (done once per type; rings inside a node do not contend with
        other nodes)."""
        key = (node_type, ring)
        if key in self._template:
            return self._template[key]
        gpus = self._local_order(node_type)
        g = len(gpus)
        k = g // ring
        searches = (math.factorial(g) // (math.factorial(ring) ** k * math.factorial(k))
                    * math.factorial(ring - 1) ** k)
        node = next(n for n, t in sorted(self._node_types.items()) if t == node_type)
        best, best_key = None, None
        for groups in (_partitions(tuple(gpus), ring, limit=5000) if searches <= 20000 else []):
            for orders in itertools.product(*[_cycles(gr) for gr in groups]):
                rings = [[gpu_vertex(node, g) for g in o] for o in orders]
                res = evaluate_flows(self.router, ring_flows(rings), 1e8)
                k = (res.seconds, sum(res.hop_seconds))
                if best_key is None or k < best_key:
                    best, best_key = [list(o) for o in orders], k
        if best is None:  # too many partitions to search: consecutive chunks of the local order
            best = [gpus[i:i + ring] for i in range(0, len(gpus), ring)]
        self._template[key] = best
        return best

    def candidates(self, gpus: list[str], ring: int, dp: int) -> dict[str, list[list[str]]]:
        """Named candidate placements of `ring` x `dp` on `gpus` (in locality order)."""
        by_node: dict[str, list[str]] = {}
        for v in gpus:
            by_node.setdefault(split_gpu_vertex(v)[0], []).append(v)
        out: dict[str, list[list[str]]] = {}
        chunks = [gpus[i * ring:(i + 1) * ring] for i in range(dp)]
        out["locality"] = chunks
        if dp > 1:  # data-parallel peers side by side, rings strided: wins when the gradient
            # all-reduce (not overlapped) costs more than the ring hops (hidden behind compute)
            out["dp-inner"] = [gpus[i:ring * dp:dp] for i in range(dp)]
        # Rings made of c-GPU chunks (a switch, a socket ...) of several nodes: chunk k of every
        # node before chunk k+1, so a ring keeps to one socket/NIC of each node it spans and the
        # sockets' links are left to the data-parallel sync. c = 1 strides nodes GPU by GPU.
        width = min(len(v) for v in by_node.values())
        for c in [c for c in range(1, width) if ring % c == 0
                  and all(len(v) % c == 0 for v in by_node.values())]:
            deepest = max(len(v) for v in by_node.values()) // c
            units = [gs[k * c:(k + 1) * c] for k in range(deepest) for gs in by_node.values()
                     if k * c < len(gs)]
            per = ring // c
            flat = [v for j, u in enumerate(units)
                    for v in (u if (j % per) % 2 == 0 else u[::-1])]
            out[f"chunks of {c}"] = [flat[i * ring:(i + 1) * ring] for i in range(dp)]
            if dp > 1:
                out[f"chunks of {c}, dp-inner"] = [flat[i:ring * dp:dp] for i in range(dp)]
        sizes = {len(v) for v in by_node.values()}
        types = {self._node_types[n] for n in by_node}
        if len(sizes) == 1 and len(types) == 1:
            per = sizes.pop()
            ntype = types.pop()
            full = len(self.spec.node_types[ntype].gpus) == per
            nodes = list(by_node)
            if full and per % ring == 0:
                tmpl = self._subnode_template(ntype, ring)
                rings = [[gpu_vertex(n, g) for g in t] for n in nodes for t in tmpl]
                out["node-template"] = rings[:dp]
            elif full and ring % per == 0:
                k = ring // per
                order = self._local_order(ntype)
                snake = []
                for i in range(dp):
                    ring_nodes = nodes[i * k:(i + 1) * k]
                    snake.append([gpu_vertex(n, g) for j, n in enumerate(ring_nodes)
                                  for g in (order if j % 2 == 0 else order[::-1])])
                out["snake"] = snake
        return out

    def domain_packed_rings(self, gpus: list[str], n: int, dp: int, shape: StageShape
                            ) -> list[list[str]] | None:
        """Rings cut inside the domains of the smallest level that holds one (PCIe switch,
        socket, node, leaf group), each domain's GPUs in locality order; of those, the dp
        whose slowest hop is fastest with all of them in place (one evaluation), kept in
        locality order so data-parallel peers stay near. None when the domains hold fewer
        than dp rings. Leaves GPUs behind slow links, and odd domains, unused."""
        index = route_table(self.router).index
        for doms in self.domains():
            if np.bincount(doms).max() < n:
                continue
            groups: dict[int, list[str]] = {}
            for v in gpus:
                groups.setdefault(int(doms[index[v]]), []).append(v)
            rings = [g[i:i + n] for g in groups.values() for i in range(0, len(g) - n + 1, n)]
            if len(rings) < dp:
                return None
            if len(rings) == dp:
                return rings
            everyone = StageShape(**{**shape.__dict__, "dp": len(rings)})
            hops = np.array(self.evaluate(rings, everyone).ring.hop_seconds)
            slowest = hops.reshape(len(rings), -1).max(axis=1) if n > 1 else np.zeros(len(rings))
            keep = np.argsort(slowest, kind="stable")[:dp]
            return [rings[k] for k in sorted(keep.tolist())]
        return None

    def nearest_neighbour_rings(self, gpus: list[str], n: int, dp: int, shape: StageShape
                                ) -> list[list[str]]:
        """Rings grown greedily on the uncontended hop time of every pair of `gpus`: each ring
        from a start GPU, always on to the unused GPU its last one reaches fastest (locality
        order breaks ties); per ring the best of up to 16 starts by its slowest hop. Finds
        what the named layouts miss on irregular fabrics: a ring across two nodes' fast
        sockets rather than through one node's slow socket link, GPUs behind a degraded link
        left unused. O(GPUs^2) pair routes."""
        table, r = route_table(self.router), self.router
        idx = np.array([table.index[v] for v in gpus], dtype=np.int64)
        m = len(idx)
        src, dst = np.repeat(idx, m), np.tile(idx, m)
        routes = table.routes(src, dst)
        ok = routes >= 0
        lat = np.where(ok, r.latency_us[np.maximum(routes, 0)], 0).sum(axis=1) * 1e-6
        bw = np.where(ok, r.bandwidth[np.maximum(routes, 0)], np.inf).min(axis=1)
        cost = (lat + shape.kv_block_bytes / (bw * 1e9)).reshape(m, m)
        np.fill_diagonal(cost, np.inf)
        free = np.ones(m, dtype=bool)
        rings = []
        for _ in range(dp):
            starts = np.nonzero(free)[0]
            starts = starts[np.linspace(0, len(starts) - 1, min(16, len(starts))).astype(int)]
            best = None
            for s in starts.tolist():
                left, ring = free.copy(), [s]
                left[s] = False
                while len(ring) < n:
                    nxt = int(np.argmin(np.where(left, cost[ring[-1]], np.inf)))
                    ring.append(nxt)
                    left[nxt] = False
                slowest = max(cost[a, b] for a, b in zip(ring, ring[1:] + ring[:1])) \
                    if n > 1 else 0.0
                if best is None or slowest < best[0]:
                    best = (slowest, ring)
            free[best[1]] = False
            rings.append([gpus[k] for k in best[1]])
        return rings

    def search(self, start: Evaluated, shape: StageShape, spare: list[str],
               floor: tuple[float, float] | None = None) -> tuple[Evaluated, list[str]]:
        """Local search from `start` over partition and order: first-improvement hill climbing
        on `rank`, until no move helps or the budget of `search_seconds` is spent. Moves, each
        evaluated on the full contention model: swap two GPUs, in one ring or across rings (a
        partition change); swap a GPU with an unused one; swap whole runs of a ring that share
        a PCIe switch, a socket or a node with equal runs of another ring (reversed or not);
        move such a run, or the whole ring, to unused GPUs of one domain; reverse a segment of
        a ring (2-opt); move a segment of 1-3 GPUs elsewhere in its ring (or-opt); rotate a
        ring (other data-parallel peers). Up to 16 GPUs the moves start at every position;
        above, at the ends of the slowest hops, partners on the hop's nodes first and then a
        seeded sample. Deterministic for a seed. Returns the result and notes saying which
        moves improved it and by how much."""
        rng = random.Random(self.seed)
        # The budget is counted in moves, at a nominal cost per move on a 2-core machine, so
        # a plan does not depend on how busy the machine is; the wall clock only guards (10x).
        total, u = len(start.rings) * len(start.rings[0]), shape.ulysses
        per_move = 2e-4 + 1.5e-6 * total * (1 if u == 1 else 2) + 0.5e-6 * total * (u - 1)
        moves = max(1, int(self.search_seconds / per_move))  # Ulysses: all-to-alls priced
        deadline = time.perf_counter() + 10 * self.search_seconds
        n, dp = shape.ring * shape.ulysses, shape.dp
        state = {"floor": floor or (start.cost.step_seconds, start.ring.seconds), "tried": 0,
                 "stop": "no move helps"}
        gains: dict[str, list[float]] = {}

        def evaluate(flat: list[str]) -> Evaluated:
            state["tried"] += 1
            return self.evaluate([flat[k * n:(k + 1) * n] for k in range(dp)], shape)

        def better(ev: Evaluated, than: Evaluated) -> bool:
            """`rank` with the floors moved by `ev` (they only fall: no cycle)."""
            f = (min(state["floor"][0], ev.cost.step_seconds), state["floor"][1])
            if ev.cost.step_seconds <= f[0] * (1 + TIE):
                f = (f[0], min(f[1], ev.ring.seconds))
            if rank(ev, f) < rank(than, f):
                state["floor"] = f
                return True
            return False

        def note(kind: str, old: Evaluated, new: Evaluated) -> None:
            gain = gains.setdefault(kind, [0, 0.0, 0.0])
            gain[0] += 1
            gain[1] += old.cost.step_seconds - new.cost.step_seconds
            gain[2] += old.ring.seconds - new.ring.seconds

        def out_of_budget() -> bool:
            if state["tried"] >= moves:
                state["stop"] = f"the budget of {self.search_seconds:g} s ({moves} moves) is spent"
            elif time.perf_counter() > deadline:
                state["stop"] = f"10x the time budget of {self.search_seconds:g} s passed"
            return state["stop"] != "no move helps"

        def climb(ev: Evaluated, flat: list[str], spare: list[str], log: bool):
            while not out_of_budget():
                for kind, cand, rest in self._moves(ev, flat, spare, shape, rng):
                    if out_of_budget():
                        break
                    new = evaluate(cand)
                    if better(new, ev):
                        if log:
                            note(kind, ev, new)
                        ev, flat, spare = new, cand, rest
                        break
                else:
                    break  # no move helps
            return ev, flat, spare

        best, flat, spare = climb(start, [v for r in start.rings for v in r], list(spare), True)
        # Small placements: kick the local optimum (two random swaps, with positions or unused
        # GPUs) and climb again, keeping what comes out better: moves that only pay off
        # together (a GPU moved and its ring rotated, two rings rebuilt across nodes).
        kicks = 0
        while len(flat) <= FULL_NEIGHBOURHOOD // 2 and len(flat) > 1 and kicks < 4 * len(flat) \
                and not out_of_budget():
            kicks += 1
            cand, rest = flat[:], spare[:]
            for _ in range(2):
                i = rng.randrange(len(cand))
                j = rng.randrange(len(cand) + len(rest))
                if j < len(cand):
                    cand[i], cand[j] = cand[j], cand[i]
                else:
                    cand[i], rest[j - len(cand)] = rest[j - len(cand)], cand[i]
            ev, cand, rest = climb(evaluate(cand), cand, rest, False)
            if better(ev, best):
                note("kick and climb", best, ev)
                best, flat, spare = ev, cand, rest
        stop = state["stop"] if not kicks or state["stop"] != "no move helps" else \
            f"no move helps, {kicks} kicks tried"
        tried = state["tried"]
        if not gains:
            return best, [f"search: no move improved it ({tried} moves evaluated; stopped: "
                          f"{stop})"]
        done = "; ".join(f"{k} x{c} (step {ds * 1e3:+.3g} ms, slowest hop {dh * 1e3:+.3g} ms)"
                         for k, (c, ds, dh) in sorted(gains.items()))
        return best, [f"search: {sum(g[0] for g in gains.values())} moves improved it, "
                      f"gains as reductions: {done}; slowest hop "
                      f"{start.ring.seconds * 1e3:.3f} -> {best.ring.seconds * 1e3:.3f} ms, step "
                      f"{start.cost.step_seconds:.4g} -> {best.cost.step_seconds:.4g} s "
                      f"({tried} moves evaluated; stopped: {stop})"]

    def _hot_positions(self, ev: Evaluated, shape: StageShape, total: int) -> list[int]:
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

    def _moves(self, ev: Evaluated, flat: list[str], spare: list[str], shape: StageShape,
               rng: random.Random):
        """Candidate moves from placement `flat` (rings back to back) and the unused GPUs:
        (kind, new flat, new unused), lazily, most promising first."""
        n, total = shape.ring * shape.ulysses, len(flat)
        small = total <= FULL_NEIGHBOURHOOD
        hot = self._hot_positions(ev, shape, total)
        node = [split_gpu_vertex(v)[0] for v in flat]
        for h in hot:
            ring = h // n
            lo, hi = ring * n, ring * n + n
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
            pool = list(range(len(spare)))
            if len(spare) > FULL_NEIGHBOURHOOD:  # unused GPUs on the hop's nodes, a sample
                close = [i for i in pool if split_gpu_vertex(spare[i])[0] in near]
                far = [i for i in pool if split_gpu_vertex(spare[i])[0] not in near]
                pool = close[:32] + rng.sample(far, min(len(far), FULL_NEIGHBOURHOOD))
            for i in pool:
                cand, rest = flat[:], spare[:]
                cand[h], rest[i] = rest[i], cand[h]
                yield "swap with an unused GPU", cand, rest
            yield from self._unit_swaps(flat, h, n, spare)
            yield from self._unused_unit_swaps(flat, h, n, spare)
            for k in range(1, n):  # rotate h's ring: the same hops, other data-parallel peers
                yield "rotate a ring", flat[:lo] + flat[lo + k:hi] + flat[lo:lo + k] + flat[hi:], \
                    spare
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

    def _unused_unit_swaps(self, flat: list[str], h: int, n: int, spare: list[str]):
        """Replace the run of position h's ring that shares its switch / socket / node (and
        the whole ring) by as many unused GPUs of one domain, in locality order or reversed:
        moves a ring, or a node's share of it, to better GPUs in one step (one GPU at a time
        would pass through worse placements)."""
        if not spare:
            return
        index = route_table(self.router).index
        doms = self.domains()
        local = self._locality_rank()
        ring = h // n
        lo, hi = ring * n, ring * n + n
        runs = []
        for dom in doms[:3]:
            key = [int(dom[index[v]]) for v in flat[lo:hi]]
            a = b = h - lo
            while a > 0 and key[a - 1] == key[h - lo]:
                a -= 1
            while b + 1 < n and key[b + 1] == key[h - lo]:
                b += 1
            runs.append((lo + a, lo + b + 1))
        runs.append((lo, hi))
        ordered = sorted(spare, key=local.get)
        for a, b in dict.fromkeys(runs):
            size = b - a
            choices: dict[tuple[str, ...], None] = {}  # each set of unused GPUs once
            for dom in doms:
                by_domain: dict[int, list[str]] = {}
                for v in ordered:
                    by_domain.setdefault(int(dom[index[v]]), []).append(v)
                for gpus in by_domain.values():
                    if len(gpus) >= size:
                        choices[tuple(gpus[:size])] = None
            for new in itertools.islice(choices, 48):  # closest domains first (locality)
                for order in (list(new), list(new)[::-1]):
                    cand = flat[:a] + order + flat[b:]
                    rest = [v for v in spare if v not in new] + flat[a:b]
                    yield "move a run to unused GPUs", cand, rest

    def _locality_rank(self) -> dict[str, int]:
        rank = getattr(self, "_local_rank", None)
        if rank is None:
            rank = self._local_rank = {v: i for i, v in enumerate(self.locality_order())}
        return rank

    def _unit_swaps(self, flat: list[str], h: int, n: int, spare: list[str]):
        """Swap the run of position h's ring that shares its PCIe switch / socket / node with
        every equal run of another ring (as is and reversed): moves whole switch pairs,
        socket halves and nodes between rings."""
        index = route_table(self.router).index
        doms = self.domains()[:3]
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

    # ---- decisions ----------------------------------------------------------------------------
    def plan_shard(self, run: RunSpec, stage: StageSpec, ring: int, dp: int
                   ) -> ParallelDims | None:
        """The stage's layout for ring x dp with its shard_degree as given, or with the smallest
        shard group (the ring, then 2, 3, ... rings) whose memory fits; None when none fits."""
        ulysses = ulysses_of(stage)
        if stage.shard_degree != "auto":
            options = [stage.shard_degree]
        else:
            seq = ring * ulysses  # GPUs per sequence
            options = [seq * k for k in range(1, dp + 1) if dp % k == 0]
        for shard in options:
            try:
                dims = ParallelDims.of(ring, dp, shard, ulysses)
            except ValueError as e:
                raise DegreeError(str(e)) from None
            try:
                check_fits(stage.name, StageShape.of(run, stage, dims), self.profile)
            except ValueError:
                continue
            return dims
        return None

    def plan_degrees(self, run: RunSpec, stage: StageSpec, n_gpus: int, strict: bool = True
                     ) -> tuple[ParallelDims, list[str]]:
        """The stage's layout on `n_gpus` GPUs (specs.degrees.resolve_degrees with this
        planner's memory model): given degrees are honoured, 'auto' ones pick the smallest ring
        that fits memory with the smallest shard group, then as many rings as GPUs and batch
        allow. Returns (layout, notes); PlanError (or StageDoesNotFit, with the shortfall of
        the layout closest to fitting) when there is none."""
        offer = (f"resources.workers is {run.resources.workers}"
                 if n_gpus == run.resources.workers and n_gpus < self.spec.num_gpus
                 else f"the cluster offers {n_gpus} GPUs")
        try:
            return resolve_degrees(
                stage, n_gpus, offer, strict=strict, grow="add nodes",
                shard_for=lambda ring, dp: self.plan_shard(run, stage, ring, dp))
        except NothingFits as e:
            ring, dp = max(e.tried)  # the layout closest to fitting: its shortfall and fix
            u = ulysses_of(stage)
            shard = ring * dp * u if stage.shard_degree == "auto" else stage.shard_degree
            try:
                closest = ParallelDims.of(ring, dp, shard, u)
            except ValueError:  # a shard_degree this dp cannot take: no shortfall to report
                closest = None
            if closest is not None:
                check_fits(stage.name, StageShape.of(run, stage, closest), self.profile)
            raise PlanError(f"stage {stage.name!r}: {e}") from None
        except DegreeError as e:
            raise PlanError(f"stage {stage.name!r}: {e}") from None

    def plan_rings(self, run: RunSpec, stage: StageSpec, dims: ParallelDims
                   ) -> tuple[Evaluated, list[str]]:
        """Rings and their order for `dims`, ring x dp (x ulysses: each ring position a group of
        that many GPUs): the best (by `rank`) of a few hierarchy-aware layouts (whole nodes in
        fabric order; per-node templates found by exhaustive search over one node;
        socket/switch-sized chunks across nodes; data-parallel peers side by side; Ray's
        order; rings packed into the smallest domains; rings grown nearest neighbour first),
        each evaluated on the full contention model, improved by `search` within the
        planner's budget. A ring of ring x ulysses GPUs in locality order keeps each
        Ulysses group on neighbouring GPUs. Notes: the start, the moves that improved it, and
        the slowest hop against `ring_lower_bound`."""
        ring, dp, ulysses = dims.ring, dims.dp, dims.ulysses
        shape = StageShape.of(run, stage, dims)
        check_fits(stage.name, shape, self.profile)
        n = ring * ulysses  # GPUs per sequence: what a candidate's "ring" lists
        total = n * dp
        gpus = self.locality_order()
        if total > len(gpus):
            layout = f"{ring} x {dp}" + ("" if ulysses == 1 else f" x ulysses {ulysses}")
            raise PlanError(f"stage {stage.name!r}: needs {total} GPUs ({layout}), the "
                            f"cluster has {len(gpus)}; lower the degrees or add nodes")
        used = self._choose_gpus(gpus, total)
        cands = self.candidates(used, n, dp)
        ray = self.ray_default_order()[:total]
        cands["ray-default order"] = [ray[i * n:(i + 1) * n] for i in range(dp)]
        if len(gpus) <= GREEDY_GPUS:
            cands["nearest neighbour"] = self.nearest_neighbour_rings(gpus, n, dp, shape)
        packed = self.domain_packed_rings(gpus, n, dp, shape)
        if packed is not None:
            cands["domain-packed"] = packed
        cands = {k: v for k, v in cands.items()  # a layout that does not fit is no candidate
                 if len(v) == dp and all(len(r) == n for r in v)}
        evals = {name: self.evaluate(r, shape) for name, r in cands.items()}
        floor = floor_of(evals.values())
        name = min(sorted(evals), key=lambda k: rank(evals[k], floor))
        start = evals[name]
        notes = [f"placement: started from '{name}', the best of {sorted(evals)} (step times "
                 f"within {TIE:.1%} count as equal, then slowest hops within {TIE:.1%}; then "
                 f"less traffic on {', '.join(TIERS)}, in that order)"]
        taken = {v for r in start.rings for v in r}
        spare = [v for v in gpus if v not in taken]
        bound = self.ring_lower_bound(shape)
        at_bound = predict_stage(shape, bound, start.dp, self.profile, start.a2a).step_seconds
        if total > GREEDY_GPUS and (start.ring.seconds <= bound.seconds * (1 + 1e-9)
                                    or start.cost.step_seconds <= at_bound * (1 + TIE)):
            # each move costs a full evaluation (tens of ms here): spend them only where a
            # faster ring could buy step time
            best, more = start, [f"search: skipped above {GREEDY_GPUS} GPUs: a ring hop at "
                                 "the lower bound would not shorten the step by more than "
                                 f"{TIE:.1%}"]
        else:
            best, more = self.search(start, shape, spare, floor)
        if bound.seconds > 0:
            more.append(f"slowest K/V hop {best.ring.seconds * 1e3:.3f} ms, "
                        f"{best.ring.seconds / bound.seconds:.3f}x the lower bound "
                        f"({bound.seconds * 1e3:.3f} ms)")
        return best, notes + more

    def node_health(self, node: str) -> float:
        """Worst ratio of a link's bandwidth in the graph to its link type's in the spec (1.0:
        as described; < 1: degraded)."""
        if node in self._health:
            return self._health[node]
        worst = 1.0
        lt = self.spec.link_types
        for _, _, data in self.graph.edges(self.router.node_vertices(node), data=True):
            nominal = lt[data["link_type"]].bandwidth_gb_s if data["link_type"] in lt else None
            if nominal:
                worst = min(worst, data["bandwidth"] / nominal)
        self._health[node] = worst
        return worst

    def _choose_gpus(self, gpus: list[str], total: int) -> list[str]:
        """The first `total` GPUs in locality order, after leaving out the most degraded nodes
        that are not needed."""
        by_node: dict[str, list[str]] = {}
        for v in gpus:
            by_node.setdefault(split_gpu_vertex(v)[0], []).append(v)
        spare = len(gpus) - total
        health = {n: self.node_health(n) for n in by_node}
        for n in sorted(by_node, key=lambda n: (health[n], n)):
            if health[n] >= 1.0 or len(by_node[n]) > spare:
                break
            spare -= len(by_node.pop(n))
        return [v for vs in by_node.values() for v in vs][:total]

    def domains(self) -> list[np.ndarray]:
        """Per level (switch, socket, node, leaf group), the domain number of every GPU (in
        RouteTable order). A leaf group is a connected component of the graph joining nodes
        to the leaves their NICs are cabled to (networkx): GPUs of different groups reach
        each other only over a leaf uplink; rail-optimised leaves join their nodes into one
        group. Computed once."""
        if self._domains is not None:
            return self._domains
        index = route_table(self.router).index
        levels: list[dict[str, object]] = [{}, {}, {}, {}]
        cabling = nx.Graph()
        for node in self.spec.nodes:
            cabling.add_node(("node", node.name))
            for nic in self.spec.node_types[node.node_type].nics:
                if node.leaf_of(nic) is not None:
                    cabling.add_edge(("node", node.name), ("leaf", node.leaf_of(nic)))
        group = {v[1]: k for k, comp in enumerate(nx.connected_components(cabling))
                 for v in comp if v[0] == "node"}
        for node in self.spec.nodes:
            for s in self.spec.node_types[node.node_type].sockets:
                for sw in s.switches:
                    for g in sw.gpus:
                        v = gpu_vertex(node.name, g)
                        for level, key in zip(levels, [(node.name, sw.name), (node.name, s.name),
                                                       node.name, group[node.name]]):
                            level[v] = key
        out = []
        for level in levels:
            ids = {k: i for i, k in enumerate(dict.fromkeys(level.values()))}
            arr = np.empty(len(index), dtype=np.int64)
            for v, k in level.items():
                arr[index[v]] = ids[k]
            out.append(arr)
        self._domains = out
        return out

    def _pair_table(self) -> dict[str, np.ndarray | tuple]:
        """Uncontended routes, computed once: every ordered pair of GPUs inside one node
        (`src`, `dst`, `lat` s, `bw` GB/s, `part`: 0 one PCIe switch, 1 one socket, 2 two
        sockets); per GPU its way up to its leaf and down from it (`up`, `down`: latency,
        bandwidth); the leaf uplinks' fastest latency and widest bandwidth (`uplink`)."""
        if self._pairs is not None:
            return self._pairs
        table, r = route_table(self.router), self.router
        doms = self.domains()
        src, dst = [], []
        for node in self.spec.nodes:
            ids = [table.index[gpu_vertex(node.name, g)]
                   for g in self.spec.node_types[node.node_type].gpus]
            for a, b in itertools.permutations(ids, 2):
                src.append(a)
                dst.append(b)

        def ends(paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            ok = paths >= 0
            return (np.where(ok, r.latency_us[np.maximum(paths, 0)], 0).sum(axis=1) * 1e-6,
                    np.where(ok, r.bandwidth[np.maximum(paths, 0)], np.inf).min(axis=1))

        out: dict = {"src": np.array(src, dtype=np.int64), "dst": np.array(dst, dtype=np.int64)}
        out["lat"], out["bw"] = (ends(table.routes(out["src"], out["dst"])) if src
                                 else (np.empty(0), np.empty(0)))
        out["part"] = ((doms[0][out["src"]] != doms[0][out["dst"]]).astype(np.int64)
                       + (doms[1][out["src"]] != doms[1][out["dst"]]))
        if table.multi:
            out["up"], out["down"] = ends(table.up), ends(table.down)
            kind = dict(self.graph.nodes(data="kind"))
            uplinks = [(d["latency_us"], d["bandwidth"]) for u, v, d in self.graph.edges(data=True)
                       if "leaf" in (kind[u], kind[v]) and "nic" not in (kind[u], kind[v])]
            out["uplink"] = (2e-6 * min((x for x, _ in uplinks), default=0.0),
                             max((b for _, b in uplinks), default=np.inf))
        self._pairs = out
        return out

    def ring_lower_bound(self, shape: StageShape) -> FlowResult:
        """A bound no placement can beat for the slowest K/V hop. A ring of R GPUs with R above
        the largest domain of a level (PCIe switch, socket, node, leaf group; counted in GPUs
        of this cluster) leaves every domain of that level it visits, so its slowest hop is
        no faster than the fastest single uncontended transfer from a GPU of one domain to a
        GPU of another (inside a node: the exact route; between nodes: the GPU's way up to
        its leaf, the fastest way down, and the leaf uplinks between groups). When the stage
        uses every GPU, every domain is visited: the bound is the slowest domain's fastest
        way out (or in), e.g. a socket without a NIC whose GPUs must cross the socket link."""
        if shape.ring == 1:
            return FlowResult(0.0, 0.0, float("inf"), None, {}, [])
        nbytes = shape.kv_block_bytes
        doms = self.domains()
        level = -1  # -1: only two distinct GPUs are needed
        for k, d in enumerate(doms):
            if shape.ring > np.bincount(d).max():
                level = k
        p = self._pair_table()
        n = len(doms[0])
        every_gpu = shape.ring * shape.ulysses * shape.dp == n
        t, lat_s, bw_s = 0.0, 0.0, 0.0
        for lv in range(0, level + 1) if every_gpu and level >= 0 else [level]:
            leave, enter, lat_of = self._ways_out(p, lv, nbytes, n)
            if every_gpu and lv >= 0:
                forced = np.zeros(int(doms[lv].max()) + 1)
                for per_gpu in (leave, enter):
                    best = np.full(len(forced), np.inf)
                    np.minimum.at(best, doms[lv], per_gpu)
                    forced = np.maximum(forced, best)
                here = float(forced.max())
            else:
                here = float(leave.min())
            if here > t:
                # latency: the least of any way out; bandwidth: what makes up the rest of t
                # (so the cost model prices the bound's hop as t for these bytes)
                t, lat_s = here, min(float(lat_of.min()), here * 0.5)
                bw_s = nbytes / ((t - lat_s) * 1e9)
        return FlowResult(t, lat_s, bw_s, ("bound", "bound"), {}, [t])

    def _ways_out(self, p: dict, level: int, nbytes: float, n: int) -> tuple[np.ndarray, ...]:
        """Per GPU, the fastest uncontended transfer of `nbytes` from it to a GPU of another
        domain of `level` (-1: any other GPU), and into it from one; and the least latency of
        its ways out. Inside a node the exact routes; between nodes the GPU's own
        way up (down) and the fastest way down (up) anywhere, plus the leaf uplinks when it
        must leave its leaf group (level 3)."""
        leave, enter = np.full(n, np.inf), np.full(n, np.inf)
        lat_of = np.full(n, np.inf)
        if level <= 1 and len(p["lat"]):
            sel = p["part"] >= level + 1
            t = p["lat"][sel] + nbytes / (p["bw"][sel] * 1e9)
            np.minimum.at(leave, p["src"][sel], t)
            np.minimum.at(enter, p["dst"][sel], t)
            np.minimum.at(lat_of, p["src"][sel], p["lat"][sel])
        if "up" in p:
            (up_lat, up_bw), (down_lat, down_bw) = p["up"], p["down"]
            extra_lat, cap = p["uplink"] if level == 3 else (0.0, np.inf)
            out_lat = up_lat + down_lat.min() + extra_lat
            out_bw = np.minimum(np.minimum(up_bw, down_bw.max()), cap)
            in_lat = down_lat + up_lat.min() + extra_lat
            in_bw = np.minimum(np.minimum(down_bw, up_bw.max()), cap)
            leave = np.minimum(leave, out_lat + nbytes / (out_bw * 1e9))
            enter = np.minimum(enter, in_lat + nbytes / (in_bw * 1e9))
            lat_of = np.minimum(lat_of, out_lat)
        return leave, enter, lat_of


def rank(ev: Evaluated, floor: tuple[float, float]) -> tuple:
    """The hierarchical objective, given the best step time and the best slowest hop seen
    (`floor`): step time first, every step within TIE of the best counting as equal; then the
    slowest K/V hop, likewise (a hop hidden behind compute today shows with shorter shards, a
    smaller model or a slower fabric); then the bytes each tier carries, highest tier first
    (a ring crosses the spine only when that buys step or hop time); then exact hop and step."""
    s, h = ev.cost.step_seconds, ev.ring.seconds
    step_out = s > floor[0] * (1 + TIE)
    hop_out = h > floor[1] * (1 + TIE)
    return (step_out, s if step_out else 0.0, hop_out, h if hop_out else 0.0, ev.traffic, h, s)


def floor_of(evals) -> tuple[float, float]:
    """The best step time, and the best slowest hop among placements within TIE of it."""
    evals = list(evals)
    step = min(ev.cost.step_seconds for ev in evals)
    return step, min(ev.ring.seconds for ev in evals if ev.cost.step_seconds <= step * (1 + TIE))


def _ring_weight(s: StageShape) -> float:
    """Bytes one K/V transfer slot moves a step: forward, recomputed forward and backward
    (with dK, dV) blocks of every layer and micro-step; without Ulysses the sharding
    collectives go around the ring too."""
    kv = s.seqs_per_ring * s.layers * s.grad_accum * (3 * s.kv_block_bytes + s.kv_grad_bytes)
    return kv + (_shard_weight(s) if s.ulysses == 1 else 0.0)


def _dp_weight(s: StageShape) -> float:
    """Bytes one GPU sends a step in the data-parallel ring all-reduce of its gradient shard."""
    return 2 * (s.dp - 1) / s.dp * s.grad_reduce_bytes * s.params / s.shard_ways


def _a2a_weight(s: StageShape) -> float:
    """Bytes one GPU sends each Ulysses peer a step (a round trip in each of three phases)."""
    return 2 * 3 * s.layers * s.grad_accum * s.seqs_per_ring * s.all_to_all_bytes


def _shard_weight(s: StageShape) -> float:
    """Bytes one GPU sends a step in the weight all-gathers and gradient reduce-scatter."""
    S = s.shard_ways
    return (S - 1) / S * (2 * s.elem_bytes + s.grad_reduce_bytes) * s.params * s.grad_accum


def plan_exhaustive(planner: Planner, gpus: list[str], shape: StageShape) -> Evaluated:
    """The best placement of shape.ring x shape.dp on exactly `gpus` by trying every partition
    and ring order (the yardstick for small clusters; factorial time)."""
    best = None
    for groups in _partitions(tuple(range(len(gpus))), shape.ring, limit=10**7):
        for orders in itertools.product(*[_cycles(gr) for gr in groups]):
            ev = planner.evaluate([[gpus[i] for i in o] for o in orders], shape)
            if best is None or ev.key() < best.key():
                best = ev
    return best


def plan_exhaustive_any(planner: Planner, shape: StageShape) -> Evaluated:
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


def _cycles(group: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Distinct ring orders of a group: fix the first element; a ring and its reverse differ
    (transfers go one way), so all (k-1)! orders."""
    first, rest = group[0], group[1:]
    return [(first, *p) for p in itertools.permutations(rest)]


def _partitions(items: tuple[int, ...], size: int, limit: int):
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
