"""Read the inside of a server from NCCL's topology dump (NCCL_TOPO_DUMP_FILE)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from specs.cluster import LinkType, NicSpec, NodeTypeSpec, PcieSwitchSpec, SocketSpec
from topology.graph import TopologyError
from topology.profile import L40S, HardwareProfile

_BRIDGE = "0x0604"  # PCI class code of a PCI-to-PCI bridge (a switch port)


def _pcie_gb_s(el: ET.Element, profile: HardwareProfile) -> float | None:
    """Usable GB/s per direction of a PCIe link from NCCL's link_speed / link_width."""
    m = re.match(r"\s*([\d.]+)\s*GT/s", el.get("link_speed", ""))
    width = el.get("link_width", "")
    if not m or not width.isdigit():
        return None
    gts = float(m.group(1))
    encoding = 128 / 130 if gts >= 8 else 0.8  # Gen3+ 128b/130b, Gen1-2 8b/10b
    return gts * int(width) * encoding / 8 * profile.pcie_efficiency


def _collect(el: ET.Element, gpus: list[int], nics: list[ET.Element]) -> None:
    for gpu in el.iter("gpu"):
        gpus.append(int(gpu.get("dev")))
    for net in el.iter("net"):
        nics.append(net)


def build_node_type_from_nccl_xml(text: str, profile: HardwareProfile = L40S,
                                  gpu_model: str = "NVIDIA L40S"
                                  ) -> tuple[NodeTypeSpec, dict[str, LinkType]]:
    """Each <cpu> is a socket; each bridge directly under it is a PCIe switch holding every GPU
    and NIC in its subtree; a GPU or NIC directly under a <cpu> sits on a bare root port. Link
    types: 'pcie' from the GPUs' link speed and width, 'nic-<Gb>g' from each NIC's speed."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise TopologyError(f"NCCL topology XML does not parse ({e}); give the file "
                            "NCCL_TOPO_DUMP_FILE wrote") from None
    if root.tag != "system":
        raise TopologyError(f"NCCL topology XML: root element is <{root.tag}>, expected <system>")
    if root.find(".//nvlink") is not None:
        raise TopologyError("NCCL topology XML has <nvlink> elements; ringpilot models "
                            "PCIe-only servers such as the L40S")
    links: dict[str, LinkType] = {}
    pcie = []
    sockets, n_sw = [], 0

    def nic_specs(nets: list[ET.Element]) -> list[NicSpec]:
        out = []
        for net in nets:
            mbps = float(net.get("speed", "0") or 0)
            if mbps <= 0:
                raise TopologyError(f"NCCL topology XML: NIC {net.get('name')!r} has speed "
                                    f"{net.get('speed')!r}; expected Mb/s > 0")
            name = f"nic-{mbps / 1000:g}g"
            links[name] = LinkType(bandwidth_gb_s=round(mbps / 8000 * profile.nic_efficiency, 3),
                                   latency_us=profile.nic_latency_us,
                                   description=f"{mbps / 1000:g} Gb/s port from the NCCL dump")
            out.append(NicSpec(name=net.get("name") or f"net{net.get('dev')}", link=name))
        return out

    for cpu in sorted(root.findall("cpu"), key=lambda c: int(c.get("numaid", "0"))):
        switches, sock_nics = [], []
        for child in cpu:
            gpus: list[int] = []
            nets: list[ET.Element] = []
            _collect(child, gpus, nets)
            for el in child.iter("pci"):
                if el.find("gpu") is not None:
                    bw = _pcie_gb_s(el, profile)
                    if bw:
                        pcie.append(bw)
            is_bridge = child.tag == "pci" and child.get("class", "").startswith(_BRIDGE)
            if gpus:
                name = f"sw{n_sw}" if is_bridge else f"rp{n_sw}"
                n_sw += 1
                switches.append(PcieSwitchSpec(name=name, gpus=sorted(gpus), nics=nic_specs(nets)))
            elif nets:
                sock_nics += nic_specs(nets)
        sockets.append(SocketSpec(name=f"cpu{cpu.get('numaid', len(sockets))}",
                                  switches=switches, nics=sock_nics))
    if not any(s.switches for s in sockets):
        raise TopologyError("NCCL topology XML has no <gpu> under any <cpu>")
    links["pcie"] = LinkType(bandwidth_gb_s=round(min(pcie) if pcie else profile.pcie_gb_s(), 3),
                             latency_us=profile.pcie_latency_us,
                             description="slowest GPU PCIe link in the NCCL dump, at the "
                             "profile's achievable fraction")
    links["socket"] = LinkType(bandwidth_gb_s=profile.socket_link_gb_s,
                               latency_us=profile.socket_link_latency_us,
                               description="inter-socket link from the hardware profile")
    nt = NodeTypeSpec(gpu_model=gpu_model, sockets=[s for s in sockets if s.switches or s.nics],
                      socket_link="socket" if len(sockets) > 1 else None)
    return nt, links
