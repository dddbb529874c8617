"""Read the inside of a server from `nvidia-smi topo -m` text into a NodeTypeSpec."""

from __future__ import annotations

import re

from specs.cluster import NicSpec, NodeTypeSpec, PcieSwitchSpec, SocketSpec
from topology.graph import TopologyError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DEVICE = re.compile(r"^(GPU|NIC)(\d+)$")
SAME_SWITCH = {"PIX", "PXB"}  # through PCIe bridges only, never the CPU
SAME_SOCKET = SAME_SWITCH | {"PHB", "NODE"}  # through the CPU's host bridge(s), one NUMA node
KNOWN = SAME_SOCKET | {"SYS", "X"}


class _UnionFind:
    def __init__(self, items):
        self.parent = {i: i for i in items}

    def find(self, x):
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = sorted((self.find(a), self.find(b)))
        self.parent[rb] = ra


def parse_topo_matrix(text: str) -> tuple[list[str], dict[tuple[str, str], str], dict[str, str],
                                          dict[str, int]]:
    """(devices, path type per device pair, NIC legend name per NICk, NUMA node per GPU)."""
    lines = [_ANSI.sub("", ln).rstrip() for ln in text.splitlines()]
    header_i = next((i for i, ln in enumerate(lines) if ln.split()[:1] == ["GPU0"]), None)
    if header_i is None:
        raise TopologyError("nvidia-smi topo -m text: no header line starting with GPU0; paste "
                            "the whole output of `nvidia-smi topo -m`")
    header = lines[header_i].split()
    devices = [h for h in header if _DEVICE.match(h)]
    numa_col = None
    if "NUMA" in header:  # 'CPU Affinity' and 'NUMA Affinity' are two words each
        words = lines[header_i].split()
        numa_col = len(devices) + [w for w in words[len(devices):]].index("NUMA") // 2
    paths: dict[tuple[str, str], str] = {}
    numa: dict[str, int] = {}
    for ln in lines[header_i + 1:]:
        cells = ln.split()
        if not cells or not _DEVICE.match(cells[0]):
            if cells and cells[0] == "Legend:":
                break
            continue
        row, vals = cells[0], cells[1:]
        if len(vals) < len(devices):
            raise TopologyError(f"nvidia-smi topo -m text: row {row} has {len(vals)} cells, "
                                f"expected {len(devices)}; paste the output unwrapped")
        for col, v in zip(devices, vals):
            if v.startswith("NV"):
                raise TopologyError(f"nvidia-smi topo -m: {row}-{col} is {v} (NVLink); ringpilot "
                                    "models PCIe-only servers such as the L40S")
            if v not in KNOWN:
                raise TopologyError(f"nvidia-smi topo -m: {row}-{col} has unknown path type "
                                    f"{v!r}; expected one of {sorted(KNOWN)}")
            paths[(row, col)] = v
        if row.startswith("GPU") and numa_col is not None and len(vals) > numa_col:
            if vals[numa_col].isdigit():
                numa[row] = int(vals[numa_col])
    legend = {m.group(1): m.group(2)
              for m in re.finditer(r"^\s*(NIC\d+):\s*(\S+)", "\n".join(lines), re.M)}
    return devices, paths, legend, numa


def build_node_type_from_nvsmi(text: str, nic_link: str = "nic", gpu_model: str = "NVIDIA L40S"
                               ) -> NodeTypeSpec:
    """Sockets = devices joined by PIX/PXB/PHB/NODE paths; PCIe switches = devices joined by
    PIX/PXB; a GPU with no such partner sits on a bare root port; a NIC with no GPU under its
    switch hangs off its socket. NICs keep their legend names (mlx5_0 ...)."""
    devices, paths, legend, numa = parse_topo_matrix(text)
    socket_uf, switch_uf = _UnionFind(devices), _UnionFind(devices)
    for (a, b), v in paths.items():
        if v in SAME_SOCKET:
            socket_uf.union(a, b)
        if v in SAME_SWITCH:
            switch_uf.union(a, b)

    def idx(d: str) -> int:
        return int(_DEVICE.match(d).group(2))

    gpus = [d for d in devices if d.startswith("GPU")]
    if not gpus:
        raise TopologyError("nvidia-smi topo -m text lists no GPUs")
    roots = sorted({socket_uf.find(d) for d in devices},
                   key=lambda r: min((numa.get(g, 99), idx(g)) for g in gpus
                                     if socket_uf.find(g) == r) if any(
                       socket_uf.find(g) == r for g in gpus) else (99, 99))
    sockets, n_switches = [], 0
    for si, root in enumerate(roots):
        members = [d for d in devices if socket_uf.find(d) == root]
        groups: dict[str, list[str]] = {}
        for d in members:
            groups.setdefault(switch_uf.find(d), []).append(d)
        switches, socket_nics = [], []
        for group in sorted(groups.values(), key=lambda g: (not any(d.startswith("GPU") for d in g),
                                                             min(idx(d) for d in g))):
            g_idx = sorted(idx(d) for d in group if d.startswith("GPU"))
            nics = [NicSpec(name=legend.get(d, d.lower()), link=nic_link)
                    for d in sorted(group, key=idx) if d.startswith("NIC")]
            if g_idx:
                name = f"sw{n_switches}" if len(group) > 1 else f"rp{n_switches}"
                n_switches += 1
                switches.append(PcieSwitchSpec(name=name, gpus=g_idx, nics=nics))
            else:
                socket_nics += nics
        sockets.append(SocketSpec(name=f"cpu{si}", switches=switches, nics=socket_nics))
    return NodeTypeSpec(gpu_model=gpu_model, sockets=sockets,
                        socket_link="socket" if len(sockets) > 1 else None)
