"""Render the Kubernetes objects for a RunSpec file: the StagedTraining, a RayCluster, the CRD.

Every object is built as Python data and dumped by a yaml.SafeDumper, never assembled from
strings: a value (a --name, a label, a file's text) is always one scalar, so a newline in it
cannot start another document. The only text written by hand is the header comment, which is
kept to one line per comment whatever the command line holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from operators.rayjob import CLUSTER_FILE, build_ray_cluster_spec
from operators.resource import API_VERSION, DEFAULT_IMAGE, KIND, StagedTrainingSpec, build_crd
from specs.errors import SpecError
from specs.files import read_bounded
from specs.loading import read_yaml, validate_data
from specs.run import RunSpec
from topology.sources import inline_node_files, load_cluster

CRD_HEADER = ("# Generated from the pydantic models (operators/resource.py, specs/run.py) by\n"
              "#   ringpilot manifests crd > manifests/base/crd/stagedtrainings.ringpilot.io.yaml\n"
              "# Do not edit: tests/operators regenerate it and fail on any difference.\n")


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # shared dicts print twice, never as &anchors
        return True


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None  # embedded files stay readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_NoAliases.add_representer(str, _text)

# Kubernetes object names (DNS-1123 subdomain) and namespaces (DNS-1123 label)
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
ARGUMENTS = "ringpilot manifests arguments"  # the source named by a bad --name's error


def check_object_names(source: str, **fields: str | None) -> None:
    """SpecError naming each given metadata field that Kubernetes would refuse (names given on a
    command line end up in the objects: refuse them here, with the fix, not at `kubectl apply`)."""
    lines = []
    for field, value in fields.items():
        if value is None:
            continue
        label = field == "namespace"
        limit = 63 if label else 253
        pattern = _DNS_LABEL if label else _DNS_SUBDOMAIN
        if len(value) > limit or not pattern.fullmatch(value):
            kind = "DNS-1123 label" if label else "DNS-1123 subdomain"
            lines.append(f"--{field.replace('_', '-')}: not a Kubernetes name (got {value!r}; a "
                         f"{kind}: lower-case letters, digits and '-', at most {limit} "
                         "characters, e.g. tiny-run)")
    if lines:
        raise SpecError(source, lines)


def _dump(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_NoAliases, sort_keys=False, width=100)


def build_spec(run_file: str | Path, *, image: str = DEFAULT_IMAGE, ray_cluster: str | None = None,
               node_selector: dict[str, str] | None = None, storage_claim: str | None = None,
               gpus_per_node: int | None = None) -> dict[str, Any]:
    """The StagedTraining `spec`: the run file's own YAML, plus where it runs on Kubernetes."""
    check_object_names(ARGUMENTS, ray_cluster=ray_cluster, storage_claim=storage_claim)
    data = read_yaml(run_file)
    validate_data(data, RunSpec, source=str(run_file))  # a bad run file fails here, by field
    cluster: dict[str, Any] = {}
    if ray_cluster:
        cluster["selector"] = {"ray.io/cluster": ray_cluster}
    if storage_claim:
        cluster["storage_claim"] = storage_claim
    if gpus_per_node:
        cluster["gpus_per_node"] = gpus_per_node
    spec = {**data, "image": image}
    if cluster:
        spec["ray_cluster"] = cluster
    topology: dict[str, Any] = {}
    if data.get("resources", {}).get("cluster"):  # shipped as a ConfigMap: see render_cluster_map
        topology = {"source": "config-map", "config_map": cluster_map_name(data["name"])}
    if node_selector:
        topology = {"source": "node-labels", **topology, "node_selector": dict(node_selector)}
    if topology:
        spec["topology"] = topology
    validate_data(spec, StagedTrainingSpec, source=str(run_file))
    return spec


def cluster_map_name(run_name: str) -> str:
    return f"{run_name}-cluster"


def build_cluster_map(run_file: str | Path, data: dict[str, Any],
                      namespace: str | None) -> dict[str, Any] | None:
    """The ConfigMap carrying the run's ClusterSpec file, which the cluster cannot see as a file."""
    rel = data.get("resources", {}).get("cluster")
    if not rel:
        return None
    path = Path(run_file).parent / rel
    load_cluster(path)  # a broken cluster file fails here, by field
    text = read_bounded(path, "spec")
    data_in = read_yaml(path)
    inlined = inline_node_files(data_in, source=str(path), base_dir=path.resolve().parent)
    if inlined is not data_in:  # the operator reads no file a ConfigMap names: carry the dumps
        text = yaml.safe_dump(inlined, sort_keys=False)
    meta: dict[str, Any] = {"name": cluster_map_name(data["name"]),
                            "labels": {"app.kubernetes.io/part-of": "ringpilot"}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {CLUSTER_FILE: text}}


def render_staged_training(run_file: str | Path, *, name: str | None = None,
                           namespace: str | None = None, command: str = "", **kw: Any) -> str:
    """The StagedTraining object for `run_file` as YAML, headed by the command that made it;
    preceded by a ConfigMap with the ClusterSpec when the run names a cluster file."""
    check_object_names(ARGUMENTS, name=name, namespace=namespace)
    spec = build_spec(run_file, **kw)
    meta: dict[str, Any] = {"name": name or spec["name"]}
    if namespace:
        meta["namespace"] = namespace
    obj = {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}
    cluster_map = build_cluster_map(run_file, read_yaml(run_file), namespace)
    docs = ([_dump(cluster_map), "---\n"] if cluster_map else []) + [_dump(obj)]
    return _header(command) + "".join(docs)


def render_ray_cluster(run_file: str | Path, *, name: str, namespace: str | None = None,
                       command: str = "", **kw: Any) -> str:
    """A standalone RayCluster sized for the run (what the operator would build per stage)."""
    check_object_names(ARGUMENTS, name=name, namespace=namespace)
    spec = StagedTrainingSpec.model_validate(build_spec(run_file, **kw))
    meta: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "ringpilot"}}
    if namespace:
        meta["namespace"] = namespace
    obj = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta,
           "spec": build_ray_cluster_spec(spec, excluded=[])}
    return _header(command) + _dump(obj)


def render_crd() -> str:
    return CRD_HEADER + _dump(build_crd())


def _header(command: str) -> str:
    """The comment naming the command; anything YAML could read as a line break (\\n, \\r,
    NEL, U+2028/9) or any other unprintable character is escaped, so it stays one comment."""
    if not command:
        return ""
    line = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in command)
    return f"# Generated by: {line}\n# Regenerate instead of editing; tests fail on drift.\n"
