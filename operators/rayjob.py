"""Build the objects one stage runs as: the run's ConfigMap and a KubeRay RayJob per attempt."""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Any

import yaml

from operators.resource import API_VERSION, KIND, StagedTrainingSpec

RAY_API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"
RUN_DIR = "/etc/ringpilot/run"  # the run ConfigMap, mounted in the submitter pod
RUN_FILE = "run.yaml"
CLUSTER_FILE = "cluster.yaml"  # the ClusterSpec, copied beside run.yaml (topology: config-map)
LABEL_TRAINING = "ringpilot.io/training"
LABEL_STAGE = "ringpilot.io/stage"
LABEL_ATTEMPT = "ringpilot.io/attempt"
# KubeRay derives the RayCluster's and its services' names from the RayJob's; names past this
# length are rejected by its webhook/validation, so longer ones are shortened with a hash.
MAX_RAYJOB_NAME = 47
RAY_UID = 1000  # the `ray` user of the rayproject images
# What every pod of a run is, for the NetworkPolicy (manifests/base/network/): head and workers
# listen on Ray's ports; submitters only talk to the head's dashboard.
LABEL_RAY_POD = "ringpilot.io/ray"
# Ray's listening ports, pinned (Ray picks most of them at random by default) so that the
# NetworkPolicy can name them. The head's own three are KubeRay's defaults.
RAY_HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
RAY_NODE_PORTS = {"object-manager-port": 8076, "node-manager-port": 8077,
                  "dashboard-agent-grpc-port": 8078, "runtime-env-agent-port": 8079,
                  "metrics-export-port": 8080, "dashboard-agent-listen-port": 52365}
RAY_WORKER_PORTS = (10002, 19999)  # one per Ray worker process (min/max-worker-port)
# torch.distributed (gloo, NCCL and the TCPStore Ray Train starts) binds ephemeral ports
# between the training workers: Linux's default ip_local_port_range and above.
DIST_PORTS = (32768, 65535)
# emptyDirs are bounded: /tmp holds Ray's logs and spilled objects; /dev/shm (memory-backed,
# charged to the pod's memory) holds the object store, Ray's default being 30% of memory.
TMP_SIZE = "32Gi"
SUBMITTER_TMP_SIZE = "1Gi"


def build_owner_reference(st: dict[str, Any]) -> dict[str, Any]:
    meta = st["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def build_rayjob_name(training: str, stage: str, attempt: int) -> str:
    name = f"{training}-{stage}-a{attempt}"
    if len(name) <= MAX_RAYJOB_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:MAX_RAYJOB_NAME - 9].rstrip('-')}-{digest}"


def configmap_name(training: str) -> str:
    return f"{training}-run"


def build_run_yaml(spec: StagedTrainingSpec) -> str:
    """The RunSpec file the trainer reads; the cluster file, if any, sits beside it."""
    data = spec.run_spec().model_dump(mode="json")
    if spec.topology.source == "config-map":
        data["resources"]["cluster"] = CLUSTER_FILE  # relative to run.yaml, in the working dir
    return yaml.safe_dump(data, sort_keys=False)


def build_configmap(st: dict[str, Any], spec: StagedTrainingSpec,
                    cluster_yaml: str | None = None) -> dict[str, Any]:
    """The ConfigMap the job's working dir is made of: run.yaml (+ cluster.yaml)."""
    meta = st["metadata"]
    data = {RUN_FILE: build_run_yaml(spec)}
    if cluster_yaml is not None:
        data[CLUSTER_FILE] = cluster_yaml
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": configmap_name(meta["name"]), "namespace": meta["namespace"],
                     "labels": {LABEL_TRAINING: meta["name"]},
                     "ownerReferences": [build_owner_reference(st)]},
        "data": data,
    }


def build_entrypoint(stage: str) -> list[str]:
    """The trainer's command line (its arguments are checked against its parser in the tests)."""
    return ["python", "-m", "ray_jobs.train", "--run", RUN_FILE, "--stage", stage]


def build_pod_security() -> dict[str, Any]:
    """Pod-level Pod Security Standards `restricted` settings."""
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_UID, "fsGroup": RAY_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def build_container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def build_ray_start_params() -> dict[str, str]:
    """The rayStartParams that pin Ray's ports on every head and worker (see RAY_NODE_PORTS)."""
    params = {name: str(port) for name, port in RAY_NODE_PORTS.items()}
    params["min-worker-port"], params["max-worker-port"] = map(str, RAY_WORKER_PORTS)
    return params


def build_auth_options(spec: StagedTrainingSpec) -> dict[str, Any]:
    """Ray token authentication, always on; the token's Secret when the spec names one."""
    auth: dict[str, Any] = {"mode": "token"}
    if spec.ray_cluster.auth_secret:
        auth["secretName"] = spec.ray_cluster.auth_secret
    return auth


def build_node_affinity(node_selector: dict[str, str], excluded: list[str]) -> dict[str, Any]:
    terms = [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(node_selector.items())]
    if excluded:
        terms.append({"key": "kubernetes.io/hostname", "operator": "NotIn",
                      "values": sorted(excluded)})
    if not terms:
        return {}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": terms}]}}}


def worker_pods(spec: StagedTrainingSpec) -> int:
    """Worker pods the built cluster needs: one per GPU node, or one per CPU worker."""
    res = spec.resources
    if res.device == "gpu":
        return math.ceil(res.workers / spec.ray_cluster.gpus_per_node)
    return res.workers


def _ray_container(name: str, spec: StagedTrainingSpec, resources: dict[str, Any],
                   ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if spec.ray_cluster.storage_claim:
        mounts.append({"name": "storage", "mountPath": spec.storage.path})
    container = {"name": name, "image": spec.image,
                 "resources": {"requests": dict(resources), "limits": dict(resources)},
                 "securityContext": build_container_security(), "volumeMounts": mounts}
    if ports:
        container["ports"] = ports
    return container


def _half(quantity: str) -> str:
    """Half of a memory quantity written as '<n>Gi' (the sizes this module writes)."""
    gib = int(quantity.removesuffix("Gi"))
    return f"{gib // 2}Gi" if gib >= 2 else f"{gib * 512}Mi"


def _ray_volumes(spec: StagedTrainingSpec, memory: str) -> list[dict[str, Any]]:
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _half(memory)}}]
    if spec.ray_cluster.storage_claim:
        volumes.append({"name": "storage", "persistentVolumeClaim": {
            "claimName": spec.ray_cluster.storage_claim}})
    return volumes


def _ray_pod(role: str, pod: dict[str, Any]) -> dict[str, Any]:
    """A head or worker pod template: labelled for the NetworkPolicy, no API token (Ray needs no
    Kubernetes API access: the operator sizes the cluster, there is no autoscaler)."""
    return {"metadata": {"labels": {LABEL_RAY_POD: role}},
            "spec": {"automountServiceAccountToken": False, **pod}}


def build_ray_cluster_spec(spec: StagedTrainingSpec, excluded: list[str]) -> dict[str, Any]:
    """The RayCluster spec the operator builds when none is given: one head, one worker group.

    A user's template (ray_cluster.template) is used instead, with what every cluster must have
    filled in (build_enforced_cluster); plan_admission has refused templates that conflict.
    """
    if spec.ray_cluster.template is not None:
        return _apply_exclusion(build_enforced_cluster(spec.ray_cluster.template, spec), excluded)
    res = spec.resources
    affinity = build_node_affinity(spec.topology.node_selector, excluded)
    if res.device == "gpu":
        gpus = spec.ray_cluster.gpus_per_node
        worker_res = {"cpu": str(res.cpus_per_worker * gpus), "memory": f"{32 * gpus}Gi",
                      "nvidia.com/gpu": str(gpus)}
    else:
        worker_res = {"cpu": str(res.cpus_per_worker), "memory": "4Gi"}
    head_res = {"cpu": "4", "memory": "16Gi"}
    head_ports = [{"containerPort": port, "name": name} for name, port in RAY_HEAD_PORTS.items()]
    worker_pod = {"securityContext": build_pod_security(),
                  "volumes": _ray_volumes(spec, worker_res["memory"]),
                  "containers": [_ray_container("ray-worker", spec, worker_res)]}
    if affinity:
        worker_pod["affinity"] = affinity
    if res.device == "gpu":  # GPU nodes are commonly tainted so only GPU work lands there
        worker_pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                      "effect": "NoSchedule"}]
    replicas = worker_pods(spec)
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": build_auth_options(spec),
        "headGroupSpec": {
            "serviceType": "ClusterIP",  # the dashboard / Jobs API stays inside the cluster
            "rayStartParams": {"num-gpus": "0", "dashboard-host": "0.0.0.0",
                               **build_ray_start_params()},
            "template": _ray_pod("head", {
                "securityContext": build_pod_security(),
                "volumes": _ray_volumes(spec, head_res["memory"]),
                "containers": [_ray_container("ray-head", spec, head_res, head_ports)]}),
        },
        "workerGroupSpecs": [{
            "groupName": "workers", "replicas": replicas, "minReplicas": replicas,
            "maxReplicas": replicas, "rayStartParams": build_ray_start_params(),
            "template": _ray_pod("worker", worker_pod),
        }],
    }


def build_enforced_cluster(template: dict[str, Any], spec: StagedTrainingSpec) -> dict[str, Any]:
    """A user's RayCluster spec with what every cluster the operator submits has: token auth,
    PSS restricted security contexts, no service-account token, CPU and memory limits, bounded
    emptyDirs, the pinned Ray ports and the NetworkPolicy's labels.

    Only fills in and tightens: plan_admission has refused every template asking for something
    these would override (privileged or root containers, host namespaces, other auth, ...).
    """
    cluster = copy.deepcopy(template)
    cluster["authOptions"] = build_auth_options(spec)
    groups = [("head", cluster.get("headGroupSpec"))]
    groups += [("worker", g) for g in cluster.get("workerGroupSpecs") or []]
    for role, group in groups:
        if not isinstance(group, dict):
            continue
        group["rayStartParams"] = {**(group.get("rayStartParams") or {}),
                                   **build_ray_start_params()}
        pod = group.setdefault("template", {})
        pod.setdefault("metadata", {}).setdefault("labels", {})[LABEL_RAY_POD] = role
        _enforce_pod(pod.setdefault("spec", {}))
    return cluster


def _enforce_pod(pod: dict[str, Any]) -> None:
    pod["automountServiceAccountToken"] = False
    pod["securityContext"] = {**build_pod_security(), **(pod.get("securityContext") or {})}
    containers = (pod.get("containers") or []) + (pod.get("initContainers") or [])
    for c in containers:
        # capabilities: drop ALL replaces the user's (adding any is refused before this).
        c["securityContext"] = {**build_container_security(), **(c.get("securityContext") or {}),
                                "capabilities": {"drop": ["ALL"]}}
        resources = c.setdefault("resources", {})
        limits = resources.setdefault("limits", {})
        for name, value in (resources.get("requests") or {}).items():
            limits.setdefault(name, value)  # a limit per request: the pod cannot grow past it
    memory = next((c["resources"]["limits"]["memory"] for c in pod.get("containers") or []
                   if "memory" in c["resources"]["limits"]), None)
    for volume in pod.get("volumes") or []:
        empty = volume.get("emptyDir")
        if isinstance(empty, dict) and "sizeLimit" not in empty:
            in_memory = empty.get("medium") == "Memory"
            empty["sizeLimit"] = memory if in_memory and memory else TMP_SIZE


def _apply_exclusion(cluster: dict[str, Any], excluded: list[str]) -> dict[str, Any]:
    """The cluster with the lost-node exclusion added to its workers' node affinity."""
    if not excluded:
        return cluster
    cluster = copy.deepcopy(cluster)
    for group in cluster.get("workerGroupSpecs", []):
        pod = group.setdefault("template", {}).setdefault("spec", {})
        terms = (pod.setdefault("affinity", {}).setdefault("nodeAffinity", {})
                 .setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
                 .setdefault("nodeSelectorTerms", [{}]))
        for term in terms:  # the terms are ORed: each must exclude the lost nodes
            term.setdefault("matchExpressions", []).append(
                {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": sorted(excluded)})
    return cluster


def build_submitter_template(st: dict[str, Any], spec: StagedTrainingSpec) -> dict[str, Any]:
    """The pod that runs `ray job submit`: it uploads the run ConfigMap as the job's working dir."""
    name = st["metadata"]["name"]
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # it only talks to the head's dashboard
        "securityContext": build_pod_security(),
        "volumes": [{"name": "run", "configMap": {"name": configmap_name(name)}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": SUBMITTER_TMP_SIZE}}],
        "containers": [{
            "name": "ray-job-submitter", "image": spec.image,
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                          "limits": {"cpu": "1", "memory": "1Gi"}},
            "securityContext": build_container_security(),
            "volumeMounts": [{"name": "run", "mountPath": RUN_DIR, "readOnly": True},
                             {"name": "tmp", "mountPath": "/tmp"}],
        }],
    }
    return {"metadata": {"labels": {LABEL_RAY_POD: "submitter", LABEL_TRAINING: name}},
            "spec": pod}


def build_rayjob(st: dict[str, Any], spec: StagedTrainingSpec, stage: str, attempt: int,
                 excluded: list[str]) -> dict[str, Any]:
    """The RayJob running `stage` (attempt `attempt`), owned by the StagedTraining."""
    meta = st["metadata"]
    name = build_rayjob_name(meta["name"], stage, attempt)
    job_spec: dict[str, Any] = {
        "entrypoint": " ".join(build_entrypoint(stage)),
        "runtimeEnvYAML": yaml.safe_dump({"working_dir": RUN_DIR}),
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": build_submitter_template(st, spec),
        # The operator owns retries (with backoff and re-planning); KubeRay must not retry too.
        "backoffLimit": 0,
    }
    if spec.ray_cluster.selector is not None:
        job_spec["clusterSelector"] = dict(spec.ray_cluster.selector)
    else:
        job_spec["rayClusterSpec"] = build_ray_cluster_spec(spec, excluded)
        job_spec["shutdownAfterJobFinishes"] = True
        job_spec["ttlSecondsAfterFinished"] = 600
    return {
        "apiVersion": RAY_API_VERSION, "kind": "RayJob",
        "metadata": {"name": name, "namespace": meta["namespace"],
                     "labels": {LABEL_TRAINING: meta["name"], LABEL_STAGE: stage,
                                LABEL_ATTEMPT: str(attempt)},
                     "ownerReferences": [build_owner_reference(st)]},
        "spec": job_spec,
    }
