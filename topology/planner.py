"""Placement planner: ring x data-parallel degrees, which GPUs form each ring, in which order."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from functools import lru_cache

from topology.cluster import ClusterSpec
from topology.cost import (FlowResult, StageCost, StageShape, check_fits, dp_flows,
                           evaluate_flows, predict_stage, ring_flows)
from topology.graph import Router, build_graph, gpu_vertex, split_gpu_vertex
from topology.profile import HardwareProfile, get_profile


class PlanError(ValueError):
    """A stage that cannot be placed as asked."""


@dataclass
class Evaluated:
    rings: list[list[str]]
    ring: FlowResult
    dp: FlowResult
    cost: StageCost

    def key(self) -> tuple:
        return (round(self.cost.step_seconds, 9), self.ring.seconds, self.dp.seconds,
                sum(self.ring.hop_seconds))


class Planner:
    """Plans every stage of a run on one cluster; built once, reused across stages."""

    def __init__(self, spec: ClusterSpec, graph=None, profile: HardwareProfile | None = None):
        self.spec = spec
        self.graph = graph if graph is not None else build_graph(spec)
        self.router = Router(spec, self.graph)
        self.profile = profile or get_profile(spec.profile)
        self._node_types = {n.name: n.node_type for n in spec.nodes}
        self._template: dict[tuple[str, int], list[list[int]]] = {}

    # ---- orders -------------------------------------------------------------------------------
    def _local_order(self, node_type: str) -> list[int]:
        """GPUs of a node type by (socket, switch, index): neighbours share a switch."""
        nt = self.spec.node_types[node_type]
        return [g for s in nt.sockets for sw in s.switches for g in sorted(sw.gpus)]

    def node_order(self) -> list[str]:
        """Nodes grouped by fabric position (same leaf together, leaves under one spine together)."""
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
        ring = evaluate_flows(self.router, ring_flows(rings), shape.kv_block_bytes)
        dp = evaluate_flows(self.router, dp_flows(rings), shape.kv_block_bytes)
        return Evaluated(rings, ring, dp, predict_stage(shape, ring, dp, self.profile))

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
        searches = (math.factorial(g) // (math.factorial(ring) ** (g // ring) * math.factorial(g // ring))
                    * math.factorial(ring - 1) ** (g // ring))
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
        by_node: dict[str, list[int]] = {}
        for v in gpus:
            n, g = split_gpu_vertex(v)
            by_node.setdefault(n, []).append(g)
        out: dict[str, list[list[str]]] = {}
        chunks = [gpus[i * ring:(i + 1) * ring] for i in range(dp)]
        out["locality"] = chunks
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

    def improve(self, best: Evaluated, shape: StageShape, rounds: int = 3) -> Evaluated:
        """Pairwise-swap local search (small clusters only: O(n^2) evaluations per round)."""
        for _ in range(rounds):
            improved = False
            flat = [v for r in best.rings for v in r]
            for i, j in itertools.combinations(range(len(flat)), 2):
                cand = flat[:]
                cand[i], cand[j] = cand[j], cand[i]
                rings = [cand[k * shape.ring:(k + 1) * shape.ring] for k in range(shape.dp)]
                ev = self.evaluate(rings, shape)
                if ev.key() < best.key():
                    best, improved = ev, True
                    flat = cand
            if not improved:
                break
        return best

    # ---- decisions ----------------------------------------------------------------------------
    def plan_degrees(self, model, stage, n_gpus: int) -> tuple[int, int, list[str]]:
        """Honour the stage's ring_degree / data_parallel_degree; pick 'auto' ones: the smallest
        ring that fits memory, then as many rings as GPUs and batch allow."""
        notes = []
        r, d = stage.ring_degree, stage.data_parallel_degree
        if r != "auto" and d != "auto":
            if r * d > n_gpus:
                raise PlanError(f"stage {stage.name!r}: ring_degree x data_parallel_degree = "
                                f"{r} x {d} = {r * d} GPUs, but the cluster offers {n_gpus}; "
                                "lower the degrees or add nodes")
            return r, d, notes
        rings = [r] if r != "auto" else [x for x in range(1, n_gpus + 1)
                                         if stage.seq_len % (2 * x) == 0 or x == 1]
        for x in rings:
            if x > 1 and stage.seq_len % (2 * x):
                raise PlanError(f"stage {stage.name!r}: seq_len {stage.seq_len} is not divisible "
                                f"by 2 x ring_degree = {2 * x}; pick another ring_degree")
            dmax = n_gpus // x
            ds = [d] if d != "auto" else [y for y in range(dmax, 0, -1) if stage.batch_size % y == 0]
            for y in ds:
                if x * y > n_gpus:
                    continue
                try:
                    check_fits(stage.name, StageShape.of(model, stage, x, y), self.profile)
                except ValueError:
                    break
                notes.append(f"auto degrees: ring {x} x dp {y} (smallest ring that fits memory, "
                             "then the most rings the GPUs and batch_size allow)")
                return x, y, notes
        if r != "auto":
            check_fits(stage.name, StageShape.of(model, stage, r, 1), self.profile)
        raise PlanError(f"stage {stage.name!r}: no ring_degree up to {n_gpus} GPUs fits memory; "
                        "shorten seq_len or add GPUs")

    def plan_rings(self, model, stage, ring: int, dp: int) -> tuple[Evaluated, list[str]]:
        shape = StageShape.of(model, stage, ring, dp)
        check_fits(stage.name, shape, self.profile)
        total = ring * dp
        gpus = self.locality_order()
        if total > len(gpus):
            raise PlanError(f"stage {stage.name!r}: needs {total} GPUs ({ring} x {dp}), the "
                            f"cluster has {len(gpus)}; lower the degrees or add nodes")
        used = _take_whole_nodes(gpus, total)
        cands = self.candidates(used, ring, dp)
        ray = self.ray_default_order()[:total]
        cands["ray-default order"] = [ray[i * ring:(i + 1) * ring] for i in range(dp)]
        evals = {name: self.evaluate(r, shape) for name, r in cands.items()}
        name = min(evals, key=lambda k: evals[k].key())
        best = evals[name]
        notes = [f"placement: '{name}' was best of {sorted(evals)}"]
        if total <= 32:
            better = self.improve(best, shape)
            if better is not best:
                notes.append("improved by pairwise swaps")
            best = better
        return best, notes

    def ring_lower_bound(self, shape: StageShape) -> FlowResult:
        """A bound no placement can beat for the slowest ring hop: the slowest link class every
        ring of this size must cross, uncontended (PCIe if it fits under one switch, the switch
        uplink beyond, the socket link or a NIC beyond one socket, a NIC beyond one node)."""
        lt = self.spec.link_types
        nts = [self.spec.node_types[t] for t in set(self._node_types.values())]
        sw = max(len(x.gpus) for nt in nts for s in nt.sockets for x in s.switches)
        sock = max(sum(len(x.gpus) for x in s.switches) for nt in nts for s in nt.sockets)
        node = max(len(nt.gpus) for nt in nts)
        gpu_bw = max(lt[x.gpu_link].bandwidth_gb_s for nt in nts for s in nt.sockets
                     for x in s.switches)
        lat = 2 * min(lt[x.gpu_link].latency_us for nt in nts for s in nt.sockets
                      for x in s.switches)
        nic_bw = max((lt[n.link].bandwidth_gb_s for nt in nts for s in nt.sockets
                      for n in list(s.nics) + [m for x in s.switches for m in x.nics]), default=0)
        bw = gpu_bw
        if shape.ring > sw:
            bw = min(bw, max(lt[x.uplink].bandwidth_gb_s for nt in nts for s in nt.sockets
                             for x in s.switches))
        if shape.ring > sock:
            sock_bw = max((lt[nt.socket_link].bandwidth_gb_s for nt in nts
                           if nt.socket_link and len(nt.sockets) > 1), default=0)
            bw = min(bw, max(sock_bw, nic_bw))
        if shape.ring > node:
            bw = min(bw, nic_bw)
        if shape.ring == 1:
            return FlowResult(0.0, 0.0, float("inf"), None, {}, [])
        t = lat * 1e-6 + shape.kv_block_bytes / (bw * 1e9)
        return FlowResult(t, lat * 1e-6, bw, ("bound", "bound"), {}, [t])


def _take_whole_nodes(gpus: list[str], total: int) -> list[str]:
    return gpus[:total]


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
