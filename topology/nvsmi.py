"""Read the inside of a server from `nvidia-smi topo -m` text into a NodeTypeSpec."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from specs.cluster import NicSpec, NodeTypeSpec, PcieSwitchSpec, SocketSpec
from topology.graph import TopologyError
from topology.profile import MAX_GPUS_PER_NODE

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Control characters no terminal output of nvidia-smi holds (tab, CR, LF and ANSI escapes do).
_BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")
_DEVICE = re.compile(r"(GPU|NIC)([0-9]+)", re.ASCII)
_NUMA = re.compile(r"[0-9]{1,4}", re.ASCII)
# NIC names become vertex names of the cluster graph and appear in reports: kernel-style names.
_NIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", re.ASCII)
SAME_SWITCH = {"PIX", "PXB"}  # through PCIe bridges only, never the CPU
SAME_SOCKET = SAME_SWITCH | {"PHB", "NODE"}  # through the CPU's host bridge(s), one NUMA node
KNOWN = SAME_SOCKET | {"SYS", "X"}
# A server has at most a few dozen GPUs and NICs; the matrix is quadratic in them, so a header
# of a million devices is refused before any row is read.
MAX_DEVICES = 256
MAX_INDEX = 1023
SOURCE = "nvidia-smi topo -m text"
HINT = "paste the whole output of `nvidia-smi topo -m`, unwrapped and unedited"


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


def _short(s: str, n: int = 40) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def _device(word: str) -> tuple[str, int] | None:
    """('GPU', 3) for 'GPU3'; None for a word that is not a device name."""
    m = _DEVICE.fullmatch(word)
    return (m.group(1), int(m.group(2))) if m and len(m.group(2)) <= 4 else None


def parse_topo_matrix(text: str, source: str = SOURCE
                      ) -> tuple[list[str], dict[tuple[str, str], str], dict[str, str],
                                 dict[str, int]]:
    """(devices, path type per device pair, NIC legend name per NICk, NUMA node per GPU).

    Every way the text can differ from what nvidia-smi prints is one TopologyError naming
    `source`, the line and the fix: a row not in the header, a short row, a path type that is
    not a PCIe one, a device listed twice, a matrix that disagrees with itself."""

    def fail(line_no: int | None, problem: str, hint: str = HINT):
        where = f", line {line_no}" if line_no is not None else ""
        raise TopologyError(f"{source}{where}: {problem}; {hint}")

    if not isinstance(text, str):
        fail(None, f"expected text, got {type(text).__name__}")
    bad = _BINARY.search(text)
    if bad:
        fail(text.count("\n", 0, bad.start()) + 1,
             f"binary data (character {ord(bad.group()):#04x})", "give the text file itself")
    lines = [_ANSI.sub("", ln).rstrip() for ln in text.splitlines()]
    if not any(lines):
        fail(None, "is empty")
    header_i = next((i for i, ln in enumerate(lines) if ln.split()[:1] == ["GPU0"]), None)
    if header_i is None:
        fail(None, "no header line starting with GPU0")
    words = lines[header_i].split()
    devices: list[str] = []
    for w in words:
        if not _DEVICE.fullmatch(w):
            break
        devices.append(w)
    tail = words[len(devices):]
    stray = next((w for w in tail if _DEVICE.fullmatch(w)), None)
    if stray is not None:
        fail(header_i + 1, f"device {_short(stray)} comes after the column titles "
             f"{' '.join(tail[:tail.index(stray)])!r}")
    if len(devices) > MAX_DEVICES:
        fail(header_i + 1, f"{len(devices)} devices in the header, more than the {MAX_DEVICES} "
             "a server has", "give the output of one server")
    seen: set[tuple[str, int]] = set()
    for d in devices:
        parsed = _device(d)
        kind = d[:3]
        if parsed is None or d != f"{kind}{parsed[1]}" or parsed[1] > MAX_INDEX:
            fail(header_i + 1, f"device name {_short(d)} is not {kind}0..{kind}{MAX_INDEX}")
        if parsed in seen:
            fail(header_i + 1, f"{d} appears twice in the header")
        seen.add(parsed)
    numa_col = None
    if "NUMA" in tail:  # 'CPU Affinity' and 'NUMA Affinity' are two words each
        numa_col = len(devices) + tail.index("NUMA") // 2
    paths: dict[tuple[str, str], str] = {}
    numa: dict[str, int] = {}
    row_line: dict[str, int] = {}
    end = len(lines)
    for i in range(header_i + 1, len(lines)):
        cells = lines[i].split()
        if not cells:
            continue
        if cells[0] in ("Legend:", "NIC") or cells[0].startswith("Legend"):
            end = i
            break
        row, vals = cells[0], cells[1:]
        if _device(row) is None:
            fail(i + 1, f"expected a row starting with GPUk or NICk, got {_short(lines[i])}")
        if row not in devices:
            fail(i + 1, f"row {_short(row)} is not in the header "
                 f"({devices[0]}..{devices[-1]})")
        if row in row_line:
            fail(i + 1, f"row {row} appears twice (first on line {row_line[row]})")
        row_line[row] = i + 1
        if len(vals) < len(devices):
            fail(i + 1, f"row {row} has {len(vals)} cells, expected {len(devices)}")
        for col, v in zip(devices, vals):
            if v.startswith("NV"):
                fail(i + 1, f"{row}-{col} is {v[:8]} (NVLink)",
                     "ringpilot models PCIe-only servers such as the L40S")
            if v not in KNOWN:
                fail(i + 1, f"{row}-{col} has unknown path type {_short(v)}; expected one of "
                     f"{sorted(KNOWN)}")
            if (v == "X") != (row == col):
                fail(i + 1, f"{row}-{col} is {v}, but X (self) belongs on the diagonal and only "
                     "there")
            paths[(row, col)] = v
        if row.startswith("GPU") and numa_col is not None and len(vals) > numa_col:
            if _NUMA.fullmatch(vals[numa_col]):
                numa[row] = int(vals[numa_col])
    missing = [d for d in devices if d not in row_line]
    if missing:
        fail(None, f"{', '.join(missing)} in the header but without a row")
    for (a, b), v in paths.items():
        if paths[(b, a)] != v:
            fail(row_line[a], f"{a}-{b} is {v} but {b}-{a} (line {row_line[b]}) is "
                 f"{paths[(b, a)]}; the matrix must be symmetric")
    legend: dict[str, str] = {}
    for i in range(end, len(lines)):
        m = re.match(r"\s*(NIC[0-9]+):\s*(\S*)\s*$", lines[i], re.ASCII)
        if not m:
            continue
        nic, name = m.groups()
        if nic not in devices:
            fail(i + 1, f"the NIC legend names {nic}, which is not in the header")
        if nic in legend:
            fail(i + 1, f"the NIC legend names {nic} twice")
        if not _NIC_NAME.fullmatch(name):
            fail(i + 1, f"{nic}'s name {_short(name)} is not a NIC name (letters, digits, "
                 "'_.:-', at most 64)")
        if name in legend.values():
            fail(i + 1, f"the NIC legend gives the name {name!r} to two NICs")
        legend[nic] = name
    return devices, paths, legend, numa


def read_nvsmi_file(path: str | Path, nic_link: str = "nic", gpu_model: str = "NVIDIA L40S"
                    ) -> NodeTypeSpec:
    """The node type in a saved `nvidia-smi topo -m` file, read with the size bound of a
    topology file; every problem is one SpecError naming the file."""
    from specs.files import read_bounded
    from specs.loading import SpecError

    text = read_bounded(path, "topology")
    try:
        return build_node_type_from_nvsmi(text, nic_link=nic_link, gpu_model=gpu_model,
                                          source=str(path))
    except TopologyError as e:
        raise SpecError(str(path), [str(e).removeprefix(f"{path}, ").removeprefix(f"{path}: ")]
                        ) from None


def build_node_type_from_nvsmi(text: str, nic_link: str = "nic", gpu_model: str = "NVIDIA L40S",
                               source: str = SOURCE) -> NodeTypeSpec:
    """Sockets = devices joined by PIX/PXB/PHB/NODE paths; PCIe switches = devices joined by
    PIX/PXB; a GPU with no such partner sits on a bare root port; a NIC with no GPU under its
    switch hangs off its socket. NICs keep their legend names (mlx5_0 ...)."""
    devices, paths, legend, numa = parse_topo_matrix(text, source)
    socket_uf, switch_uf = _UnionFind(devices), _UnionFind(devices)
    for (a, b), v in paths.items():
        if v in SAME_SOCKET:
            socket_uf.union(a, b)
        if v in SAME_SWITCH:
            switch_uf.union(a, b)

    def idx(d: str) -> int:
        return _device(d)[1]

    gpus = [d for d in devices if d.startswith("GPU")]
    if not gpus:
        raise TopologyError(f"{source}: lists no GPUs; {HINT}")
    if len(gpus) > MAX_GPUS_PER_NODE:
        raise TopologyError(f"{source}: lists {len(gpus)} GPUs, more than the "
                            f"{MAX_GPUS_PER_NODE} one server holds; give the output of one server")
    # A socket's place: the lowest (NUMA node, GPU index) among its GPUs; GPU-less ones last.
    first_gpu: dict[str, tuple[int, int]] = {}
    for g in gpus:
        r = socket_uf.find(g)
        first_gpu[r] = min(first_gpu.get(r, (1 << 30, 0)), (numa.get(g, 1 << 20), idx(g)))
    roots = sorted({socket_uf.find(d) for d in devices},
                   key=lambda r: first_gpu.get(r, (1 << 30, 1 << 30)))
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
    try:
        return NodeTypeSpec(gpu_model=gpu_model, sockets=sockets,
                            socket_link="socket" if len(sockets) > 1 else None)
    except ValidationError as e:  # e.g. a legend name that is also a NIC's default name
        problem = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise TopologyError(f"{source}: the server it describes is not valid: {problem}; "
                            f"{HINT}") from None
