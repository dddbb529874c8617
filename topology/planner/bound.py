"""The ring lower bound: a slowest K/V hop no placement can beat, from uncontended routes."""

from __future__ import annotations

import itertools

import numpy as np

from topology.cost import FlowResult, StageShape
from topology.graph import Router, gpu_vertex
from topology.planner.orders import Orders
from topology.routes import route_table


class RingBound:
    """The lower bound on one cluster; its table of uncontended routes computed once."""

    def __init__(self, orders: Orders):
        self.orders = orders
        self._pairs: dict | None = None

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
        doms = self.orders.domains()
        level = -1  # -1: only two distinct GPUs are needed
        for k, d in enumerate(doms):
            if shape.ring > np.bincount(d).max():
                level = k
        p = self.pair_table()
        n = len(doms[0])
        every_gpu = shape.ring * shape.ulysses * shape.dp == n
        t, lat_s, bw_s = 0.0, 0.0, 0.0
        for lv in range(0, level + 1) if every_gpu and level >= 0 else [level]:
            leave, enter, lat_of = _ways_out(p, lv, nbytes, n)
            here = (_slowest_domain(doms[lv], leave, enter) if every_gpu and lv >= 0
                    else float(leave.min()))
            if here > t:
                # latency: the least of any way out; bandwidth: what makes up the rest of t
                # (so the cost model prices the bound's hop as t for these bytes)
                t, lat_s = here, min(float(lat_of.min()), here * 0.5)
                bw_s = nbytes / ((t - lat_s) * 1e9)
        return FlowResult(t, lat_s, bw_s, ("bound", "bound"), {}, [t])

    def pair_table(self) -> dict[str, np.ndarray | tuple]:
        """Uncontended routes, computed once: every ordered pair of GPUs inside one node
        (`src`, `dst`, `lat` s, `bw` GB/s, `part`: 0 one PCIe switch, 1 one socket, 2 two
        sockets); per GPU its way up to its leaf and down from it (`up`, `down`: latency,
        bandwidth); the leaf uplinks' fastest latency and widest bandwidth (`uplink`)."""
        if self._pairs is not None:
            return self._pairs
        table, r = route_table(self.orders.router), self.orders.router
        doms = self.orders.domains()
        src, dst = self._pairs_in_nodes()
        out: dict = {"src": src, "dst": dst}
        out["lat"], out["bw"] = (route_ends(r, table.routes(src, dst)) if len(src)
                                 else (np.empty(0), np.empty(0)))
        out["part"] = ((doms[0][src] != doms[0][dst]).astype(np.int64)
                       + (doms[1][src] != doms[1][dst]))
        if table.multi:
            out["up"], out["down"] = route_ends(r, table.up), route_ends(r, table.down)
            out["uplink"] = self._leaf_uplinks()
        self._pairs = out
        return out

    def _pairs_in_nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """(src, dst) GPU ids (RouteTable order) of every ordered pair of GPUs of one node."""
        spec, index = self.orders.spec, route_table(self.orders.router).index
        src, dst = [], []
        for node in spec.nodes:
            ids = [index[gpu_vertex(node.name, g)] for g in spec.node_types[node.node_type].gpus]
            for a, b in itertools.permutations(ids, 2):
                src.append(a)
                dst.append(b)
        return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)

    def _leaf_uplinks(self) -> tuple[float, float]:
        """The leaf uplinks' fastest latency (s, both ways) and widest bandwidth (GB/s)."""
        graph = self.orders.graph
        kind = dict(graph.nodes(data="kind"))
        uplinks = [(d["latency_us"], d["bandwidth"]) for u, v, d in graph.edges(data=True)
                   if "leaf" in (kind[u], kind[v]) and "nic" not in (kind[u], kind[v])]
        return (2e-6 * min((x for x, _ in uplinks), default=0.0),
                max((b for _, b in uplinks), default=np.inf))


def route_ends(r: Router, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per route (rows of link ids, -1 padded): its latency in seconds and its narrowest
    link's bandwidth in GB/s."""
    ok = paths >= 0
    return (np.where(ok, r.latency_us[np.maximum(paths, 0)], 0).sum(axis=1) * 1e-6,
            np.where(ok, r.bandwidth[np.maximum(paths, 0)], np.inf).min(axis=1))

def _slowest_domain(dom: np.ndarray, leave: np.ndarray, enter: np.ndarray) -> float:
    """Over the domains `dom` numbers, the slowest one's fastest way out or in (per GPU
    `leave`, `enter`): what a ring through every domain pays at least once."""
    forced = np.zeros(int(dom.max()) + 1)
    for per_gpu in (leave, enter):
        best = np.full(len(forced), np.inf)
        np.minimum.at(best, dom, per_gpu)
        forced = np.maximum(forced, best)
    return float(forced.max())


def _ways_out(p: dict, level: int, nbytes: float, n: int) -> tuple[np.ndarray, ...]:
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
