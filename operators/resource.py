"""The StagedTraining custom resource: its spec (a RunSpec plus where it runs), status and CRD."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.schema import build_structural_schema
from specs.run import RunSpec

GROUP = "ringpilot.io"
VERSION = "v1alpha1"
KIND = "StagedTraining"
PLURAL = "stagedtrainings"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_IMAGE = "ghcr.io/ringpilot/ringpilot:0.1.0"
# Bounds on what a StagedTraining may ask for: far above any real run, far below what would make
# the operator (or the API server, through the CRD's maxima) loop or allocate without end.
MAX_GPUS_PER_NODE = 64
MAX_LABELS = 64
MAX_STAGES_STATUS = 1024
MAX_REPLICAS = 10_000  # per worker group of a ray_cluster.template
# A Kubernetes object name (DNS-1123 subdomain); what the operator looks up by name.
K8S_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"


class _K8s(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayClusterSource(_K8s):
    """The Ray cluster each stage's RayJob runs on: built per stage, or an existing one."""

    template: dict[str, Any] | None = Field(
        None, description="A RayCluster `spec` (ray.io/v1) used for every stage's RayJob. Null "
        "(and no selector): the operator builds one from resources (workers, device, "
        "cpus_per_worker) and image. The operator refuses templates wider than its own pods "
        "(host namespaces, privileged or root containers, hostPath, Secret or projected "
        "volumes, other service accounts, images off its allow-list) and fills in token auth, "
        "PSS restricted security contexts, limits and no API token.",
    )
    selector: dict[str, str] | None = Field(
        None, max_length=MAX_LABELS,
        description="Labels of an existing RayCluster to submit every stage to (the "
        "RayJob's clusterSelector, e.g. {ray.io/cluster: l40s}). The operator then cannot move "
        "work off lost nodes itself; the cluster's own worker groups must.",
    )
    auth_secret: str | None = Field(
        None, max_length=253, pattern=K8S_NAME,
        description="Secret (key auth_token) holding the Ray token for the clusters the "
        "operator builds. Null: KubeRay generates one per cluster. Token auth is always on. "
        "It must be named <this StagedTraining's name>-ray-token: the operator refuses any "
        "other, so a StagedTraining cannot hand another run's token (or another Secret with an "
        "auth_token key) to its own pods.",
    )
    gpus_per_node: int = Field(
        8, gt=0, le=MAX_GPUS_PER_NODE,
        description="GPUs per worker pod when the operator builds the cluster "
        "(resources.device gpu); workers / gpus_per_node pods are requested.",
    )
    storage_claim: str | None = Field(
        None, max_length=253, pattern=K8S_NAME,
        description="PersistentVolumeClaim mounted at storage.path in every Ray pod the "
        "operator builds (the run ledger and checkpoints must be shared by all of them).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RayClusterSource:
        if self.template is not None and self.selector is not None:
            raise ValueError("give ray_cluster.template or ray_cluster.selector, not both")
        return self


class TopologySource(_K8s):
    """Where the planner learns the cluster's network topology."""

    source: Literal["node-labels", "config-map"] = Field(
        "node-labels", description="'node-labels': plan from the nodes Ray reports and their "
        "labels. 'config-map': a ClusterSpec YAML in a ConfigMap (key cluster.yaml).",
    )
    config_map: str | None = Field(
        None, max_length=253, pattern=K8S_NAME,
        description="Name of the ConfigMap with the ClusterSpec, for source: config-map.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, max_length=MAX_LABELS,
        description="Labels of the nodes training may use (e.g. "
        "{nvidia.com/gpu.product: NVIDIA-L40S}); the operator watches them to re-plan when one "
        "becomes NotReady or cordoned.",
    )

    @model_validator(mode="after")
    def _config_map_named(self) -> TopologySource:
        if self.source == "config-map" and not self.config_map:
            raise ValueError("topology.source is config-map but topology.config_map is empty; "
                             "name the ConfigMap holding cluster.yaml")
        return self


class StagedTrainingSpec(RunSpec):
    """A RunSpec (the same YAML as `--run`) plus where on Kubernetes it runs."""

    image: str = Field(DEFAULT_IMAGE, max_length=512,
                       description="Container image with ringpilot installed, "
                       "used by every Ray pod the operator builds. It must be on the operator's "
                       "image allow-list (RINGPILOT_ALLOWED_IMAGES; by default the operator's "
                       "own image).")
    ray_cluster: RayClusterSource = Field(default_factory=RayClusterSource,
                                          description="The Ray cluster to use.")
    topology: TopologySource = Field(default_factory=TopologySource,
                                     description="Where the cluster topology comes from.")

    @model_validator(mode="after")
    def _cluster_file_shipped(self) -> StagedTrainingSpec:
        if self.resources.cluster and self.topology.source != "config-map":
            raise ValueError(
                f"resources.cluster names a file ({self.resources.cluster}) that the Ray cluster "
                "cannot see; put it in a ConfigMap (key cluster.yaml) and set topology: {source: "
                "config-map, config_map: NAME} (`ringpilot manifests render` does both)")
        return self

    def run_spec(self) -> RunSpec:
        """The RunSpec part, as the trainer reads it."""
        return RunSpec.model_validate(self.model_dump(include=set(RunSpec.model_fields)))


StageState = Literal["Pending", "Running", "BackingOff", "Succeeded", "Failed"]
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]


class StageStatus(_K8s):
    name: str = Field(description="Stage name.")
    state: StageState = Field("Pending", description="Where the stage stands.")
    ray_job: str | None = Field(None, description="Name of the stage's current RayJob.")
    attempts: int = Field(0, ge=0, le=1_000_000, description="RayJobs started for this stage.")
    last_checkpoint: str | None = Field(None, description="Newest committed checkpoint (ledger).")
    scores: dict[str, float] = Field(default_factory=dict,
                                     description="Eval score per task of the newest evaluation.")
    nodes: list[str] = Field(default_factory=list,
                             description="Nodes the stage's plan could use when it started.")
    workers: int | None = Field(None, description="Workers the stage runs with when re-planning "
                                "around lost nodes shrank it below resources.workers.")
    finished_at: str | None = Field(None, description="When the last attempt ended (UTC).")
    message: str | None = Field(None, description="Why the last attempt ended as it did.")
    health: str | None = Field(None, max_length=2048, description="The newest ring-health "
                               "finding of the stage (a slow ring hop or a stopped rank, from "
                               "the run ledger).")
    health_seen: int = Field(0, ge=0, description="The ledger's number of the newest "
                             "ring-health finding announced as an Event.")


class Condition(_K8s):
    type: str = Field(description="Condition type, e.g. Ready, SpecValid.")
    status: Literal["True", "False", "Unknown"] = Field(description="Condition status.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field("", description="Human-readable details.")
    lastTransitionTime: str = Field(description="When status last changed (UTC, RFC 3339).")


class StagedTrainingStatus(_K8s):
    phase: Phase = Field("Pending", description="Pending, Running, Succeeded or Failed.")
    current_stage: str | None = Field(None, description="The stage running or next to run.")
    last_score: float | None = Field(None, description="Mean eval score of the newest evaluation.")
    stages: list[StageStatus] = Field(default_factory=list, max_length=MAX_STAGES_STATUS,
                                      description="Per stage, in order.")
    excluded_nodes: list[str] = Field(default_factory=list,
                                      description="Nodes re-planning has excluded.")
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
    observedGeneration: int | None = Field(None, description="metadata.generation acted upon.")


def _open(**properties: Any) -> dict[str, Any]:
    """An object kept as given, with the few properties the CEL rules read declared (CEL sees
    only declared fields of a preserve-unknown-fields object)."""
    node: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if properties:
        node["properties"] = properties
    return node


def _forbid(rule: str, field: str, message: str) -> dict[str, Any]:
    return {"rule": rule, "fieldPath": f".{field}", "reason": "FieldValueForbidden",
            "message": message}


def _cel_pod_spec() -> dict[str, Any]:
    """The pod spec of a template's head or worker group, with the CEL rules the API server
    checks at admission. operators/admission.py checks these and more, with fuller messages."""
    def containers() -> dict[str, Any]:
        security = _open(privileged={"type": "boolean"}, capabilities=_open(
            add={"type": "array", "maxItems": 64, "items": {"type": "string", "maxLength": 64}}))
        return {"type": "array", "maxItems": 32, "items": _open(securityContext=security)}

    volume = _open(hostPath=_open(), secret=_open(), projected=_open())
    spec = _open(hostNetwork={"type": "boolean"}, hostPID={"type": "boolean"},
                 hostIPC={"type": "boolean"},
                 volumes={"type": "array", "maxItems": 128, "items": volume},
                 containers=containers(), initContainers=containers())
    rules = [_forbid(f"!has(self.{key}) || !self.{key}", key, f"{key} would share the node's "
                     "namespace with the run; remove it")
             for key in ("hostNetwork", "hostPID", "hostIPC")]
    rules.append(_forbid(
        "!has(self.volumes) || self.volumes.all(v, !has(v.hostPath) && !has(v.secret) && "
        "!has(v.projected))", "volumes", "hostPath, secret and projected volumes are not allowed "
        "in Ray pods; use persistentVolumeClaim, configMap, emptyDir, ephemeral or downwardAPI"))
    for key in ("containers", "initContainers"):
        rules.append(_forbid(
            f"!has(self.{key}) || self.{key}.all(c, !has(c.securityContext) || "
            "((!has(c.securityContext.privileged) || !c.securityContext.privileged) && "
            "(!has(c.securityContext.capabilities) || !has(c.securityContext.capabilities.add) "
            "|| size(c.securityContext.capabilities.add) == 0)))", key,
            "privileged containers and added capabilities are not allowed in Ray pods; remove "
            "securityContext.privileged and securityContext.capabilities.add"))
    spec["x-kubernetes-validations"] = rules
    return spec


def build_template_schema(generated: dict[str, Any]) -> dict[str, Any]:
    """ray_cluster.template's schema: kept as given (a RayCluster spec), plus CEL rules refusing
    host namespaces, hostPath/Secret volumes, privileged containers and Ray auth turned off."""
    auth = _open(mode={"type": "string", "maxLength": 16})
    auth["x-kubernetes-validations"] = [_forbid(
        "!has(self.mode) || self.mode == 'token'", "mode", "Ray token authentication stays on; "
        "remove authOptions (the operator sets mode: token)")]
    return {**generated, "properties": {
        "authOptions": auth,
        "headGroupSpec": _open(template=_open(spec=_cel_pod_spec())),
        "workerGroupSpecs": {"type": "array", "maxItems": 64, "items": _open(
            template=_open(spec=_cel_pod_spec()),
            **{key: {"type": "integer", "minimum": 0, "maximum": MAX_REPLICAS}
               for key in ("replicas", "minReplicas", "maxReplicas", "numOfHosts")})},
    }}


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition, its schema generated from the pydantic models."""
    spec_schema = build_structural_schema(StagedTrainingSpec)
    cluster = spec_schema["properties"]["ray_cluster"]["properties"]
    cluster["template"] = build_template_schema(cluster["template"])
    status_schema = build_structural_schema(StagedTrainingStatus)
    # Status is written by the operator only; kopf keeps its own bookkeeping there too.
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    columns = [
        {"name": "Stage", "type": "string", "jsonPath": ".status.current_stage"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Last score", "type": "number", "jsonPath": ".status.last_score"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": "stagedtraining", "shortNames": ["stt"],
                      "categories": ["ringpilot"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A staged long-context training run: one KubeRay RayJob per "
                    "stage of spec.stages.",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": status_schema,
                    },
                    "required": ["spec"],
                }},
            }],
        },
    }
