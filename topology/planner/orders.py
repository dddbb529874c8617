"""The cluster's GPUs in the orders and nested domains that placements are cut from."""

from __future__ import annotations

import random

import networkx as nx
import numpy as np

from specs.cluster import ClusterSpec
from topology.graph import Router, gpu_vertex
from topology.routes import route_table


class Orders:
    """GPU orders (locality, Ray's) and domains (switch, socket, node, leaf group) of one
    cluster; the locality ranks and the domains computed once."""

    def __init__(self, spec: ClusterSpec, graph: nx.Graph, router: Router):
        self.spec = spec
        self.graph = graph
        self.router = router
        self.node_types = {n.name: n.node_type for n in spec.nodes}
        self._locality_rank: dict[str, int] | None = None
        self._domains: list[np.ndarray] | None = None

    def local_order(self, node_type: str) -> list[int]:
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
        """Every GPU vertex, nodes in fabric order, each node's GPUs in its local order."""
        return [gpu_vertex(n, g) for n in self.node_order()
                for g in self.local_order(self.node_types[n])]

    def locality_rank(self) -> dict[str, int]:
        """Each GPU vertex's position in the locality order."""
        if self._locality_rank is None:
            self._locality_rank = {v: i for i, v in enumerate(self.locality_order())}
        return self._locality_rank

    def ray_default_order(self, seed: int = 0) -> list[str]:
        """Ray Train's world ranks: nodes in discovery order (unrelated to the network: a seeded
        shuffle here), each node's workers by GPU id."""
        nodes = sorted(self.node_types)
        random.Random(seed).shuffle(nodes)
        return [gpu_vertex(n, g) for n in nodes
                for g in self.spec.node_types[self.node_types[n]].gpus]

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
        group = self._leaf_groups()
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

    def _leaf_groups(self) -> dict[str, int]:
        """Each node's leaf group: its connected component in the node-to-leaf cabling."""
        cabling = nx.Graph()
        for node in self.spec.nodes:
            cabling.add_node(("node", node.name))
            for nic in self.spec.node_types[node.node_type].nics:
                if node.leaf_of(nic) is not None:
                    cabling.add_edge(("node", node.name), ("leaf", node.leaf_of(nic)))
        return {v[1]: k for k, comp in enumerate(nx.connected_components(cabling))
                for v in comp if v[0] == "node"}
