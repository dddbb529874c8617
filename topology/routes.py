"""Every GPU-to-GPU route as padded integer arrays: many flows cost one numpy pass."""

from __future__ import annotations

import numpy as np

from topology.graph import Router, gpu_vertex


class RouteTable:
    """Link numbers of routes, built from the Router's hierarchy once: per node type a table of
    local routes (in the type's own link numbering) mapped to each node's links; per GPU its
    path up to its leaf and back; per pair of leaves the fabric path (cached as met)."""

    def __init__(self, router: Router):
        self.router = router
        spec = router.spec
        gpus = [(n.name, g) for n in spec.nodes for g in spec.node_types[n.node_type].gpus]
        self.index = {gpu_vertex(n, g): i for i, (n, g) in enumerate(gpus)}
        node_names = [n.name for n in spec.nodes]
        node_idx = {n: i for i, n in enumerate(node_names)}
        types = sorted(spec.node_types)
        self.node_of = np.array([node_idx[n] for n, _ in gpus])
        self.type_of_node = np.array([types.index(n.node_type) for n in spec.nodes])
        self.type_of = self.type_of_node[self.node_of]
        # per node type: local directed links and GPU-pair routes over them
        self.local_tables, links_per_type = [], []
        for t in types:
            nt = spec.node_types[t]
            local = sorted({(u, v) for path in router._local_paths[t].values()
                            for u, v in zip(path, path[1:])})
            pos = {lk: k for k, lk in enumerate(local)}
            slot = {g: k for k, g in enumerate(nt.gpus)}
            longest = max((len(p) for p in router._local_paths[t].values()), default=1)
            table = np.full((len(slot), len(slot), max(longest - 1, 1)), -1, dtype=np.int64)
            for a in nt.gpus:
                for b in nt.gpus:
                    if a != b:
                        path = router._local_paths[t][(f"gpu{a}", f"gpu{b}")]
                        ids = [pos[lk] for lk in zip(path, path[1:])]
                        table[slot[a], slot[b], :len(ids)] = ids
            self.local_tables.append(table)
            links_per_type.append(local)
        self.slot_of = np.array([spec.node_types[spec.nodes[node_idx[n]].node_type].gpus.index(g)
                                 for n, g in gpus])
        width = max(len(x) for x in links_per_type)
        self.node_links = np.full((len(node_names), width), -1, dtype=np.int64)
        for i, n in enumerate(spec.nodes):
            for k, (u, v) in enumerate(links_per_type[types.index(n.node_type)]):
                self.node_links[i, k] = router.link_id[(f"{n.name}/{u}", f"{n.name}/{v}")]
        # per GPU: up to its leaf and down from it (multi-node clusters only)
        self.multi = len(node_names) > 1
        if self.multi:
            info = [router._gpu(gpu_vertex(n, g)) for n, g in gpus]
            leaves = sorted({x[1] for x in info})
            self.leaf_names = leaves
            self.leaf_of = np.array([leaves.index(x[1]) for x in info])
            depth = max(len(x[2]) for x in info)
            self.up = np.full((len(gpus), depth), -1, dtype=np.int64)
            self.down = np.full((len(gpus), depth), -1, dtype=np.int64)
            for i, x in enumerate(info):
                self.up[i, :len(x[2])] = x[2]
                self.down[i, :len(x[3])] = x[3]
        self._fabric: dict[int, list[int]] = {}

    def _fabric_rows(self, codes: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(codes, return_inverse=True)
        n_leaves = len(self.leaf_names)
        rows = []
        for c in uniq.tolist():
            hit = self._fabric.get(c)
            if hit is None:
                a, b = self.leaf_names[c // n_leaves], self.leaf_names[c % n_leaves]
                hit = self._fabric[c] = [self.router.link_id[x]
                                         for x in self.router._between_leaves(a, b)]
            rows.append(hit)
        width = max((len(r) for r in rows), default=0)
        out = np.full((len(uniq), max(width, 1)), -1, dtype=np.int64)
        for k, r in enumerate(rows):
            out[k, :len(r)] = r
        return out[inverse.reshape(-1)]

    def routes(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """(flows, hops) link numbers, -1 padded, one row per flow in input order."""
        same = self.node_of[src] == self.node_of[dst]
        parts = []
        for t, table in enumerate(self.local_tables):
            sel = np.nonzero(same & (self.type_of[src] == t))[0]
            if len(sel):
                local = table[self.slot_of[src[sel]], self.slot_of[dst[sel]]]
                ids = np.take_along_axis(self.node_links[self.node_of[src[sel]]],
                                         np.maximum(local, 0), axis=1)
                parts.append((sel, np.where(local >= 0, ids, -1)))
        cross = np.nonzero(~same)[0]
        if len(cross):
            s, d = src[cross], dst[cross]
            fabric = self._fabric_rows(self.leaf_of[s] * len(self.leaf_names) + self.leaf_of[d])
            parts.append((cross, np.concatenate([self.up[s], fabric, self.down[d]], axis=1)))
        width = max(p[1].shape[1] for p in parts)
        out = np.full((len(src), width), -1, dtype=np.int64)
        for sel, rows in parts:
            out[sel, :rows.shape[1]] = rows
        return out


def route_table(router: Router) -> RouteTable:
    """The RouteTable of `router`'s cluster, built on first use and kept on the router."""
    table = getattr(router, "_route_table", None)
    if table is None:
        table = router._route_table = RouteTable(router)
    return table
