"""Read the inside of a server from NCCL's topology dump (NCCL_TOPO_DUMP_FILE)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from pydantic import ValidationError

from specs.cluster import LinkType, NicSpec, NodeTypeSpec, PcieSwitchSpec, SocketSpec
from topology.graph import TopologyError
from topology.profile import L40S, MAX_GPUS_PER_NODE, HardwareProfile

_BRIDGE = "0x0604"  # PCI class code of a PCI-to-PCI bridge (a switch port)
SOURCE = "NCCL topology XML"
HINT = "give the file NCCL_TOPO_DUMP_FILE wrote, unedited"
# NCCL's dump of a server is a few hundred elements a dozen deep; the caps refuse a crafted
# file long before its tree could exhaust memory or the recursion of whoever walks it.
MAX_ELEMENTS = 20_000
MAX_DEPTH = 64
MAX_GPUS = 1024
_INT = re.compile(r"[0-9]{1,6}", re.ASCII)
_NUMBER = re.compile(r"[0-9]{1,12}(\.[0-9]{1,12})?", re.ASCII)
_LINK_SPEED = re.compile(r"\s*([0-9]{1,4}(?:\.[0-9]{1,6})?)\s*GT/s", re.ASCII)
_NIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", re.ASCII)
MAX_NIC_MBPS = 10_000_000  # 10 Tb/s: ten times the fastest port sold; beyond is not a NIC
MAX_LINK_WIDTH = 32  # PCIe's widest link


@dataclass
class Element:
    """An XML element with the line it starts on (ElementTree keeps no line numbers)."""

    tag: str
    attrib: dict[str, str]
    line: int
    children: list[Element] = field(default_factory=list)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.attrib.get(key, default)

    def iter(self, tag: str):
        """Descendants (and self) with `tag`, document order, without recursion."""
        stack = [self]
        while stack:
            el = stack.pop()
            if el.tag == tag:
                yield el
            stack.extend(reversed(el.children))

    def where(self) -> str:
        return f"line {self.line}, <{self.tag}>"


class _Refused(Exception):
    """Raised from an expat handler to stop the parse; carries the TopologyError's text."""


def parse_xml(text: str, source: str = SOURCE) -> Element:
    """The element tree of `text`, refusing any DTD (so no entity can be declared, let alone
    expanded: billion laughs and external entities never start) and trees beyond the caps."""
    if not isinstance(text, str):
        raise TopologyError(f"{source}: expected text, got {type(text).__name__}; {HINT}")
    if not text.strip():
        raise TopologyError(f"{source}: is empty; {HINT}")
    parser = expat.ParserCreate()
    stack: list[Element] = []
    roots: list[Element] = []
    count = 0

    def refuse(problem: str, hint: str = HINT):
        raise _Refused(f"{source}, line {parser.CurrentLineNumber}: {problem}; {hint}")

    def doctype(name, *_):
        refuse(f"has a DOCTYPE declaration (<!DOCTYPE {str(name)[:20]} ...>); NCCL writes none, "
               "and DTDs can declare entities that expand without bound",
               "remove the DOCTYPE and any ENTITY declarations")

    def entity(name, *_):
        refuse(f"declares the entity {str(name)[:20]!r}", "remove the ENTITY declarations")

    def start(tag, attrib):
        nonlocal count
        count += 1
        if count > MAX_ELEMENTS:
            refuse(f"more than {MAX_ELEMENTS} elements; a server's dump has a few hundred",
                   "give the dump of one server")
        if len(stack) >= MAX_DEPTH:
            refuse(f"elements nested more than {MAX_DEPTH} deep", "give the dump of one server")
        el = Element(tag, attrib, parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(el)
        stack.append(el)

    def end(tag):
        stack.pop()

    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = entity
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(text, True)
    except _Refused as e:
        raise TopologyError(str(e)) from None
    except expat.ExpatError as e:
        raise TopologyError(f"{source}, line {e.lineno}: does not parse "
                            f"({expat.ErrorString(e.code)}, column {e.offset + 1}); "
                            f"{HINT}") from None
    except (ValueError, RecursionError) as e:  # e.g. text the parser cannot encode
        raise TopologyError(f"{source}: does not parse ({e.__class__.__name__}); {HINT}"
                            ) from None
    return roots[0]


def _fail(el: Element, source: str, problem: str, hint: str = HINT):
    raise TopologyError(f"{source}, {el.where()}: {problem}; {hint}")


def _attr_int(el: Element, key: str, source: str, limit: int) -> int:
    raw = el.get(key)
    if raw is None:
        _fail(el, source, f"has no {key} attribute")
    if not _INT.fullmatch(raw.strip()) or int(raw) > limit:
        _fail(el, source, f"{key}={raw[:20]!r} is not a whole number from 0 to {limit}")
    return int(raw)


def _pcie_gb_s(el: Element, profile: HardwareProfile, source: str) -> float | None:
    """Usable GB/s per direction of a PCIe link from NCCL's link_speed / link_width; None when
    NCCL could not read them (an empty or 'Unknown' speed, a width of 0)."""
    speed, width = el.get("link_speed", ""), el.get("link_width", "")
    if speed.strip().lower() in ("", "unknown") or width.strip() in ("", "0"):
        return None
    m = _LINK_SPEED.match(speed)
    if not m or not _INT.fullmatch(width.strip()):
        _fail(el, source, f"link_speed={speed[:20]!r} link_width={width[:20]!r} is not a PCIe "
              "link like link_speed=\"16.0 GT/s PCIe\" link_width=\"16\"")
    gts, lanes = float(m.group(1)), int(width)
    if not (0 < gts <= 1000) or not (0 < lanes <= MAX_LINK_WIDTH):
        _fail(el, source, f"a PCIe link of {gts:g} GT/s x{lanes} is not physical "
              f"(expected 0 < GT/s <= 1000 and 0 < width <= {MAX_LINK_WIDTH})")
    encoding = 128 / 130 if gts >= 8 else 0.8  # Gen3+ 128b/130b, Gen1-2 8b/10b
    return gts * lanes * encoding / 8 * profile.pcie_efficiency


def read_nccl_xml_file(path: str | Path, profile: HardwareProfile = L40S,
                       gpu_model: str = "NVIDIA L40S"
                       ) -> tuple[NodeTypeSpec, dict[str, LinkType]]:
    """The node type and link types in a saved NCCL topology dump, read with the size bound of a
    topology file; every problem is one SpecError naming the file."""
    from specs.files import read_bounded
    from specs.loading import SpecError

    text = read_bounded(path, "topology")
    try:
        return build_node_type_from_nccl_xml(text, profile, gpu_model, source=str(path))
    except TopologyError as e:
        raise SpecError(str(path), [str(e).removeprefix(f"{path}, ").removeprefix(f"{path}: ")]
                        ) from None


def build_node_type_from_nccl_xml(text: str, profile: HardwareProfile = L40S,
                                  gpu_model: str = "NVIDIA L40S", source: str = SOURCE
                                  ) -> tuple[NodeTypeSpec, dict[str, LinkType]]:
    """Each <cpu> is a socket; each bridge directly under it is a PCIe switch holding every GPU
    and NIC in its subtree; a GPU or NIC directly under a <cpu> sits on a bare root port. Link
    types: 'pcie' from the GPUs' link speed and width, 'nic-<Gb>g' from each NIC's speed.
    Anything else is one TopologyError naming `source`, the line and element, and the fix."""
    root = parse_xml(text, source)
    if root.tag != "system":
        _fail(root, source, f"the root element is <{root.tag[:40]}>, expected <system>")
    for el in root.iter("nvlink"):
        _fail(el, source, "is an NVLink", "ringpilot models PCIe-only servers such as the L40S")
    cpus = [c for c in root.children if c.tag == "cpu"]
    in_cpu = {id(g) for c in cpus for g in c.iter("gpu")} | {id(n) for c in cpus
                                                              for n in c.iter("net")}
    for tag in ("gpu", "net"):
        for el in root.iter(tag):
            if id(el) not in in_cpu:
                _fail(el, source, "is not inside a <cpu> directly under <system>")
    devs: dict[int, Element] = {}
    for gpu in root.iter("gpu"):
        dev = _attr_int(gpu, "dev", source, MAX_GPUS - 1)
        if dev in devs:
            _fail(gpu, source, f"GPU dev={dev} appears twice (first on line {devs[dev].line})")
        devs[dev] = gpu
        if len(devs) > MAX_GPUS_PER_NODE:
            _fail(gpu, source, f"more than {MAX_GPUS_PER_NODE} GPUs, more than one server holds",
                  "give the dump of one server")
    numaids: dict[int, Element] = {}
    for cpu in cpus:
        nid = _attr_int(cpu, "numaid", source, 4095) if "numaid" in cpu.attrib else len(numaids)
        if nid in numaids:
            _fail(cpu, source, f"numaid={nid} is given to two <cpu> (first on line "
                  f"{numaids[nid].line})")
        numaids[nid] = cpu
    links: dict[str, LinkType] = {}
    nic_names: dict[str, Element] = {}
    pcie = []
    sockets, n_sw = [], 0

    def nic_specs(nets: list[Element]) -> list[NicSpec]:
        out = []
        for net in nets:
            raw = net.get("speed")
            if raw is None:
                _fail(net, source, "has no speed attribute (Mb/s)")
            if not _NUMBER.fullmatch(raw.strip()) or not (0 < float(raw) <= MAX_NIC_MBPS):
                _fail(net, source, f"speed={raw[:20]!r} is not a NIC speed in Mb/s "
                      f"(a number above 0 and at most {MAX_NIC_MBPS:,})")
            mbps = float(raw)
            name = net.get("name")
            if name is None:
                name = f"net{_attr_int(net, 'dev', source, 4095)}"
            if not _NIC_NAME.fullmatch(name):
                _fail(net, source, f"name={name[:20]!r} is not a NIC name (letters, digits, "
                      "'_.:-', at most 64)")
            if name in nic_names:
                _fail(net, source, f"NIC {name!r} appears twice (first on line "
                      f"{nic_names[name].line})")
            nic_names[name] = net
            link = f"nic-{mbps / 1000:g}g"
            links[link] = LinkType(bandwidth_gb_s=round(mbps / 8000 * profile.nic_efficiency, 3),
                                   latency_us=profile.nic_latency_us,
                                   description=f"{mbps / 1000:g} Gb/s port from the NCCL dump")
            out.append(NicSpec(name=name, link=link))
        return out

    for nid, cpu in sorted(numaids.items()):
        switches, sock_nics = [], []
        for child in cpu.children:
            gpus = sorted(_attr_int(g, "dev", source, MAX_GPUS - 1) for g in child.iter("gpu"))
            nets = list(child.iter("net"))
            for el in child.iter("pci"):
                if any(c.tag == "gpu" for c in el.children):
                    bw = _pcie_gb_s(el, profile, source)
                    if bw:
                        pcie.append(bw)
            is_bridge = child.tag == "pci" and (child.get("class") or "").startswith(_BRIDGE)
            if gpus:
                name = f"sw{n_sw}" if is_bridge else f"rp{n_sw}"
                n_sw += 1
                switches.append(PcieSwitchSpec(name=name, gpus=gpus, nics=nic_specs(nets)))
            elif nets:
                sock_nics += nic_specs(nets)
        sockets.append(SocketSpec(name=f"cpu{nid}", switches=switches, nics=sock_nics))
    if not any(s.switches for s in sockets):
        _fail(root, source, "no <gpu> under any <cpu>")
    bw = min(pcie) if pcie else profile.pcie_gb_s()
    if not math.isfinite(bw) or bw <= 0:  # the bounds above make this unreachable; kept as a net
        _fail(root, source, f"PCIe bandwidth {bw} GB/s is not a positive finite number")
    links["pcie"] = LinkType(bandwidth_gb_s=round(bw, 3), latency_us=profile.pcie_latency_us,
                             description="slowest GPU PCIe link in the NCCL dump, at the "
                             "profile's achievable fraction")
    links["socket"] = LinkType(bandwidth_gb_s=profile.socket_link_gb_s,
                               latency_us=profile.socket_link_latency_us,
                               description="inter-socket link from the hardware profile")
    kept = [s for s in sockets if s.switches or s.nics]
    try:
        nt = NodeTypeSpec(gpu_model=gpu_model, sockets=kept,
                          socket_link="socket" if len(kept) > 1 else None)
    except ValidationError as e:  # e.g. a NIC named like a socket
        problem = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise TopologyError(f"{source}: the server it describes is not valid: {problem}; "
                            f"{HINT}") from None
    return nt, links
