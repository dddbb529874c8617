"""Re-planning inputs: which nodes a stage may use, how many workers fit, whether the topology
ConfigMap is usable. Pure functions of observed Node objects and the spec."""

from __future__ import annotations

from typing import Any

from operators.rayjob import CLUSTER_FILE, worker_pods
from operators.resource import StagedTrainingSpec
from specs.loading import SpecError, parse_yaml
from topology.planner import PlanError
from topology.run_plan import plan_from_workers
from topology.sources import build_cluster


def node_usable(node: dict[str, Any]) -> bool:
    """Ready and not cordoned."""
    if node.get("spec", {}).get("unschedulable"):
        return False
    for cond in node.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def plan_eligible_nodes(nodes: list[dict[str, Any]], selector: dict[str, str],
                        excluded: list[str]) -> list[str]:
    """Usable nodes carrying every selector label, minus excluded ones, sorted by name."""
    names = []
    for node in nodes:
        meta = node.get("metadata", {})
        labels = meta.get("labels", {}) or {}
        if all(labels.get(k) == v for k, v in selector.items()) and node_usable(node):
            if meta["name"] not in excluded:
                names.append(meta["name"])
    return sorted(names)


def plan_lost_nodes(used: list[str], nodes: list[dict[str, Any]]) -> list[str]:
    """Nodes the stage's plan used that are now gone, NotReady or cordoned."""
    by_name = {n["metadata"]["name"]: n for n in nodes}
    return sorted(n for n in used if n not in by_name or not node_usable(by_name[n]))


# A ConfigMap holds at most 1 MiB; anything longer did not come from one.
MAX_CLUSTER_YAML = 1 << 20


def plan_topology(spec: StagedTrainingSpec, cluster_yaml: str | None) -> str | None:
    """Why the topology ConfigMap cannot be used (None: it can, or none is needed).

    The ConfigMap is written by the tenant, so it is read as data only: node-type file keys are
    refused unread (the operator opens no path a tenant names) and the dumps must be inline
    (`nvidia_smi_topo_text:` / `nccl_topo_xml_text:`)."""
    if spec.topology.source != "config-map":
        return None
    where = f"ConfigMap {spec.topology.config_map}"
    if cluster_yaml is None:
        return f"{where} (key {CLUSTER_FILE}) not found; create it or use topology.source: " \
               "node-labels"
    if not isinstance(cluster_yaml, str) or len(cluster_yaml) > MAX_CLUSTER_YAML:
        return f"{where}: {CLUSTER_FILE} is larger than a ConfigMap can hold; shorten it"
    try:
        build_cluster(parse_yaml(cluster_yaml, where), source=where, allow_files=False)
    except SpecError as e:
        return "; ".join([f"{where}: {line}" for line in e.lines])
    except (RecursionError, MemoryError):
        return f"{where}: {CLUSTER_FILE} nests too deeply or expands too far (YAML aliases); " \
               "write it out plainly"
    except Exception as e:  # a parser bug must not become a traceback in the operator's loop
        return f"{where}: {CLUSTER_FILE} could not be read ({e.__class__.__name__}); check the " \
               "topology dumps in it"
    return None


def with_workers(spec: StagedTrainingSpec, workers: int | None) -> StagedTrainingSpec:
    """The spec as one attempt runs it: resources.workers lowered when re-planning shrank it."""
    if workers is None or workers == spec.resources.workers:
        return spec
    return spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"workers": workers})})


def plan_workers(spec: StagedTrainingSpec, index: int, usable: list[str]
                 ) -> tuple[int, str | None]:
    """(workers to run stage `index` with, or why it cannot run) on the `usable` nodes.

    A GPU worker pod takes a whole node (gpus_per_node GPUs), so fewer usable nodes than pods
    means re-planning: the topology planner checks the stage on the GPUs that remain (fixed
    degrees must still fit; 'auto' ones shrink). CPU worker pods share nodes: no check.
    """
    res = spec.resources
    if res.device != "gpu":
        return res.workers, None
    per_node = spec.ray_cluster.gpus_per_node
    if len(usable) >= worker_pods(spec):
        return res.workers, None
    if not usable:
        return res.workers, "no usable node matches topology.node_selector"
    run = spec.run_spec()
    one_stage = run.model_copy(update={"stages": [run.stages[index]]})
    try:
        plan_from_workers({node: per_node for node in usable}, one_stage)
    except PlanError as e:
        return res.workers, f"{len(usable)} usable nodes x {per_node} GPUs: {e}"
    return min(res.workers, len(usable) * per_node), None
