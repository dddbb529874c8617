"""`ringpilot plan --exclude`: plan around the nodes, GPUs, devices or links a preflight found slow.

Nodes and GPUs are taken out of the cluster description, so nothing is placed on them. A link
cannot be taken out: the fabric is a tree and routes follow it (topology.graph.Router), so a
missing link would cut GPUs off rather than send their traffic another way. An excluded link
instead keeps EXCLUDED_LINK_FACTOR of its bandwidth: any ring crossing it is then priced
hundreds of times slower, so the planner's search places rings where they do not cross it, and
leaves the GPUs behind it out when it has GPUs to spare (Planner._choose_gpus drops degraded
nodes first). The graph keeps one bandwidth per cable, so both directions are slowed: a port
with one bad direction is a cable to avoid. A device (NIC, PCIe switch, socket, fabric switch)
is excluded as all of its links.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from specs.cluster import ClusterSpec
from topology.graph import Link, TopologyError, split_gpu_vertex

EXCLUDED_LINK_FACTOR = 1e-3  # bandwidth an excluded link keeps: rings priced around it


@dataclass(frozen=True)
class Exclusions:
    """What `--exclude` named, sorted by what it is."""

    nodes: tuple[str, ...] = ()
    gpus: tuple[str, ...] = ()  # GPU vertices, NODE/gpuK
    devices: tuple[str, ...] = ()  # other vertices: NICs, switches, sockets
    links: tuple[Link, ...] = ()  # (u, v) as given; both directions are excluded

    @property
    def names(self) -> list[str]:
        """Everything excluded, spelled as --exclude takes it (for Plan.excluded)."""
        return [*self.nodes, *self.gpus, *self.devices, *(f"{u}->{v}" for u, v in self.links)]

    def describe(self) -> str:
        """One line for the plan's assumptions."""
        parts = []
        if self.nodes:
            parts.append(f"nodes {', '.join(self.nodes)} not placed")
        if self.gpus:
            parts.append(f"GPUs {', '.join(self.gpus)} not placed")
        slowed = [*self.devices, *(f"{u}->{v}" for u, v in self.links)]
        if slowed:
            parts.append(f"{', '.join(slowed)} kept at {EXCLUDED_LINK_FACTOR:g}x bandwidth in "
                         "both directions, so rings are placed around them (a tree fabric has "
                         "no other route)")
        return "excluded (ringpilot plan --exclude): " + "; ".join(parts)


def parse_exclusions(spec: ClusterSpec, graph: nx.Graph, texts: list[str]) -> Exclusions:
    """Read `--exclude` values (each may list several, comma-separated): a node name, a GPU
    vertex (node/gpuK), another vertex of `graph` (a device), or a link `u->v` as preflight
    findings print it. TopologyError for a name the cluster does not have, with the spelling
    of each kind from this cluster."""
    nodes, gpus, devices, links = [], [], [], []
    known_nodes = {n.name for n in spec.nodes}
    for item in (x.strip() for text in texts for x in text.split(",")):
        if not item:
            continue
        if "->" in item:
            u, v = (x.strip() for x in item.split("->", 1))
            if not graph.has_edge(u, v):
                raise _unknown(item, spec, graph, "no link between two vertices of that name")
            links.append((u, v))
        elif item in known_nodes:
            nodes.append(item)
        elif item in graph and graph.nodes[item].get("kind") == "gpu":
            gpus.append(item)
        elif item in graph:
            devices.append(item)
        else:
            raise _unknown(item, spec, graph, "not a node, GPU, device or link")
    return Exclusions(*(tuple(dict.fromkeys(x)) for x in (nodes, gpus, devices, links)))


def apply_exclusions(spec: ClusterSpec, ex: Exclusions) -> ClusterSpec:
    """The cluster without the excluded nodes and GPUs: a node that loses some GPUs gets a copy
    of its node type without them (local GPU numbers kept, so the trainer finds its place), one
    that loses all of them leaves."""
    dropped: dict[str, set[int]] = {}
    for vertex in ex.gpus:
        node, gpu = split_gpu_vertex(vertex)
        dropped.setdefault(node, set()).add(gpu)
    data = spec.model_dump()
    types = data["node_types"]
    kept = []
    for node in data["nodes"]:
        gone = dropped.get(node["name"], set())
        if node["name"] in ex.nodes:
            continue
        if gone:
            base = node["node_type"]
            if set(spec.node_types[base].gpus) <= gone:
                continue
            name = f"{base}-without-" + "-".join(f"gpu{g}" for g in sorted(gone))
            types[name] = _without_gpus(types[base], gone)
            node = {**node, "node_type": name}
        kept.append(node)
    if not kept:
        raise TopologyError(f"--exclude {', '.join(ex.names)}: nothing of cluster {spec.name!r}"
                            " is left to plan on; exclude fewer nodes or GPUs")
    data["nodes"] = kept
    used = {n["node_type"] for n in kept}
    data["node_types"] = {k: v for k, v in types.items() if k in used}
    return ClusterSpec.model_validate(data)


def degrade_excluded(graph: nx.Graph, ex: Exclusions) -> None:
    """Keep EXCLUDED_LINK_FACTOR of the bandwidth of every excluded link and of every link of
    an excluded device, in `graph` (in place; built from the cluster after apply_exclusions,
    where links to excluded GPUs no longer exist)."""
    edges = {tuple(sorted(lk)) for lk in ex.links if graph.has_edge(*lk)}
    for device in ex.devices:
        if device in graph:
            edges |= {tuple(sorted(e)) for e in graph.edges(device)}
    for u, v in edges:
        graph.edges[u, v]["bandwidth"] *= EXCLUDED_LINK_FACTOR


def _without_gpus(node_type: dict, gone: set[int]) -> dict:
    sockets = [{**s, "switches": [{**sw, "gpus": [g for g in sw["gpus"] if g not in gone]}
                                  for sw in s["switches"]]}
               for s in node_type["sockets"]]
    return {**node_type, "sockets": sockets}


def _unknown(item: str, spec: ClusterSpec, graph: nx.Graph, why: str) -> TopologyError:
    """The one error for a name --exclude cannot place, with this cluster's spellings."""
    node = spec.nodes[0].name
    gpu = next(v for v, k in graph.nodes(data="kind") if k == "gpu")
    nic_link = next(((u, v) if graph.nodes[u].get("kind") == "nic" else (v, u)
                     for u, v in graph.edges
                     if {graph.nodes[u].get("kind"), graph.nodes[v].get("kind")} ==
                     {"nic", "leaf"}), None)
    link = "->".join(nic_link) if nic_link else "->".join(next(iter(graph.edges)))
    device = nic_link[0] if nic_link else next(v for v, k in graph.nodes(data="kind")
                                               if k != "gpu")
    return TopologyError(f"--exclude {item!r}: {why} in cluster {spec.name!r}; give a node "
                         f"({node}), a GPU ({gpu}), a device ({device}) or a link as preflight "
                         f"findings print it ({link}), several separated by commas")
