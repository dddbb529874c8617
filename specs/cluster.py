"""ClusterSpec: a cluster's GPUs, PCIe tree, sockets, NICs and fabric switches (a seam).

The schema only: it reads no file. Presets and node types read from `nvidia-smi topo -m` or NCCL
XML files are expanded into plain data by `topology.sources` before validation.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specs.degrees import MAX_GPUS

# Ceilings, far above real hardware and finite so that building the graph stays polynomial in
# what a real cluster has: 2**15 nodes (more than 100k GPUs at 8 per node; and at most MAX_GPUS
# GPUs in all), 256 GPUs, switches or NICs per node (servers have 8-16 GPUs; the routes inside a
# node type are computed for every pair of its GPUs and NICs), fabrics at most 8 switch levels
# deep (leaf, spine, core are 3), names of at most 253 characters (a DNS name, as Kubernetes node
# names are).
MAX_NODES = 1 << 15
MAX_GPU_INDEX = 255
MAX_PER_NODE = 256  # GPUs, sockets, switches or NICs of one node
MAX_SWITCHES = 1 << 16
MAX_FABRIC_DEPTH = 8
MAX_NAME = 253
MAX_BANDWIDTH_GB_S = 1e6  # GB/s of one link: 1000x an NVLink 5 GPU's total
MAX_LATENCY_US = 1e9      # us: over 15 minutes, far past any link

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]


class _Spec(BaseModel):
    # allow_inf_nan=False: `inf`/`nan` bandwidths or latencies are refused as "should be a finite
    # number" instead of reaching a division in the cost model.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LinkType(_Spec):
    """A kind of link: every link of this kind has this bandwidth and latency."""

    bandwidth_gb_s: float = Field(le=MAX_BANDWIDTH_GB_S, description="Usable bandwidth per "
                                  "direction, GB/s (> 0, finite, at most 1e6).")
    latency_us: float = Field(0.0, ge=0, le=MAX_LATENCY_US, description="One-way latency of one "
                              "traversal, us (finite, at most 1e9).")
    description: str = Field("", max_length=4096, description="What the link is, and where its "
                             "number comes from.")

    @field_validator("bandwidth_gb_s")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"bandwidth_gb_s must be > 0 GB/s, got {v}; give the usable "
                             "bandwidth per direction (e.g. 25.2 for PCIe Gen4 x16 at 80%)")
        return v


class NicSpec(_Spec):
    """A network port of a node, hanging off a PCIe switch or straight off a socket."""

    name: Name = Field(description="NIC name inside the node, e.g. 'nic0' or 'mlx5_0'.")
    link: Name = Field(description="Link type (key of link_types) from the NIC to its leaf switch.")
    pcie_link: Name = Field("pcie", description="Link type between the NIC and its PCIe switch or "
                           "socket.")


class PcieSwitchSpec(_Spec):
    """A PCIe switch (or a bare root port) with the GPUs and NICs below it."""

    name: Name = Field(description="Switch name inside the node, e.g. 'sw0'.")
    gpus: list[Annotated[int, Field(ge=0, le=MAX_GPU_INDEX)]] = Field(
        default_factory=list, max_length=MAX_PER_NODE, description="Local GPU indices (CUDA "
        "order) below this switch: 0 to 255 (servers have 8-16 GPUs).")
    nics: list[NicSpec] = Field(default_factory=list, max_length=MAX_PER_NODE,
                                description="NICs below this switch (at most 256).")
    gpu_link: Name = Field("pcie", description="Link type between a GPU or NIC and this switch.")
    uplink: Name = Field("pcie", description="Link type between this switch and its CPU socket.")


class SocketSpec(_Spec):
    """A CPU socket (one PCIe root complex / NUMA node)."""

    name: Name = Field(description="Socket name inside the node, e.g. 'cpu0'.")
    switches: list[PcieSwitchSpec] = Field(default_factory=list, max_length=MAX_PER_NODE,
                                           description="PCIe switches under this socket (at most "
                                           "256).")
    nics: list[NicSpec] = Field(default_factory=list, max_length=MAX_PER_NODE,
                                description="NICs on a root port of this socket (no switch "
                                "between; at most 256).")


class NodeTypeSpec(_Spec):
    """The inside of one kind of server: sockets, PCIe switches, GPUs, NICs."""

    gpu_model: str = Field("NVIDIA L40S", max_length=MAX_NAME, description="GPU model (for the "
                           "report).")
    sockets: list[SocketSpec] = Field(min_length=1, max_length=64, description="CPU sockets, in "
                                      "NUMA order (at most 64).")
    socket_link: Name | None = Field("socket", description="Link type between sockets; required "
                                    "with more than one socket.")

    @property
    def gpus(self) -> list[int]:
        return sorted(g for s in self.sockets for sw in s.switches for g in sw.gpus)

    @property
    def nics(self) -> list[str]:
        names = [n.name for s in self.sockets for n in s.nics]
        names += [n.name for s in self.sockets for sw in s.switches for n in sw.nics]
        return sorted(names)

    def link_names(self) -> set[str]:
        used = {self.socket_link} if self.socket_link and len(self.sockets) > 1 else set()
        for s in self.sockets:
            used |= {n.link for n in s.nics} | {n.pcie_link for n in s.nics}
            for sw in s.switches:
                used |= {sw.gpu_link, sw.uplink} | {n.link for n in sw.nics}
                used |= {n.pcie_link for n in sw.nics}
        return used

    @model_validator(mode="after")
    def _consistent(self) -> NodeTypeSpec:
        gpus = [g for s in self.sockets for sw in s.switches for g in sw.gpus]
        dup = sorted(g for g, c in Counter(gpus).items() if c > 1)
        if dup:
            raise ValueError(f"GPU indices {dup} appear under more than one PCIe switch; each "
                             "local GPU index belongs to exactly one switch")
        if not gpus:
            raise ValueError("node type has no GPUs; list local GPU indices under a PCIe switch")
        if len(gpus) > MAX_PER_NODE:
            raise ValueError(f"node type has {len(gpus)} GPUs, more than the {MAX_PER_NODE} a "
                             "node may have; describe each server, not a whole rack, as a node")
        names = [s.name for s in self.sockets]
        names += [sw.name for s in self.sockets for sw in s.switches]
        names += self.nics
        dup_names = sorted(n for n, c in Counter(names).items() if c > 1)
        if dup_names:
            raise ValueError(f"names {dup_names} are used twice inside the node; make them unique")
        if len(self.sockets) > 1 and self.socket_link is None:
            raise ValueError(
                f"{len(self.sockets)} sockets but socket_link is null: the GPUs of "
                f"{self.sockets[1].name} would be disconnected from {self.sockets[0].name}; set "
                "socket_link to a link type (e.g. 'socket')")
        return self


class NodeSpec(_Spec):
    """One server and where its NICs plug into the fabric."""

    name: Name = Field(description="Node name (Kubernetes node / hostname / Ray node id).")
    node_type: Name = Field(description="Key of node_types.")
    leaf: Name | None = Field(None, description="Leaf switch all NICs plug into (null for a "
                              "single-node cluster).")
    nic_leaves: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_PER_NODE,
                                         description="Per-NIC leaf, overriding `leaf` "
                                       "(rail-optimised fabrics: NIC k -> rail k).")

    def leaf_of(self, nic: str) -> str | None:
        return self.nic_leaves.get(nic, self.leaf)


class SwitchSpec(_Spec):
    """A fabric switch level element: a leaf, or a spine/core layer seen as one vertex (ECMP
    across its members is modelled as perfect spreading over the aggregate uplink)."""

    name: Name = Field(description="Switch name, e.g. 'leaf-00' or 'spine'.")
    level: Literal["leaf", "spine", "core"] = Field(description="Level, closest to the nodes "
                                                    "first.")
    parent: Name | None = Field(None, description="The switch above (spine of a leaf, core of a "
                               "spine); null at the top.")
    uplink_gb_s: float | None = Field(None, le=MAX_BANDWIDTH_GB_S * MAX_NODES, description=
                                      "Aggregate bandwidth to the parent per direction, GB/s "
                                      "(finite); null: downlink total / oversubscription.")
    oversubscription: float = Field(1.0, gt=0, le=1e4, description="Downlink:uplink ratio used "
                                    "when uplink_gb_s is null (1 = non-blocking; at most 1e4).")
    latency_us: float = Field(1.0, ge=0, le=MAX_LATENCY_US, description="Latency through this "
                              "switch, us (finite, at most 1e9).")

    @field_validator("uplink_gb_s")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"uplink_gb_s must be > 0 GB/s, got {v}; give the aggregate uplink "
                             "bandwidth or leave it null and set oversubscription")
        return v


def _switch_roots(switches: dict[str, SwitchSpec]) -> dict[str, str]:
    """The top switch above each switch, each chain walked once (linear in the switches, however
    deep the chains); ValueError naming a switch on a cycle or a chain deeper than
    MAX_FABRIC_DEPTH levels (which would make every route that long)."""
    root: dict[str, str] = {}
    depth: dict[str, int] = {}  # levels from a switch up to its top, both counted
    for start in switches:
        chain: list[str] = []
        on_chain: set[str] = set()
        cur: str | None = start
        while cur is not None and cur not in root:
            if cur in on_chain:
                raise ValueError(f"switch parents form a cycle through {cur!r}; the fabric "
                                 "must be a tree (leaf -> spine -> core)")
            chain.append(cur)
            on_chain.add(cur)
            cur = switches[cur].parent
        top, above = (root[cur], depth[cur]) if cur is not None else (chain[-1], 0)
        for k, name in enumerate(reversed(chain), start=1):
            root[name], depth[name] = top, above + k
        if depth[start] > MAX_FABRIC_DEPTH:
            raise ValueError(f"switch {start!r} is {depth[start]} levels deep under its top "
                             f"switch {top!r}; a fabric has at most {MAX_FABRIC_DEPTH} levels "
                             "(leaf, spine, core: 3); check the parent fields")
    return root


class UnknownNode(_Spec):
    """A node whose network position is unknown: reported, never planned into a ring."""

    name: Name = Field(description="Node name.")
    gpus: int = Field(ge=0, le=MAX_PER_NODE, description="GPUs the node offers (at most 256).")
    reason: str = Field(max_length=4096, description="Why its position is unknown (e.g. missing "
                        "labels).")


class ClusterSpec(_Spec):
    """The cluster's hardware and network: what the planner places rings on."""

    name: Name = Field(description="Cluster name.")
    description: str = Field("", max_length=1 << 16, description="Free text (what it is, where "
                             "numbers come from).")
    profile: Name = Field("l40s", description="Hardware profile (topology.profile) for compute, "
                         "memory and default link numbers.")
    link_types: dict[Name, LinkType] = Field(max_length=1024, description="Link kinds by name (at "
                                             "most 256).")
    node_types: dict[Name, NodeTypeSpec] = Field(max_length=1024, description="Server kinds by "
                                                 "name (at most 256).")
    nodes: list[NodeSpec] = Field(min_length=1, max_length=MAX_NODES, description="Servers, in "
                                  "any order; at most 2**15 (and 2**17 GPUs in all).")
    switches: list[SwitchSpec] = Field(default_factory=list, max_length=MAX_SWITCHES,
                                       description="Fabric switches (at most 2**16).")
    unknown_topology: list[UnknownNode] = Field(
        default_factory=list, max_length=MAX_NODES, description="Nodes without a known network "
        "position: listed in reports, left out of plans. At most 2**15.")

    @model_validator(mode="after")
    def _references(self) -> ClusterSpec:
        for tname, nt in self.node_types.items():
            for link in sorted(nt.link_names() - set(self.link_types)):
                raise ValueError(f"node_types.{tname} uses link type {link!r}, which is not in "
                                 f"link_types {sorted(self.link_types)}; add it or fix the name")
        names = Counter(n.name for n in self.nodes)
        dup = sorted(n for n, c in names.items() if c > 1)
        if dup:
            raise ValueError(f"nodes: names {dup} appear twice; node names must be unique")
        switches = {s.name: s for s in self.switches}
        if len(switches) != len(self.switches):
            raise ValueError("switches: a switch name appears twice; make names unique")
        for s in self.switches:
            if s.parent is not None and s.parent not in switches:
                raise ValueError(f"switch {s.name!r} has parent {s.parent!r}, an unknown vertex; "
                                 f"declare it under switches (known: {sorted(switches)[:8]})")
        roots = _switch_roots(switches)  # parent chains must end (no cycles)
        gpus = sum(len(self.node_types[n.node_type].gpus) for n in self.nodes
                   if n.node_type in self.node_types)
        if gpus > MAX_GPUS:
            raise ValueError(f"nodes: {gpus} GPUs in all, more than the {MAX_GPUS} a cluster "
                             "description may hold; describe the part of the cluster a run uses")
        for node in self.nodes:
            if node.node_type not in self.node_types:
                raise ValueError(f"node {node.name!r} has node_type {node.node_type!r}, which is "
                                 f"not in node_types {sorted(self.node_types)}")
            nics = self.node_types[node.node_type].nics
            for nic in sorted(set(node.nic_leaves) - set(nics)):
                raise ValueError(f"node {node.name!r}: nic_leaves names NIC {nic!r}, an unknown "
                                 f"vertex (node type has {nics})")
            for nic in nics:
                leaf = node.leaf_of(nic)
                if leaf is not None and leaf not in switches:
                    raise ValueError(f"node {node.name!r} NIC {nic!r} links to leaf {leaf!r}, "
                                     f"an unknown vertex; declare it under switches")
        if len(self.nodes) > 1:
            self._check_fabric_connects(roots)
        return self

    def _check_fabric_connects(self, root_of: dict[str, str]) -> None:
        roots = set()
        for node in self.nodes:
            leaves = [node.leaf_of(n) for n in self.node_types[node.node_type].nics]
            leaves = [lf for lf in leaves if lf is not None]
            if not leaves:
                raise ValueError(
                    f"node {node.name!r} has no NIC connected to a leaf switch, so its GPUs are "
                    "disconnected from the other nodes; give it `leaf:` (and NICs in its node "
                    "type) or move it to unknown_topology")
            roots.update(root_of[lf] for lf in leaves)
        if len(roots) > 1:
            raise ValueError(f"the fabric has several top switches {sorted(roots)} with no common "
                             "parent, so their GPUs are disconnected; give them a common "
                             "spine/core")

    @property
    def num_gpus(self) -> int:
        return sum(len(self.node_types[n.node_type].gpus) for n in self.nodes)

    def summary(self) -> str:
        """A few lines a person can check against what they meant."""
        leaves = [s for s in self.switches if s.level == "leaf"]
        lines = [f"cluster {self.name}: {len(self.nodes)} nodes, {self.num_gpus} GPUs, "
                 f"{len(leaves)} leaf switches, {len(self.switches) - len(leaves)} spine/core "
                 f"switches, profile {self.profile}"]
        for tname, nt in sorted(self.node_types.items()):
            count = sum(1 for n in self.nodes if n.node_type == tname)
            sws = sum(len(s.switches) for s in nt.sockets)
            lines.append(f"  {count} x {tname}: {len(nt.gpus)} x {nt.gpu_model}, "
                         f"{len(nt.sockets)} sockets, {sws} PCIe switches, {len(nt.nics)} NICs")
        for name, lt in sorted(self.link_types.items()):
            lines.append(f"  link {name}: {lt.bandwidth_gb_s:g} GB/s, {lt.latency_us:g} us")
        if self.unknown_topology:
            lines.append(f"  unknown topology (left out of plans): "
                         f"{', '.join(u.name for u in self.unknown_topology)}")
        return "\n".join(lines)

    def without_nodes(self, names: list[str]) -> ClusterSpec:
        """A copy without the named nodes (what-if a node is lost)."""
        known = {n.name for n in self.nodes}
        for name in names:
            if name not in known:
                raise ValueError(f"--without-node {name!r}: no such node; known nodes start "
                                 f"{sorted(known)[:5]}")
        data = self.model_dump()
        data["nodes"] = [n for n in data["nodes"] if n["name"] not in names]
        return ClusterSpec.model_validate(data)
