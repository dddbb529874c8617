"""Sources of a ClusterSpec: a YAML file whose presets and node-type files become plain data.

A cluster description may stand for parts of itself: `preset: {kind: ..., nodes: ...}` for the
whole spec, `node_types.NAME: {nvidia_smi_topo: FILE}` or `{nccl_topo_xml: FILE}` for a server
read from a topology dump, or the same dump inline (`{nvidia_smi_topo_text: TEXT}`,
`{nccl_topo_xml_text: TEXT}`). This module expands those into the plain mapping the schema
(`specs.cluster.ClusterSpec`) validates, so the schema itself reads no file and imports no
parser. Kubernetes node labels are another source (`topology.k8s`).

A description written by someone else (a tenant's ConfigMap read by the operator) is expanded
with `allow_files=False`: its file keys are refused unread, so it cannot make the operator open
a path of the operator's own filesystem, nor learn whether one exists.
"""

from __future__ import annotations

from pathlib import Path

from specs.cluster import ClusterSpec
from specs.loading import SpecError, read_yaml, validate_data
from topology.ncclxml import build_node_type_from_nccl_xml
from topology.nvsmi import build_node_type_from_nvsmi
from topology.presets import build_preset

NODE_FILE_KEYS = ("nvidia_smi_topo", "nccl_topo_xml")
# The same dumps given inline, as text: what a ConfigMap written by a tenant must use.
NODE_TEXT_KEYS = {"nvidia_smi_topo_text": "nvidia_smi_topo", "nccl_topo_xml_text": "nccl_topo_xml"}
NODE_SOURCE_KEYS = (*NODE_FILE_KEYS, *NODE_TEXT_KEYS)
PRESET_BESIDE = {"name", "description", "unknown_topology"}


def load_cluster(path: str | Path) -> ClusterSpec:
    """A ClusterSpec YAML, node-type files resolved next to it; SpecError lists problems."""
    path = Path(path)
    return build_cluster(read_yaml(path), source=str(path), base_dir=path.resolve().parent)


def build_cluster(data: object, *, source: str, base_dir: Path | None = None,
                  allow_files: bool = True) -> ClusterSpec:
    """Expand presets and node-type files in `data` (relative to `base_dir`, else the current
    directory), then validate it; every problem is a SpecError line. `allow_files=False`: file
    keys are refused without touching the filesystem (inline `..._text` keys still work)."""
    return validate_data(expand_cluster_data(data, source=source, base_dir=base_dir,
                                             allow_files=allow_files),
                         ClusterSpec, source=source)


def expand_cluster_data(data: object, *, source: str, base_dir: Path | None = None,
                        allow_files: bool = True) -> object:
    """The plain mapping a cluster description stands for (anything but a mapping is returned
    unchanged, for the schema to reject)."""
    if not isinstance(data, dict):
        return data
    if "preset" in data:
        return _expand_preset(data, source)
    if isinstance(data.get("node_types"), dict):
        for tname, value in dict(data["node_types"]).items():
            if isinstance(value, dict) and set(NODE_SOURCE_KEYS) & set(value):
                data = _expand_node_file(data, tname, value, source, base_dir or Path.cwd(),
                                         allow_files)
    return data


def inline_node_files(data: dict, *, source: str, base_dir: Path) -> dict:
    """`data` with each node-type file reference replaced by the file's text under the inline key
    (`nvidia_smi_topo: F` -> `nvidia_smi_topo_text: <F's contents>`): the form a ConfigMap must
    carry, since the operator reads no file a tenant names. Unchanged when there is none."""
    from specs.files import read_bounded

    types = data.get("node_types")
    if not isinstance(types, dict):
        return data
    out = dict(types)
    for tname, value in types.items():
        if isinstance(value, dict) and len(value) == 1 and set(value) <= set(NODE_FILE_KEYS):
            key, name = next(iter(value.items()))
            if not isinstance(name, str):
                continue  # build_cluster says what is wrong with it
            path = Path(name) if Path(name).is_absolute() else base_dir / name
            try:
                out[tname] = {f"{key}_text": read_bounded(path, "topology")}
            except SpecError as e:
                raise SpecError(source, [f"node_types.{tname}.{key}: cannot read {str(path)!r} "
                                         f"({line.removeprefix('<file>: ')})"
                                         for line in e.lines]) from None
    return {**data, "node_types": out} if out != types else data


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


def _expand_node_file(data: dict, tname: str, value: dict, source: str, base_dir: Path,
                      allow_files: bool) -> dict:
    """node_types.NAME: {nvidia_smi_topo: FILE} or {nccl_topo_xml: FILE} (or the `_text` keys
    with the dump inline) -> the node type read from it (NCCL's NIC and PCIe link types are
    added unless already given)."""
    if len(value) != 1 or not isinstance(next(iter(value.values())), str):
        raise SpecError(source, [f"node_types.{tname}: a topology dump stands alone, got "
                                 f"{_short(value)}; give only one of "
                                 f"{', '.join(NODE_SOURCE_KEYS)}"])
    key, name = next(iter(value.items()))
    if key in NODE_TEXT_KEYS:
        text, key = name, NODE_TEXT_KEYS[key]
    elif not allow_files:
        # Said the same way whatever the path: the reader learns nothing about the filesystem.
        raise SpecError(source, [f"node_types.{tname}.{key}: file references are not read "
                                 "here (the description comes from a ConfigMap); give the dump "
                                 f"inline as {key}_text: |, e.g. `{key}_text: |` followed by "
                                 "the file's contents"])
    else:
        from specs.files import read_bounded

        path = Path(name) if Path(name).is_absolute() else base_dir / name
        try:
            text = read_bounded(path, "topology")
        except SpecError as e:
            raise SpecError(source, [f"node_types.{tname}.{key}: cannot read {str(path)!r} "
                                     f"({line.removeprefix('<file>: ')}); paths are relative "
                                     "to the cluster YAML" for line in e.lines]) from None
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


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
