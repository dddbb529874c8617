"""Build the cluster's networkx graph and route GPU-to-GPU transfers over it by its hierarchy."""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from specs.cluster import ClusterSpec, NodeTypeSpec


class TopologyError(ValueError):
    """A cluster description that cannot be turned into a usable graph."""


Link = tuple[str, str]  # a directed link (u, v): bandwidth is per direction


def gpu_vertex(node: str, gpu: int) -> str:
    return f"{node}/gpu{gpu}"


def split_gpu_vertex(vertex: str) -> tuple[str, int]:
    node, _, local = vertex.rpartition("/gpu")
    return node, int(local)


def build_node_graph(nt: NodeTypeSpec, spec: ClusterSpec) -> nx.Graph:
    """The inside of one server type, with local vertex names (gpu3, sw1, cpu0, nic2)."""
    g = nx.Graph()
    lt = spec.link_types

    def add(u: str, v: str, link: str) -> None:
        g.add_edge(u, v, bandwidth=lt[link].bandwidth_gb_s, latency_us=lt[link].latency_us,
                   link_type=link)

    for s in nt.sockets:
        g.add_node(s.name, kind="socket")
        for nic in s.nics:
            g.add_node(nic.name, kind="nic", link=nic.link)
            add(nic.name, s.name, nic.pcie_link)
        for sw in s.switches:
            g.add_node(sw.name, kind="pcie_switch")
            add(sw.name, s.name, sw.uplink)
            for gpu in sw.gpus:
                g.add_node(f"gpu{gpu}", kind="gpu", local_gpu=gpu)
                add(f"gpu{gpu}", sw.name, sw.gpu_link)
            for nic in sw.nics:
                g.add_node(nic.name, kind="nic", link=nic.link)
                add(nic.name, sw.name, nic.pcie_link)
    names = [s.name for s in nt.sockets]
    for a, b in zip(names, names[1:]):  # sockets in a chain (two-socket servers: one link)
        add(a, b, nt.socket_link)
    return g


def _uplink_capacity(spec: ClusterSpec) -> dict[str, float]:
    """Aggregate uplink bandwidth of each fabric switch (given, or downlinks / oversubscription)."""
    down: dict[str, float] = {s.name: 0.0 for s in spec.switches}
    for node in spec.nodes:
        nt = spec.node_types[node.node_type]
        for s in nt.sockets:
            nics = list(s.nics) + [n for sw in s.switches for n in sw.nics]
            for nic in nics:
                leaf = node.leaf_of(nic.name)
                if leaf is not None:
                    down[leaf] += spec.link_types[nic.link].bandwidth_gb_s
    by_name = {s.name: s for s in spec.switches}
    caps: dict[str, float] = {}
    order = {"leaf": 0, "spine": 1, "core": 2}
    for s in sorted(spec.switches, key=lambda s: (order[s.level], s.name)):
        cap = s.uplink_gb_s if s.uplink_gb_s is not None else down[s.name] / s.oversubscription
        caps[s.name] = cap
        if s.parent is not None:
            down[s.parent] += cap
    return {name: cap for name, cap in caps.items() if by_name[name].parent is not None}


def build_graph(spec: ClusterSpec) -> nx.Graph:
    """GPUs, PCIe switches, sockets, NICs and fabric switches; edges carry `bandwidth` (GB/s per
    direction) and `latency_us`. Raises TopologyError naming GPUs that cannot reach each other."""
    g = nx.Graph(name=spec.name)
    local = {name: build_node_graph(nt, spec) for name, nt in sorted(spec.node_types.items())}
    for s in spec.switches:
        g.add_node(s.name, kind=s.level)
    for node in spec.nodes:
        lg = local[node.node_type]
        for v, data in lg.nodes(data=True):
            g.add_node(f"{node.name}/{v}", node=node.name, **data)
        for u, v, data in lg.edges(data=True):
            g.add_edge(f"{node.name}/{u}", f"{node.name}/{v}", **data)
        for nic in spec.node_types[node.node_type].nics:
            leaf = node.leaf_of(nic)
            if leaf is not None:
                link = lg.nodes[nic]["link"]
                lt = spec.link_types[link]
                g.add_edge(f"{node.name}/{nic}", leaf, bandwidth=lt.bandwidth_gb_s,
                           latency_us=lt.latency_us, link_type=link)
    caps = _uplink_capacity(spec)
    for s in spec.switches:
        if s.parent is not None:
            g.add_edge(s.name, s.parent, bandwidth=caps[s.name], latency_us=s.latency_us,
                       link_type=f"{s.level}-uplink")
    for u, v, data in g.edges(data=True):
        if not data["bandwidth"] > 0:
            raise TopologyError(f"link {u} - {v} has bandwidth {data['bandwidth']} GB/s; every "
                                "link needs > 0 (check uplink_gb_s / oversubscription)")
    _check_connected(g)
    return g


def _check_connected(g: nx.Graph) -> None:
    gpus = [v for v, k in g.nodes(data="kind") if k == "gpu"]
    if not gpus:
        raise TopologyError("the cluster has no GPUs")
    comps = list(nx.connected_components(g))
    if len(comps) > 1:
        gpu_set = set(gpus)
        main = sorted(comps, key=lambda c: (-sum(1 for v in c if v in gpu_set), min(c)))[0]
        cut = sorted(v for v in gpus if v not in main)
        raise TopologyError(f"GPUs {cut[:6]}{'...' if len(cut) > 6 else ''} ({len(cut)} in all) "
                            "are disconnected from the rest; connect their node's NICs to a "
                            "leaf (or sockets by socket_link), or move the node to "
                            "unknown_topology")


def apply_degrade_link(g: nx.Graph, text: str) -> tuple[str, str, float]:
    """Scale one link's bandwidth: 'A-B=FACTOR' where A and B are graph vertices (names may
    themselves contain '-'; every split point is tried)."""
    try:
        ends, factor_text = text.rsplit("=", 1)
        factor = float(factor_text)
    except ValueError:
        raise TopologyError(f"--degrade-link {text!r}: expected A-B=FACTOR, e.g. "
                            "node-000/cpu0-node-000/cpu1=0.5") from None
    if not 0 < factor < float("inf"):
        raise TopologyError(f"--degrade-link {text!r}: FACTOR must be a finite number > 0 (0.5 "
                            "halves the link)")
    parts = ends.split("-")
    for i in range(1, len(parts)):
        a, b = "-".join(parts[:i]), "-".join(parts[i:])
        if g.has_edge(a, b):
            g.edges[a, b]["bandwidth"] *= factor
            return a, b, factor
    raise TopologyError(f"--degrade-link {text!r}: no link between two vertices of that name; "
                        "vertices look like node-000/gpu3, node-000/sw1, node-000/cpu0, "
                        "node-000/nic0, leaf-00, spine")


@dataclass
class Router:
    """Routes between GPUs from the hierarchy (no all-pairs search): within a node by the node
    type's shortest paths (computed once per type), across nodes GPU -> nearest NIC -> leaf ->
    up to the lowest common switch -> down -> NIC -> GPU."""

    spec: ClusterSpec
    graph: nx.Graph
    _local_paths: dict[str, dict[tuple[str, str], list[str]]] = field(default_factory=dict)
    _nearest_nic: dict[str, dict[int, str]] = field(default_factory=dict)
    _node: dict[str, object] = field(default_factory=dict)
    _chain: dict[str, list[str]] = field(default_factory=dict)
    _route_cache: dict[tuple[str, str], list[Link]] = field(default_factory=dict)
    _up: dict[str, list[Link]] = field(default_factory=dict)
    _fabric: dict[tuple[str, str], list[Link]] = field(default_factory=dict)
    link_id: dict[Link, int] = field(default_factory=dict)
    links: list[Link] = field(default_factory=list)
    _gpu_info: dict[str, tuple] = field(default_factory=dict)
    _local_vertices: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Directed links numbered once, with their bandwidth and latency in arrays: the cost
        # model works on integer routes with numpy (the graph may have been degraded before
        # the Router is built: it is read now).
        bw, lat = [], []
        for u, v, data in self.graph.edges(data=True):
            for link in ((u, v), (v, u)):
                self.link_id[link] = len(self.links)
                self.links.append(link)
                bw.append(data["bandwidth"])
                lat.append(data["latency_us"])
        self.bandwidth = np.array(bw, dtype=float)
        self.latency_us = np.array(lat, dtype=float)
        self._node = {n.name: n for n in self.spec.nodes}
        parents = {s.name: s.parent for s in self.spec.switches}
        for s in self.spec.switches:
            chain, cur = [s.name], s.name
            while parents[cur] is not None:
                cur = parents[cur]
                chain.append(cur)
            self._chain[s.name] = chain
        for tname, nt in self.spec.node_types.items():
            lg = build_node_graph(nt, self.spec)
            ends = [f"gpu{i}" for i in nt.gpus] + nt.nics
            paths = {}
            for a in ends:
                sp = nx.single_source_shortest_path(lg, a)
                for b in ends:
                    if a != b and b in sp:
                        paths[(a, b)] = sp[b]
            self._local_paths[tname] = paths
            nearest = {}
            for i in nt.gpus:
                reach = [(len(paths[(f"gpu{i}", n)]), n) for n in nt.nics
                         if (f"gpu{i}", n) in paths]
                if reach:
                    nearest[i] = min(reach)[1]
            self._nearest_nic[tname] = nearest

    def node_vertices(self, node: str) -> list[str]:
        """The node's PCIe-tree vertices (GPUs, switches, sockets, NICs) in the graph."""
        tname = self.node_type(node)
        local = self._local_vertices.get(tname)
        if local is None:
            lp = self._local_paths[tname]
            local = self._local_vertices[tname] = sorted({x for p in lp.values() for x in p})
        return [f"{node}/{x}" for x in local]

    def node_type(self, node: str) -> str:
        return self._node[node].node_type

    def nic_of(self, node: str, gpu: int) -> str:
        """The NIC a GPU sends through: the closest one (as NCCL picks) among the node's NICs
        that are cabled to a leaf."""
        tname = self.node_type(node)
        spec = self._node[node]
        if not spec.nic_leaves:  # all NICs on `leaf` (or none cabled): the per-type answer
            return self._nearest_nic[tname][gpu]
        paths = self._local_paths[tname]
        cabled = [n for n in self.spec.node_types[tname].nics if spec.leaf_of(n) is not None]
        return min((len(paths[(f"gpu{gpu}", n)]), n) for n in cabled
                   if (f"gpu{gpu}", n) in paths)[1]

    def leaf_path(self, node: str, gpu: int) -> list[str]:
        """Switches from the GPU's NIC's leaf to the top (for grouping nodes by locality)."""
        leaf = self._node[node].leaf_of(self.nic_of(node, gpu)) if len(self._node) > 1 else None
        return self._chain[leaf] if leaf else []

    def _local(self, node: str, a: str, b: str) -> list[Link]:
        path = self._local_paths[self.node_type(node)][(a, b)]
        return [(f"{node}/{u}", f"{node}/{v}") for u, v in zip(path, path[1:])]

    def _uplinks(self, gpu: str) -> list[Link]:
        """GPU -> its NIC -> its leaf (cached per GPU)."""
        hit = self._up.get(gpu)
        if hit is None:
            node, g = split_gpu_vertex(gpu)
            nic = self.nic_of(node, g)
            hit = self._up[gpu] = (self._local(node, f"gpu{g}", nic)
                                   + [(f"{node}/{nic}", self._node[node].leaf_of(nic))])
        return hit

    def _between_leaves(self, a: str, b: str) -> list[Link]:
        """Leaf a up to the lowest common switch and down to leaf b (cached per pair)."""
        hit = self._fabric.get((a, b))
        if hit is None:
            up, down = self._chain[a], self._chain[b]
            common = next(s for s in up if s in set(down))
            up, down = up[: up.index(common) + 1], down[: down.index(common) + 1]
            descent = [(y, x) for x, y in reversed(list(zip(down, down[1:])))]
            hit = self._fabric[(a, b)] = list(zip(up, up[1:])) + descent
        return hit

    def _gpu(self, gpu: str) -> tuple[str, str | None, list[int], list[int]]:
        """(node, leaf, ids GPU -> leaf, ids leaf -> GPU), computed once per GPU."""
        hit = self._gpu_info.get(gpu)
        if hit is None:
            node = gpu.rpartition("/gpu")[0]
            if len(self._node) > 1:
                up = self._uplinks(gpu)
                ids = [self.link_id[x] for x in up]
                back = [self.link_id[(b, a)] for a, b in reversed(up)]
                hit = (node, up[-1][1], ids, back)
            else:
                hit = (node, None, [], [])
            self._gpu_info[gpu] = hit
        return hit

    def route(self, src: str, dst: str) -> list[Link]:
        """Directed links a transfer from GPU vertex `src` to GPU vertex `dst` crosses."""
        sn, _, _ = src.rpartition("/gpu")
        dn, _, _ = dst.rpartition("/gpu")
        if sn == dn:
            key = (src, dst)
            hit = self._route_cache.get(key)
            if hit is None:
                hit = self._route_cache[key] = self._local(sn, src[len(sn) + 1:],
                                                           dst[len(dn) + 1:])
            return hit
        up, down = self._uplinks(src), self._uplinks(dst)
        fabric = self._between_leaves(up[-1][1], down[-1][1])
        return up + fabric + [(b, a) for a, b in reversed(down)]
