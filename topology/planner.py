"""Placement planner: ring x data-parallel degrees, which GPUs form each ring, in which order."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from specs.cluster import ClusterSpec
from specs.degrees import DegreeError, NothingFits, resolve_degrees, ulysses_of
from specs.run import RunSpec, StageSpec
from topology.cost import (
    FlowResult,
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

TIE = 0.005  # relative step-time difference below which placements count as equal


class PlanError(ValueError):
    """A stage that cannot be placed as asked."""


@dataclass
class Evaluated:
    rings: list[list[str]]
    ring: FlowResult
    dp: FlowResult
    cost: StageCost
    a2a: FlowResult | None = None  # the Ulysses all-to-alls (None without Ulysses)

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
        return Evaluated(rings, ring, dp,
                         predict_stage(shape, ring, dp, self.profile, a2a, around), a2a)

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

    def improve(self, best: Evaluated, shape: StageShape, rounds: int = 3) -> Evaluated:
        """Pairwise-swap local search (small clusters only: O(n^2) evaluations per round)."""
        for _ in range(rounds):
            improved = False
            flat = [v for r in best.rings for v in r]
            for i, j in itertools.combinations(range(len(flat)), 2):
                cand = flat[:]
                cand[i], cand[j] = cand[j], cand[i]
                n = shape.ring * shape.ulysses
                rings = [cand[k * n:(k + 1) * n] for k in range(shape.dp)]
                ev = self.evaluate(rings, shape)
                if ev.key() < best.key():
                    best, improved = ev, True
                    flat = cand
            if not improved:
                break
        return best

    # ---- decisions ----------------------------------------------------------------------------
    def plan_shard(self, run: RunSpec, stage: StageSpec, ring: int, dp: int) -> int | None:
        """The stage's shard_degree for ring x dp: as given, or the smallest shard group (the
        ring, then 2, 3, ... rings) whose memory fits; None when none fits."""
        if stage.shard_degree != "auto":
            options = [stage.shard_degree]
        else:
            seq = ring * ulysses_of(stage)  # GPUs per sequence
            options = [seq * k for k in range(1, dp + 1) if dp % k == 0]
        for shard in options:
            try:
                check_fits(stage.name, StageShape.of(run, stage, ring, dp, shard), self.profile)
            except ValueError:
                continue
            return shard
        return None

    def plan_degrees(self, run: RunSpec, stage: StageSpec, n_gpus: int, strict: bool = True
                     ) -> tuple[int, int, int, list[str]]:
        """The stage's layout on `n_gpus` GPUs (specs.degrees.resolve_degrees with this
        planner's memory model): given degrees are honoured, 'auto' ones pick the smallest ring
        that fits memory with the smallest shard group, then as many rings as GPUs and batch
        allow. Returns (ring, dp, shard, notes); PlanError (or StageDoesNotFit, with the
        shortfall of the layout closest to fitting) when there is none."""
        offer = (f"resources.workers is {run.resources.workers}"
                 if n_gpus == run.resources.workers and n_gpus < self.spec.num_gpus
                 else f"the cluster offers {n_gpus} GPUs")
        try:
            dims, notes = resolve_degrees(
                stage, n_gpus, offer, strict=strict, grow="add nodes",
                shard_for=lambda ring, dp: self.plan_shard(run, stage, ring, dp))
        except NothingFits as e:
            ring, dp = max(e.tried)  # the layout closest to fitting: its shortfall and fix
            shard = (ring * dp * ulysses_of(stage) if stage.shard_degree == "auto"
                     else stage.shard_degree)
            check_fits(stage.name, StageShape.of(run, stage, ring, dp, shard), self.profile)
            raise PlanError(f"stage {stage.name!r}: {e}") from None
        except DegreeError as e:
            raise PlanError(f"stage {stage.name!r}: {e}") from None
        return dims.ring, dims.dp, dims.shard, notes

    def plan_rings(self, run: RunSpec, stage: StageSpec, ring: int, dp: int,
                   shard: int | None = None, ulysses: int = 1) -> tuple[Evaluated, list[str]]:
        """Rings and their order for `ring` x `dp` (x `ulysses`: each ring position a group of
        that many GPUs): the best of a few hierarchy-aware layouts (whole nodes in fabric order;
        per-node templates found by exhaustive search over one node; socket/switch-sized chunks
        across nodes; data-parallel peers side by side; Ray's order), each evaluated on the
        full contention model, then pairwise swaps up to 16 GPUs. A ring of ring x ulysses GPUs
        in locality order keeps each Ulysses group on neighbouring GPUs. Time: O(candidates x
        GPUs x route length), no all-pairs path search."""
        shape = StageShape.of(run, stage, ring, dp, shard, ulysses)
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
        cands = {k: v for k, v in cands.items()  # a layout that does not fit is no candidate
                 if len(v) == dp and all(len(r) == n for r in v)}
        evals = {name: self.evaluate(r, shape) for name, r in cands.items()}
        # Step times within TIE of the best count as equal; among those the fastest ring wins:
        # it keeps headroom should the compute run faster than the MFU assumption.
        fastest = min(ev.cost.step_seconds for ev in evals.values())
        near = [k for k in sorted(evals) if evals[k].cost.step_seconds <= fastest * (1 + TIE)]
        name = min(near, key=lambda k: (evals[k].ring.seconds, evals[k].key()))
        best = evals[name]
        notes = [f"placement: '{name}' chosen from {sorted(evals)} (step times within "
                 f"{TIE:.1%} count as equal; then the fastest ring hop wins)"]
        if total <= 16:
            better = self.improve(best, shape)
            if better is not best:
                notes.append("improved by pairwise swaps")
            best = better
        return best, notes

    def node_health(self, node: str) -> float:
        """Worst ratio of a link's bandwidth in the graph to its link type's in the spec (1.0:
        as described; < 1: degraded)."""
        worst = 1.0
        lt = self.spec.link_types
        for _, _, data in self.graph.edges(self.router.node_vertices(node), data=True):
            nominal = lt[data["link_type"]].bandwidth_gb_s if data["link_type"] in lt else None
            if nominal:
                worst = min(worst, data["bandwidth"] / nominal)
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
