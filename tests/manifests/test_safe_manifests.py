"""Safe objects in manifests/: the NetworkPolicy around the Ray ports, no API token in Ray pods,
bounded emptyDirs, the operator's image allow-list, and the CRD's CEL rules."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from operators.admission import image_allowed, parse_allowed_images, plan_admission
from operators.rayjob import (
    DIST_PORTS,
    RAY_HEAD_PORTS,
    RAY_NODE_PORTS,
    RAY_WORKER_PORTS,
    build_ray_cluster_spec,
)
from operators.resource import DEFAULT_IMAGE, StagedTrainingSpec, build_crd
from tests.manifests.conftest import KUSTOMIZATIONS, kustomize, load, pod_templates
from tests.manifests.test_manifests import (
    all_pod_objects,
    generated_rayjobs,
    samples,
    staged_training_objects,
)
from tests.operators.conftest import tiny_spec

KUBERAY_OPERATOR = {"app.kubernetes.io/name": "kuberay",
                    "app.kubernetes.io/component": "kuberay-operator"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches `labels`."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def pod_labels(obj: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(where, labels) of every pod template an object makes."""
    kind, spec = obj["kind"], obj["spec"]
    found = []
    if kind == "Deployment":
        found.append(("operator", spec["template"]["metadata"]["labels"]))
    cluster = spec if kind == "RayCluster" else spec.get("rayClusterSpec")
    if cluster:
        found.append(("head", cluster["headGroupSpec"]["template"]["metadata"]["labels"]))
        for group in cluster["workerGroupSpecs"]:
            found.append(("worker", group["template"]["metadata"]["labels"]))
    if kind == "RayJob":
        found.append(("submitter", spec["submitterPodTemplate"]["metadata"]["labels"]))
    return found


def ray_objects() -> list[dict[str, Any]]:
    return generated_rayjobs() + [load(p) for p in samples() if load(p)["kind"] == "RayCluster"]


def policy(subdir: str = "") -> dict[str, Any]:
    [found] = [d for d in kustomize(subdir) if d["kind"] == "NetworkPolicy"]
    return found


def port_set(rule: dict[str, Any]) -> set[tuple[int, int]]:
    assert all(p["protocol"] == "TCP" for p in rule["ports"])
    return {(p["port"], p.get("endPort", p["port"])) for p in rule["ports"]}


# --- NetworkPolicy ---------------------------------------------------------------------------

@pytest.mark.parametrize("subdir", KUSTOMIZATIONS)
def test_network_policy_is_installed_for_ingress(subdir):
    np = policy(subdir)
    assert np["metadata"]["namespace"] == "ringpilot" and np["spec"]["policyTypes"] == ["Ingress"]


def test_network_policy_guards_head_and_workers_and_nothing_else():
    selector = policy()["spec"]["podSelector"]
    seen = set()
    for obj in ray_objects() + [d for d in kustomize("") if d["kind"] == "Deployment"]:
        for role, labels in pod_labels(obj):
            assert selects(selector, labels) is (role in ("head", "worker")), (role, labels)
            seen.add(role)
    assert seen == {"head", "worker", "submitter", "operator"}


def test_ray_pods_reach_each_other_on_the_pinned_ray_ports_only():
    [peers, _] = policy()["spec"]["ingress"]
    expected = {(p, p) for p in [*RAY_HEAD_PORTS.values(), *RAY_NODE_PORTS.values()]}
    expected |= {RAY_WORKER_PORTS, DIST_PORTS}
    assert port_set(peers) == expected
    [source] = peers["from"]
    for obj in ray_objects():
        for role, labels in pod_labels(obj):
            assert selects(source["podSelector"], labels) is (role in ("head", "worker"))


def test_the_ports_the_policy_names_are_the_ones_the_ray_pods_use():
    for obj in ray_objects():
        cluster = obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"].get("rayClusterSpec")
        if cluster is None:  # submitted to an existing cluster (clusterSelector)
            continue
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            params = group["rayStartParams"]
            for name, port in RAY_NODE_PORTS.items():
                assert params[name] == str(port), (obj["metadata"]["name"], name)
            assert (int(params["min-worker-port"]), int(params["max-worker-port"])) == \
                RAY_WORKER_PORTS
        [head] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
        assert {p["containerPort"] for p in head["ports"]} == set(RAY_HEAD_PORTS.values())


def test_submitters_and_operators_reach_the_dashboard_only():
    [_, clients] = policy()["spec"]["ingress"]
    assert port_set(clients) == {(RAY_HEAD_PORTS["dashboard"], RAY_HEAD_PORTS["dashboard"])}
    [deployment] = [d for d in kustomize("") if d["kind"] == "Deployment"]
    wanted = {"submitter": [labels for obj in generated_rayjobs()
                            for role, labels in pod_labels(obj) if role == "submitter"],
              "operator": [deployment["spec"]["template"]["metadata"]["labels"]],
              "kuberay": [KUBERAY_OPERATOR]}
    for name, label_sets in wanted.items():
        for labels in label_sets:
            matching = [s for s in clients["from"] if selects(s["podSelector"], labels)]
            assert matching, f"no source of the dashboard rule admits the {name} pod"
            in_any_namespace = name == "kuberay"
            assert all(("namespaceSelector" in s) is in_any_namespace for s in matching), name


# --- pods: no API token where none is needed, bounded emptyDirs ------------------------------

def test_ray_pods_get_no_service_account_token_and_the_operator_keeps_its():
    for obj in ray_objects():
        for where, pod in pod_templates(obj):
            assert pod["automountServiceAccountToken"] is False, (obj["metadata"]["name"], where)
    for subdir in KUSTOMIZATIONS:
        [deployment] = [d for d in kustomize(subdir) if d["kind"] == "Deployment"]
        assert deployment["spec"]["template"]["spec"].get("automountServiceAccountToken", True)


@pytest.mark.parametrize("obj", all_pod_objects(),
                         ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_every_emptydir_has_a_size_limit(obj):
    for where, pod in pod_templates(obj):
        for volume in pod.get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{where}: {volume['name']}"


# --- the image allow-list --------------------------------------------------------------------

def operator_container(subdir: str) -> dict[str, Any]:
    [deployment] = [d for d in kustomize(subdir) if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("subdir", KUSTOMIZATIONS)
def test_operator_allows_its_own_image(subdir):
    container = operator_container(subdir)
    env = {e["name"]: e.get("value") for e in container["env"]}
    allowed = parse_allowed_images(env["RINGPILOT_ALLOWED_IMAGES"])
    assert image_allowed(container["image"], allowed), (container["image"], allowed)


@pytest.mark.parametrize("obj", staged_training_objects(), ids=lambda o: o["metadata"]["name"])
def test_samples_run_on_the_installed_operator(obj):
    env = {e["name"]: e.get("value") for e in operator_container("")["env"]}
    allowed = parse_allowed_images(env["RINGPILOT_ALLOWED_IMAGES"])
    spec = StagedTrainingSpec.model_validate(obj["spec"])
    assert plan_admission(spec, allowed) == []
    assert spec.image == DEFAULT_IMAGE == operator_container("")["image"]


# --- CEL rules of the CRD, evaluated as the API server would --------------------------------

def cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> list[tuple[str, str]]:
    """(field path, message) of every x-kubernetes-validations rule `value` breaks."""
    import celpy  # cel-python (dev extra): the rules are evaluated here, never skipped
    if value is None:
        return []
    failed = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            failed.append((path + rule.get("fieldPath", ""), rule["message"]))
    for name, child in (schema.get("properties") or {}).items():
        if isinstance(value, dict) and name in value:
            failed += cel_failures(child, value[name], f"{path}.{name}")
    if "items" in schema and isinstance(value, list):
        for i, item in enumerate(value):
            failed += cel_failures(schema["items"], item, f"{path}[{i}]")
    return failed


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def training_with(change=None) -> dict[str, Any]:
    spec = StagedTrainingSpec.model_validate(tiny_spec())
    template = copy.deepcopy(build_ray_cluster_spec(spec, excluded=[]))
    if change is not None:
        change(template)
    return {"apiVersion": "ringpilot.io/v1alpha1", "kind": "StagedTraining",
            "metadata": {"name": "t"},
            "spec": {**tiny_spec(), "ray_cluster": {"template": template}}}


HEAD = "headGroupSpec.template.spec"
WORKER = "workerGroupSpecs[0].template.spec"


def _pod(t, where):
    group = t["headGroupSpec"] if where == HEAD else t["workerGroupSpecs"][0]
    return group["template"]["spec"]


# (change, the field path the API server reports)
CEL_REFUSED = [
    pytest.param(lambda t: _pod(t, HEAD).update(hostNetwork=True), f"{HEAD}.hostNetwork",
                 id="host-network"),
    pytest.param(lambda t: _pod(t, WORKER).update(hostPID=True), f"{WORKER}.hostPID",
                 id="host-pid"),
    pytest.param(lambda t: _pod(t, WORKER).update(hostIPC=True), f"{WORKER}.hostIPC",
                 id="host-ipc"),
    pytest.param(lambda t: _pod(t, WORKER)["volumes"].append(
        {"name": "h", "hostPath": {"path": "/"}}), f"{WORKER}.volumes", id="host-path"),
    pytest.param(lambda t: _pod(t, HEAD)["volumes"].append(
        {"name": "s", "secret": {"secretName": "db"}}), f"{HEAD}.volumes", id="secret-volume"),
    pytest.param(lambda t: _pod(t, HEAD)["containers"][0]["securityContext"].update(
        privileged=True), f"{HEAD}.containers", id="privileged"),
    pytest.param(lambda t: _pod(t, WORKER).update(initContainers=[{
        "name": "i", "image": DEFAULT_IMAGE, "securityContext": {
            "capabilities": {"add": ["SYS_ADMIN"]}}}]), f"{WORKER}.initContainers",
        id="init-capability"),
    pytest.param(lambda t: t["authOptions"].update(mode="disabled"), "authOptions.mode",
                 id="auth-off"),
]


def test_cel_rules_admit_the_samples_and_the_operators_own_cluster(crd_schema):
    for obj in [*staged_training_objects(), training_with()]:
        assert cel_failures(crd_schema, obj) == [], obj["metadata"]["name"]


@pytest.mark.parametrize("change, field", CEL_REFUSED)
def test_cel_rules_refuse_at_admission_what_the_operator_refuses(change, field, crd_schema):
    obj = training_with(change)
    [(path, message)] = cel_failures(crd_schema, obj)
    assert path == f".spec.ray_cluster.template.{field}"
    assert re.search(r"\b(remove|use)\b", message) and "\n" not in message  # says the fix
    # Defence in depth: the operator refuses the same object, naming a field under that path.
    refusals = plan_admission(StagedTrainingSpec.model_validate(obj["spec"]), [DEFAULT_IMAGE])
    assert refusals and refusals[0].field.startswith(f"spec.ray_cluster.template.{field}")


def test_cel_rules_only_read_declared_fields(crd_schema):
    """The API server compiles a rule only if every field it reads is declared in the schema
    (preserved unknown fields are invisible to CEL)."""

    def walk(node: dict[str, Any]):
        for rule in node.get("x-kubernetes-validations", []):
            declared = set()

            def collect(n: dict[str, Any]) -> None:
                for name, child in (n.get("properties") or {}).items():
                    declared.add(name)
                    collect(child)
                if isinstance(n.get("items"), dict):
                    collect(n["items"])

            collect(node)
            # field selections, not macros or methods (.all(...), .exists(...))
            for name in re.findall(r"\.([A-Za-z_]\w*)\b(?!\s*\()", rule["rule"]):
                assert name in declared, f"{rule['rule']} reads {name}, not declared"
            assert rule["fieldPath"].lstrip(".") in declared
        for child in (node.get("properties") or {}).values():
            walk(child)
        if isinstance(node.get("items"), dict):
            walk(node["items"])

    walk(crd_schema)

