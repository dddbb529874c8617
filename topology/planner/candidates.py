"""Starting ring layouts for the search: constructions on the cluster's orders and domains."""

from __future__ import annotations

import itertools
import math

import numpy as np

from topology.cost import StageShape, evaluate_flows, ring_flows
from topology.graph import gpu_vertex, split_gpu_vertex
from topology.planner.bound import route_ends
from topology.planner.evaluation import Evaluator
from topology.planner.exhaustive import cycles, partitions
from topology.planner.orders import Orders
from topology.routes import route_table


class CandidateRings:
    """Builds candidate ring layouts on one cluster; each node type's best split into rings
    is searched once and kept."""

    def __init__(self, orders: Orders, evaluator: Evaluator):
        self.orders = orders
        self.evaluator = evaluator
        self._template: dict[tuple[str, int], list[list[int]]] = {}

    def named(self, gpus: list[str], ring: int, dp: int) -> dict[str, list[list[str]]]:
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
        out.update(_chunked(by_node, ring, dp))
        out.update(self._whole_nodes(by_node, ring, dp))
        return out

    def _whole_nodes(self, by_node: dict[str, list[str]], ring: int, dp: int
                     ) -> dict[str, list[list[str]]]:
        """On whole nodes of one type: the node template when rings fit in a node, else rings
        of whole nodes, every other node's GPUs reversed (a snake)."""
        out: dict[str, list[list[str]]] = {}
        sizes = {len(v) for v in by_node.values()}
        types = {self.orders.node_types[n] for n in by_node}
        if len(sizes) == 1 and len(types) == 1:
            per = sizes.pop()
            ntype = types.pop()
            full = len(self.orders.spec.node_types[ntype].gpus) == per
            nodes = list(by_node)
            if full and per % ring == 0:
                tmpl = self.node_template(ntype, ring)
                rings = [[gpu_vertex(n, g) for g in t] for n in nodes for t in tmpl]
                out["node-template"] = rings[:dp]
            elif full and ring % per == 0:
                k = ring // per
                order = self.orders.local_order(ntype)
                snake = []
                for i in range(dp):
                    ring_nodes = nodes[i * k:(i + 1) * k]
                    snake.append([gpu_vertex(n, g) for j, n in enumerate(ring_nodes)
                                  for g in (order if j % 2 == 0 else order[::-1])])
                out["snake"] = snake
        return out

    def node_template(self, node_type: str, ring: int) -> list[list[int]]:
        """Best split of one node's GPUs into rings of `ring` and their order, by exhaustive
        search over the node type (done once per type; rings inside a node do not contend with
        other nodes)."""
        key = (node_type, ring)
        if key in self._template:
            return self._template[key]
        gpus = self.orders.local_order(node_type)
        g = len(gpus)
        k = g // ring
        searches = (math.factorial(g) // (math.factorial(ring) ** k * math.factorial(k))
                    * math.factorial(ring - 1) ** k)
        node = next(n for n, t in sorted(self.orders.node_types.items()) if t == node_type)
        best, best_key = None, None
        for groups in (partitions(tuple(gpus), ring, limit=5000) if searches <= 20000 else []):
            for ordered in itertools.product(*[cycles(gr) for gr in groups]):
                rings = [[gpu_vertex(node, g) for g in o] for o in ordered]
                res = evaluate_flows(self.orders.router, ring_flows(rings), 1e8)
                k = (res.seconds, sum(res.hop_seconds))
                if best_key is None or k < best_key:
                    best, best_key = [list(o) for o in ordered], k
        if best is None:  # too many partitions to search: consecutive chunks of the local order
            best = [gpus[i:i + ring] for i in range(0, len(gpus), ring)]
        self._template[key] = best
        return best

    def domain_packed(self, gpus: list[str], n: int, dp: int, shape: StageShape
                      ) -> list[list[str]] | None:
        """Rings cut inside the domains of the smallest level that holds one (PCIe switch,
        socket, node, leaf group), each domain's GPUs in locality order; of those, the dp
        whose slowest hop is fastest with all of them in place (one evaluation), kept in
        locality order so data-parallel peers stay near. None when the domains hold fewer
        than dp rings. Leaves GPUs behind slow links, and odd domains, unused."""
        index = route_table(self.orders.router).index
        for doms in self.orders.domains():
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
            hops = np.array(self.evaluator.evaluate(rings, everyone).ring.hop_seconds)
            slowest = hops.reshape(len(rings), -1).max(axis=1) if n > 1 else np.zeros(len(rings))
            keep = np.argsort(slowest, kind="stable")[:dp]
            return [rings[k] for k in sorted(keep.tolist())]
        return None

    def nearest_neighbour(self, gpus: list[str], n: int, dp: int, shape: StageShape
                          ) -> list[list[str]]:
        """Rings grown greedily on the uncontended hop time of every pair of `gpus`: each ring
        from a start GPU, always on to the unused GPU its last one reaches fastest (locality
        order breaks ties); per ring the best of up to 16 starts by its slowest hop. Finds
        what the named layouts miss on irregular fabrics: a ring across two nodes' fast
        sockets rather than through one node's slow socket link, GPUs behind a degraded link
        left unused. O(GPUs^2) pair routes."""
        cost = self._pair_seconds(gpus, shape.kv_block_bytes)
        free = np.ones(len(gpus), dtype=bool)
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

    def _pair_seconds(self, gpus: list[str], nbytes: float) -> np.ndarray:
        """Uncontended seconds to send `nbytes` between every ordered pair of `gpus` (a GPU
        to itself: infinite, so no ring steps in place)."""
        table, r = route_table(self.orders.router), self.orders.router
        idx = np.array([table.index[v] for v in gpus], dtype=np.int64)
        m = len(idx)
        src, dst = np.repeat(idx, m), np.tile(idx, m)
        lat, bw = route_ends(r, table.routes(src, dst))
        cost = (lat + nbytes / (bw * 1e9)).reshape(m, m)
        np.fill_diagonal(cost, np.inf)
        return cost


def _chunked(by_node: dict[str, list[str]], ring: int, dp: int) -> dict[str, list[list[str]]]:
    """Rings made of c-GPU chunks (a switch, a socket ...) of several nodes: chunk k of every
    node before chunk k+1, so a ring keeps to one socket/NIC of each node it spans and the
    sockets' links are left to the data-parallel sync. c = 1 strides nodes GPU by GPU."""
    out: dict[str, list[list[str]]] = {}
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
    return out
