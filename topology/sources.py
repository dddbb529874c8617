"""Sources of a ClusterSpec: a YAML file whose presets and node-type files become plain data.

A cluster description may stand for parts of itself: `preset: {kind: ..., nodes: ...}` for the
whole spec, `node_types.NAME: {nvidia_smi_topo: FILE}` or `{nccl_topo_xml: FILE}` for a server
read from a topology dump. This module expands those into the plain mapping the schema
(`specs.cluster.ClusterSpec`) validates, so the schema itself reads no file and imports no
parser. Kubernetes node labels are another source (`topology.k8s`).
"""

from __future__ import annotations

from pathlib import Path

from specs.cluster import ClusterSpec
from specs.loading import SpecError, read_yaml, validate_data
from topology.ncclxml import build_node_type_from_nccl_xml
from topology.nvsmi import build_node_type_from_nvsmi
from topology.presets import build_preset

NODE_FILE_KEYS = ("nvidia_smi_topo", "nccl_topo_xml")
PRESET_BESIDE = {"name", "description", "unknown_topology"}


def load_cluster(path: str | Path) -> ClusterSpec:
    """A ClusterSpec YAML, node-type files resolved next to it; SpecError lists problems."""
    path = Path(path)
    return build_cluster(read_yaml(path), source=str(path), base_dir=path.resolve().parent)


def build_cluster(data: object, *, source: str, base_dir: Path | None = None) -> ClusterSpec:
    """Expand presets and node-type files in `data` (relative to `base_dir`, else the current
    directory), then validate it; every problem is a SpecError line."""
    return validate_data(expand_cluster_data(data, source=source, base_dir=base_dir),
                         ClusterSpec, source=source)


def expand_cluster_data(data: object, *, source: str, base_dir: Path | None = None) -> object:
    """The plain mapping a cluster description stands for (anything but a mapping is returned
    unchanged, for the schema to reject)."""
    if not isinstance(data, dict):
        return data
    if "preset" in data:
        return _expand_preset(data, source)
    if isinstance(data.get("node_types"), dict):
        for tname, value in dict(data["node_types"]).items():
            if isinstance(value, dict) and set(NODE_FILE_KEYS) & set(value):
                data = _expand_node_file(data, tname, value, source, base_dir or Path.cwd())
    return data


def _expand_preset(data: dict, source: str) -> dict:
    """`preset: {kind: l40s-leaf-spine, nodes: 64, ...}` stands for the whole spec."""
    rest = {k: v for k, v in data.items() if k != "preset"}
    if set(rest) - PRESET_BESIDE:
        raise SpecError(source, [f"preset: give only name/description beside it, got "
                                 f"{sorted(rest)}"])
    if not isinstance(data["preset"], dict):
        raise SpecError(source, [f"preset: expected a mapping like {{kind: l40s-leaf-spine, "
                                 f"nodes: 64}}, got {data['preset']!r}"])
    args = dict(data["preset"])
    try:
        spec = build_preset(args.pop("kind", "l40s-leaf-spine"), **args)
    except (TypeError, ValueError) as e:
        raise SpecError(source, [f"preset: {e}; see topology.presets"]) from None
    return {**spec.model_dump(), **rest}


def _expand_node_file(data: dict, tname: str, value: dict, source: str, base_dir: Path) -> dict:
    """node_types.NAME: {nvidia_smi_topo: FILE} or {nccl_topo_xml: FILE} -> the node type read
    from that file (NCCL's NIC and PCIe link types are added unless already given)."""
    if len(value) != 1 or not isinstance(next(iter(value.values())), str):
        raise SpecError(source, [f"node_types.{tname}: a file reference stands alone, got "
                                 f"{value!r}; give only nvidia_smi_topo: FILE or "
                                 "nccl_topo_xml: FILE"])
    key, name = next(iter(value.items()))
    path = Path(name) if Path(name).is_absolute() else base_dir / name
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(source, [f"node_types.{tname}.{key}: cannot read {str(path)!r} "
                                 f"({e.strerror}); paths are relative to the "
                                 "cluster YAML"]) from None
    try:
        if key == "nvidia_smi_topo":
            node_type, links = build_node_type_from_nvsmi(text), {}
        else:
            node_type, links = build_node_type_from_nccl_xml(text)
    except ValueError as e:
        raise SpecError(source, [f"node_types.{tname}.{key}: {e}"]) from None
    given = data.get("link_types")
    link_types = ({**{k: v.model_dump() for k, v in links.items()}, **given}
                  if isinstance(given, dict) else given)
    return {**data, "link_types": link_types,
            "node_types": {**data["node_types"], tname: node_type.model_dump()}}
