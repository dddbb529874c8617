"""Build a ClusterSpec from Kubernetes node labels (NVIDIA topograph or Kueue-style levels)."""

from __future__ import annotations

from typing import Iterable

from specs.cluster import ClusterSpec, NodeSpec, NodeTypeSpec, SwitchSpec, UnknownNode
from topology.presets import build_generic_node_type, build_l40s_node_type, build_link_types
from topology.profile import MAX_GPUS_PER_NODE  # more is a broken device plugin or a forged node

TOPOGRAPH = "network.topology.nvidia.com"
# Topograph's levels, closest to the node first (accelerator = NVLink domain: not a switch of a
# PCIe cluster, so it is read but not used as a network level).
TOPOGRAPH_LEVELS = [f"{TOPOGRAPH}/leaf", f"{TOPOGRAPH}/spine", f"{TOPOGRAPH}/core"]
# Kueue TAS style: levels given broadest first, like a Kueue Topology object's spec.levels.
KUEUE_LEVELS = ["cloud.provider.com/topology-block", "cloud.provider.com/topology-rack",
                "kubernetes.io/hostname"]
GPU_RESOURCE = "nvidia.com/gpu"
_LEVEL_NAMES = ["leaf", "spine", "core"]


def _items(nodes) -> list:
    return list(getattr(nodes, "items", nodes) or [])


def _gpus(node) -> int:
    """The node's `nvidia.com/gpu` capacity; ValueError naming the node when it is not a
    whole number from 0 to MAX_GPUS_PER_NODE."""
    cap = (node.status.capacity or {}) if node.status else {}
    raw = cap.get(GPU_RESOURCE, 0)
    text = str(raw).strip()
    if isinstance(raw, bool) or not (text.isascii() and text.isdigit() and len(text) <= 6) \
            or int(text) > MAX_GPUS_PER_NODE:
        raise ValueError(f"node {node.metadata.name!r}: capacity {GPU_RESOURCE} is "
                         f"{text[:20]!r}, not a whole number from 0 to {MAX_GPUS_PER_NODE}; fix "
                         "the node's device plugin, or leave the node out")
    return int(text)


def _levels_of(labels: dict[str, str], kueue_levels: list[str]) -> list[str] | None:
    """Switch label values closest-first, or None when the node's leaf is unknown."""
    if labels.get(f"{TOPOGRAPH}/leaf"):
        return [labels[k] for k in TOPOGRAPH_LEVELS if labels.get(k)]
    above_host = [k for k in kueue_levels if k != "kubernetes.io/hostname"][::-1]
    if above_host and labels.get(above_host[0]):
        return [labels[k] for k in above_host if labels.get(k)]
    return None


def _node_type_for(gpus: int, node_type: NodeTypeSpec | None) -> NodeTypeSpec:
    if node_type is not None and len(node_type.gpus) == gpus:
        return node_type
    if gpus % 4 == 0:
        return build_l40s_node_type(nics=4 if gpus >= 8 else 2, gpus=gpus)
    return build_generic_node_type(gpus)


def build_cluster_from_k8s(nodes, name: str = "k8s", node_type: NodeTypeSpec | None = None,
                           kueue_levels: list[str] | None = None,
                           oversubscription: float = 1.0) -> ClusterSpec:
    """Nodes (a V1NodeList or V1Node objects) -> ClusterSpec. GPU count from the
    `nvidia.com/gpu` capacity; position from topograph labels, else Kueue-style level labels.
    GPU nodes without them go to `unknown_topology` (listed, never planned); nodes without GPUs
    are skipped. Labels do not say how fast uplinks are: `oversubscription` applies to all."""
    kueue_levels = kueue_levels or KUEUE_LEVELS
    known, unknown = [], []
    for node in sorted(_items(nodes), key=lambda n: n.metadata.name):
        gpus = _gpus(node)
        if gpus <= 0:
            continue
        labels = node.metadata.labels or {}
        levels = _levels_of(labels, kueue_levels)
        if levels is None:
            unknown.append(UnknownNode(
                name=node.metadata.name, gpus=gpus,
                reason=f"no {TOPOGRAPH}/leaf label nor {kueue_levels[-2]} label"))
        else:
            known.append((node.metadata.name, gpus, levels))
    if not known:
        raise ValueError(f"none of the {len(unknown)} GPU nodes carries topology labels "
                         f"({TOPOGRAPH}/leaf or {kueue_levels[-2]}); label them (e.g. with "
                         "NVIDIA topograph) or write a ClusterSpec YAML")
    switches: dict[str, SwitchSpec] = {}
    tops = set()
    for _, _, levels in known:
        names = [f"{_LEVEL_NAMES[i]}.{v}" for i, v in enumerate(levels[:3])]
        for i, sw in enumerate(names):
            parent = names[i + 1] if i + 1 < len(names) else None
            prev = switches.get(sw)
            if prev is not None and prev.parent != parent:
                raise ValueError(f"switch {sw!r} has two parents ({prev.parent!r}, {parent!r}) "
                                 "in the node labels; fix the labels of its nodes")
            switches[sw] = SwitchSpec(name=sw, level=_LEVEL_NAMES[i], parent=parent,
                                      oversubscription=oversubscription)
        tops.add(names[-1])
    if len(tops) > 1:  # labels stop below a common switch: join the tops by an assumed one
        top_level = max(_LEVEL_NAMES.index(switches[t].level) for t in tops) + 1
        if top_level >= len(_LEVEL_NAMES):
            raise ValueError(f"several core switches {sorted(tops)} with nothing above them")
        root = f"{_LEVEL_NAMES[top_level]}.assumed-top"
        for t in tops:
            switches[t] = switches[t].model_copy(update={"parent": root})
        switches[root] = SwitchSpec(name=root, level=_LEVEL_NAMES[top_level])
    types: dict[str, NodeTypeSpec] = {}
    specs = []
    for node_name, gpus, levels in known:
        tname = f"gpu{gpus}"
        types.setdefault(tname, _node_type_for(gpus, node_type))
        specs.append(NodeSpec(name=node_name, node_type=tname, leaf=f"leaf.{levels[0]}"))
    return ClusterSpec(
        name=name, description=f"from Kubernetes node labels ({len(specs)} placed, "
        f"{len(unknown)} unknown); uplinks {oversubscription:g}:1 assumed",
        link_types=build_link_types(), node_types=types, nodes=specs,
        switches=sorted(switches.values(), key=lambda s: s.name), unknown_topology=unknown)


def load_k8s_nodes(context: str | None = None) -> list:
    """Nodes of the current kube context (needs a reachable API server; not exercised here)."""
    from kubernetes import client, config

    config.load_kube_config(context=context)
    return client.CoreV1Api().list_node().items


def build_cluster_from_kube_context(context: str | None = None, **kw) -> ClusterSpec:
    return build_cluster_from_k8s(load_k8s_nodes(context), **kw)


def iter_label_summary(nodes: Iterable) -> list[str]:
    """One line per node: name, GPUs, topology labels (for debugging a labelling)."""
    out = []
    for n in sorted(_items(nodes), key=lambda n: n.metadata.name):
        labels = {k: v for k, v in (n.metadata.labels or {}).items() if "topology" in k}
        try:
            gpus = f"{_gpus(n)} GPUs"
        except ValueError as e:  # the summary is for finding such nodes: say it, go on
            gpus = str(e)
        out.append(f"{n.metadata.name}: {gpus} {labels}")
    return out
