"""Ready-made ClusterSpecs: an 8x L40S two-socket PCIe server and leaf/spine clusters of them."""

from __future__ import annotations

from specs.cluster import (
    MAX_NODES,
    MAX_PER_NODE,
    ClusterSpec,
    LinkType,
    NicSpec,
    NodeSpec,
    NodeTypeSpec,
    PcieSwitchSpec,
    SocketSpec,
    SwitchSpec,
)
from topology.profile import L40S, HardwareProfile


def _check_count(name: str, value: object, most: int, least: int = 1) -> int:
    """A preset's count, refused before anything is built when it is not a whole number in
    [least, most]: the ceilings of specs.cluster, so a preset of 10**8 nodes costs nothing."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number (got {value!r})")
    if not least <= value <= most:
        raise ValueError(f"{name}={value} is out of range: give {least} to {most}")
    return value


def build_link_types(profile: HardwareProfile = L40S) -> dict[str, LinkType]:
    """The link kinds of a PCIe GPU server and its fabric, from the hardware profile."""
    return {
        "pcie": LinkType(bandwidth_gb_s=round(profile.pcie_gb_s(), 2),
                         latency_us=profile.pcie_latency_us,
                         description="PCIe Gen4 x16 at the profile's achievable fraction"),
        "socket": LinkType(bandwidth_gb_s=profile.socket_link_gb_s,
                           latency_us=profile.socket_link_latency_us,
                           description="GPU traffic across the CPU inter-socket link (assumption)"),
        "nic": LinkType(bandwidth_gb_s=round(profile.nic_effective_gb_s(), 2),
                        latency_us=profile.nic_latency_us,
                        description="one 200 Gb/s NIC port at the profile's achievable fraction"),
    }


def build_l40s_node_type(nics: int = 4, gpus: int = 8, interleaved: bool = False) -> NodeTypeSpec:
    """A two-socket PCIe server: each socket has gpus/4 PCIe switches of two GPUs; `nics` NICs
    spread evenly over the switches (4: one per switch, 2: one per socket, 1: on socket 0).
    `interleaved`: GPU indices alternate between the sockets (0, 2, 4.. on cpu0), as on servers
    whose device order does not follow the PCIe tree."""
    _check_count("gpus", gpus, MAX_PER_NODE)
    _check_count("nics", nics, 4, least=0)
    if gpus % 4 or gpus <= 0:
        raise ValueError(f"gpus={gpus}: the L40S preset needs a multiple of 4 GPUs (2 sockets x "
                         "PCIe switches of 2 GPUs)")
    n_switches = gpus // 2
    if nics not in (0, 1, 2, 4) or (nics and n_switches % nics and nics > n_switches):
        raise ValueError(f"nics={nics}: use 0, 1, 2 or 4 NICs per node")
    every = n_switches // nics if nics else 0
    sockets = []
    for s in range(2):
        switches = []
        for k in range(n_switches // 2):
            idx = s * (n_switches // 2) + k
            has_nic = every and idx % every == 0
            nic = [NicSpec(name=f"nic{idx // every}", link="nic")] if has_nic else []
            pair = ([2 * k * 2 + s, (2 * k + 1) * 2 + s] if interleaved else [2 * idx, 2 * idx + 1])
            switches.append(PcieSwitchSpec(name=f"sw{idx}", gpus=pair, nics=nic))
        sockets.append(SocketSpec(name=f"cpu{s}", switches=switches))
    return NodeTypeSpec(gpu_model="NVIDIA L40S", sockets=sockets, socket_link="socket")


def build_generic_node_type(gpus: int) -> NodeTypeSpec:
    """A one-socket server with switches of two GPUs and one NIC (for GPU counts the two-socket
    preset does not cover)."""
    _check_count("gpus", gpus, MAX_PER_NODE)
    switches = [PcieSwitchSpec(name=f"sw{i // 2}", gpus=list(range(i, min(i + 2, gpus))),
                               nics=[NicSpec(name="nic0", link="nic")] if i == 0 else [])
                for i in range(0, gpus, 2)]
    return NodeTypeSpec(sockets=[SocketSpec(name="cpu0", switches=switches)], socket_link=None)


def build_preset(kind: str, **kw) -> ClusterSpec:
    """A preset by name: 'l40s-server' or 'l40s-leaf-spine' (keyword arguments as the builders)."""
    builders = {"l40s-server": build_l40s_server, "l40s-leaf-spine": build_leaf_spine_cluster}
    if kind not in builders:
        raise ValueError(f"unknown preset kind {kind!r}; use one of {sorted(builders)}")
    return builders[kind](**kw)


def build_l40s_server(name: str = "node-000", nics: int = 4, gpus: int = 8,
                      interleaved: bool = False) -> ClusterSpec:
    """One L40S two-socket server on its own."""
    return ClusterSpec(
        name=f"l40s-server-{name}", description=f"one {gpus}x L40S two-socket PCIe server",
        link_types=build_link_types(),
        node_types={"l40s-8x": build_l40s_node_type(nics, gpus, interleaved)},
        nodes=[NodeSpec(name=name, node_type="l40s-8x")])


def build_leaf_spine_cluster(nodes: int, nodes_per_leaf: int = 16, oversubscription: float = 1.0,
                             nics: int = 4, rails: bool = False, name: str | None = None,
                             leaves_per_spine: int | None = None, gpus: int = 8,
                             interleaved: bool = False) -> ClusterSpec:
    """`nodes` 8x L40S servers under leaves of `nodes_per_leaf`, one spine layer (and a core
    layer when `leaves_per_spine` splits the leaves into pods). With `rails`, NIC k of every
    node in a leaf group plugs into that group's rail-k leaf (rail-optimised)."""
    _check_count("nodes", nodes, MAX_NODES)
    _check_count("nodes_per_leaf", nodes_per_leaf, MAX_NODES)
    if leaves_per_spine is not None:
        _check_count("leaves_per_spine", leaves_per_spine, MAX_NODES)
    node_type = build_l40s_node_type(nics, gpus, interleaved)
    groups = -(-nodes // nodes_per_leaf)
    switches: list[SwitchSpec] = []
    pods = 1 if leaves_per_spine is None else -(-groups // leaves_per_spine)
    if pods > 1:
        switches.append(SwitchSpec(name="core", level="core"))
        for p in range(pods):
            switches.append(SwitchSpec(name=f"spine-{p:02d}", level="spine", parent="core",
                                       oversubscription=oversubscription))
    else:
        switches.append(SwitchSpec(name="spine", level="spine"))
    node_specs = []
    for grp in range(groups):
        spine = f"spine-{grp // leaves_per_spine:02d}" if pods > 1 else "spine"
        leaf_names = ([f"leaf-{grp:02d}-rail{k}" for k in range(nics)] if rails
                      else [f"leaf-{grp:02d}"])
        for lf in leaf_names:
            switches.append(SwitchSpec(name=lf, level="leaf", parent=spine,
                                       oversubscription=oversubscription))
        for i in range(grp * nodes_per_leaf, min(nodes, (grp + 1) * nodes_per_leaf)):
            if rails:
                node_specs.append(NodeSpec(name=f"node-{i:03d}", node_type="l40s-8x",
                                           nic_leaves={f"nic{k}": leaf_names[k]
                                                       for k in range(nics)}))
            else:
                node_specs.append(NodeSpec(name=f"node-{i:03d}", node_type="l40s-8x",
                                           leaf=leaf_names[0]))
    kind = "rail-optimised" if rails else "leaf/spine"
    return ClusterSpec(
        name=name or f"l40s-{nodes}x8-{kind.replace('/', '-')}",
        description=f"{nodes} x 8 L40S two-socket servers, {nics} x 200G NICs each, {kind}, "
                    f"{nodes_per_leaf} nodes per leaf group, {oversubscription:g}:1 oversubscribed",
        link_types=build_link_types(), node_types={"l40s-8x": node_type},
        nodes=node_specs, switches=switches)
