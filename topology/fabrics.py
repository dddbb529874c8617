"""Generated fabrics: valid ClusterSpecs of the shapes users bring, for testing the planner.

The presets describe one well-behaved server and regular leaf/spine clusters of it; users bring
rail-optimised cabling, mixed NIC counts and speeds, odd GPU numbering, partial leaves, degraded
links and several node types at once. `build_generated_cluster` draws such a cluster from a
`pick` function, so the same generator serves a hypothesis strategy (pick = draw from
`sampled_from`, shrinkable) and the benchmark (pick = a seeded `random.Random.choice`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from specs.cluster import (
    ClusterSpec,
    LinkType,
    NicSpec,
    NodeSpec,
    NodeTypeSpec,
    PcieSwitchSpec,
    SocketSpec,
    SwitchSpec,
)

Pick = Callable[[Sequence[Any]], Any]

LINKS = {  # GB/s per direction, latency us: PCIe Gen4, a degraded PCIe link, socket, NICs
    "pcie": LinkType(bandwidth_gb_s=25.2, latency_us=1.0),
    "pcie-degraded": LinkType(bandwidth_gb_s=6.3, latency_us=1.0),
    "socket": LinkType(bandwidth_gb_s=16.0, latency_us=2.0),
    "socket-slow": LinkType(bandwidth_gb_s=8.0, latency_us=2.0),
    "nic": LinkType(bandwidth_gb_s=22.5, latency_us=3.0),
    "nic-100g": LinkType(bandwidth_gb_s=11.2, latency_us=3.0),
    "nic-400g": LinkType(bandwidth_gb_s=45.0, latency_us=3.0),
}


def build_generated_node_type(pick: Pick, gpus_per_switch: Sequence[int] = (1, 2)
                              ) -> NodeTypeSpec:
    """1-2 sockets of 1-2 PCIe switches; 1-4 NICs, each on any switch or socket root port;
    GPU ids in PCIe order or interleaved across sockets (as `nvidia-smi` shows on some boards);
    now and then a degraded switch uplink or a slow socket link."""
    shape = [[pick(gpus_per_switch) for _ in range(pick([1, 2]))] for _ in range(pick([1, 2]))]
    slots = [(s, k, j) for s, sws in enumerate(shape) for k, n in enumerate(sws)
             for j in range(n)]
    if pick(["ordered", "interleaved"]) == "interleaved":  # round-robin over the sockets
        order = sorted(slots, key=lambda x: (sum(n for n in shape[x[0]][:x[1]]) + x[2], x[0]))
    else:
        order = slots
    gpu_id = {slot: i for i, slot in enumerate(order)}
    places = [(s, k) for s, sws in enumerate(shape) for k in range(len(sws))]
    places += [(s, None) for s in range(len(shape))]  # a socket's root port
    nic_at: dict[tuple[int, int | None], list[NicSpec]] = {}
    for i in range(pick([1, 2, 3, 4])):
        where = pick(places)
        nic_at.setdefault(where, []).append(NicSpec(name=f"nic{i}",
                                                    link=pick(["nic", "nic", "nic-100g",
                                                               "nic-400g"])))
    degraded = pick([None, None, None] + places[:len(places) - len(shape)])
    sockets = []
    for s, sws in enumerate(shape):
        switches = [PcieSwitchSpec(name=f"sw{s}{k}",
                                   gpus=sorted(gpu_id[(s, k, j)] for j in range(n)),
                                   nics=nic_at.get((s, k), []),
                                   uplink="pcie-degraded" if degraded == (s, k) else "pcie")
                    for k, n in enumerate(sws)]
        sockets.append(SocketSpec(name=f"cpu{s}", switches=switches, nics=nic_at.get((s, None),
                                                                                      [])))
    return NodeTypeSpec(gpu_model="NVIDIA L40S", sockets=sockets,
                        socket_link=pick(["socket", "socket", "socket-slow"]))


def build_generated_cluster(pick: Pick, nodes: Sequence[int] = range(1, 7),
                            leaves: Sequence[int] = (1, 2, 3), max_gpus: int = 16,
                            gpus_per_switch: Sequence[int] = (1, 2),
                            name: str = "generated") -> ClusterSpec:
    """A valid cluster: 1-3 node types, `nodes` nodes (dropped from the end while more than
    `max_gpus` GPUs), under `leaves` leaves (some partly filled) of one spine, each leaf's
    uplink oversubscribed 1:1 to 16:1; NICs cabled to the node's leaf or, rail-optimised, NIC k
    to leaf k mod leaves."""
    types = {f"type-{t}": build_generated_node_type(pick, gpus_per_switch)
             for t in range(pick([1, 1, 2, 3]))}
    names = sorted(types)
    chosen = [pick(names) for _ in range(pick(list(nodes)))]
    while len(chosen) > 1 and sum(len(types[t].gpus) for t in chosen) > max_gpus:
        chosen.pop()
    n_leaves = min(pick(list(leaves)), len(chosen)) if len(chosen) > 1 else 0
    leaf_names = [f"leaf-{i}" for i in range(n_leaves)]
    over = pick([1.0, 2.0, 4.0, 8.0, 16.0])
    switches = [SwitchSpec(name="spine", level="spine")] if n_leaves else []
    switches += [SwitchSpec(name=lf, level="leaf", parent="spine", oversubscription=over)
                 for lf in leaf_names]
    rails = n_leaves > 1 and pick([False, False, True])
    node_specs = []
    for i, t in enumerate(chosen):
        if not n_leaves:
            node_specs.append(NodeSpec(name=f"n{i}", node_type=t))
        elif rails:
            nics = types[t].nics
            node_specs.append(NodeSpec(name=f"n{i}", node_type=t, nic_leaves={
                nic: leaf_names[k % n_leaves] for k, nic in enumerate(nics)}))
        else:
            node_specs.append(NodeSpec(name=f"n{i}", node_type=t, leaf=pick(leaf_names)))
    used = {lf for n in node_specs for lf in [n.leaf, *n.nic_leaves.values()] if lf}
    switches = [s for s in switches if s.level == "spine" or s.name in used]
    return ClusterSpec(name=name, description="generated fabric", link_types=dict(LINKS),
                       node_types=types, nodes=node_specs, switches=switches)
