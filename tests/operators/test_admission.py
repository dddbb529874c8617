"""What a StagedTraining may ask of the cluster: plan_admission's table, the enforced template,
and the operator refusing (with one message, creating nothing) what would widen privilege."""

from __future__ import annotations

import copy

import pytest

from operators.admission import image_allowed, parse_allowed_images, plan_admission
from operators.decide import ApplyConfigMap, CreateObject, Settings, plan_reconcile
from operators.rayjob import (
    LABEL_RAY_POD,
    TMP_SIZE,
    build_enforced_cluster,
    build_ray_cluster_spec,
    build_rayjob,
)
from operators.resource import DEFAULT_IMAGE, StagedTrainingSpec
from tests.operators.conftest import T0, make_node, make_training, tiny_spec

NODES = [make_node(f"n{i}") for i in range(3)]
DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
HEAD = "headGroupSpec.template.spec"
WORKER = "workerGroupSpecs[0].template.spec"


def own_template() -> dict:
    """The cluster the operator itself builds for the tiny run: the model of a safe template."""
    spec = StagedTrainingSpec.model_validate(tiny_spec())
    return copy.deepcopy(build_ray_cluster_spec(spec, excluded=[]))


def spec_with(change=None, **fields) -> StagedTrainingSpec:
    template = own_template()
    if change is not None:
        change(template)
    data = {**tiny_spec(), **fields}
    data["ray_cluster"] = {"template": template}
    return StagedTrainingSpec.model_validate(data)


def pod(template: dict, where: str = HEAD) -> dict:
    node = template
    for part in where.replace("[0]", ".0").split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def set_in(where: str, **values):
    return lambda t: pod(t, where).update(values)


def container(where: str = HEAD, **security):
    return lambda t: pod(t, where)["containers"][0].setdefault("securityContext", {}).update(
        security)


def add_volume(volume: dict, where: str = WORKER):
    return lambda t: pod(t, where).setdefault("volumes", []).append({"name": "x", **volume})


def add_env(entry: dict):
    return lambda t: pod(t, WORKER)["containers"][0].setdefault("env", []).append(entry)


def drop_cpu(t):
    for values in pod(t, WORKER)["containers"][0]["resources"].values():
        values.pop("cpu")


# (change to the operator's own template, the field named, words of the reason)
REFUSED = [
    pytest.param(set_in(HEAD, hostNetwork=True), f"{HEAD}.hostNetwork", "node's network",
                 id="host-network"),
    pytest.param(set_in(WORKER, hostPID=True), f"{WORKER}.hostPID", "process namespace",
                 id="host-pid"),
    pytest.param(set_in(WORKER, hostIPC=True), f"{WORKER}.hostIPC", "IPC namespace",
                 id="host-ipc"),
    pytest.param(add_volume({"hostPath": {"path": "/"}}), f"{WORKER}.volumes[2].hostPath",
                 "directory of the node", id="host-path"),
    pytest.param(add_volume({"secret": {"secretName": "db"}}), f"{WORKER}.volumes[2].secret",
                 "mounts a Secret", id="secret-volume"),
    pytest.param(add_volume({"projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}),
                 f"{WORKER}.volumes[2].projected", "service-account tokens", id="projected"),
    pytest.param(add_volume({"nfs": {"server": "n", "path": "/"}}), f"{WORKER}.volumes[2].nfs",
                 "not a volume type", id="nfs-volume"),
    pytest.param(container(privileged=True), f"{HEAD}.containers[0].securityContext.privileged",
                 "every capability", id="privileged"),
    pytest.param(container(capabilities={"add": ["NET_ADMIN"]}),
                 f"{HEAD}.containers[0].securityContext.capabilities.add", "NET_ADMIN",
                 id="added-capability"),
    pytest.param(container(allowPrivilegeEscalation=True),
                 f"{HEAD}.containers[0].securityContext.allowPrivilegeEscalation", "setuid",
                 id="privilege-escalation"),
    pytest.param(container(runAsUser=0), f"{HEAD}.containers[0].securityContext.runAsUser",
                 "root", id="root-container"),
    pytest.param(set_in(WORKER, securityContext={"runAsNonRoot": False}),
                 f"{WORKER}.securityContext.runAsNonRoot", "root", id="root-pod"),
    pytest.param(container(seccompProfile={"type": "Unconfined"}),
                 f"{HEAD}.containers[0].securityContext.seccompProfile.type", "syscall",
                 id="unconfined-seccomp"),
    pytest.param(set_in(WORKER, automountServiceAccountToken=True),
                 f"{WORKER}.automountServiceAccountToken", "API token", id="api-token"),
    pytest.param(set_in(WORKER, serviceAccountName="ringpilot-operator"),
                 f"{WORKER}.serviceAccountName", "'ringpilot-operator'", id="service-account"),
    pytest.param(add_env({"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "p"}}}),
                 f"{WORKER}.containers[0].env[0].valueFrom.secretKeyRef", "Secret 'db'",
                 id="secret-env"),
    pytest.param(lambda t: pod(t, WORKER)["containers"][0].update(
        envFrom=[{"secretRef": {"name": "db"}}]), f"{WORKER}.containers[0].envFrom[0].secretRef",
        "Secret 'db'", id="secret-env-from"),
    pytest.param(lambda t: pod(t, HEAD)["containers"][0]["ports"].append(
        {"containerPort": 9000, "hostPort": 9000}), f"{HEAD}.containers[0].ports[3].hostPort",
        "port of the node", id="host-port"),
    pytest.param(lambda t: pod(t, WORKER)["containers"][0].update(image="evil/miner:1"),
                 f"{WORKER}.containers[0].image", "allow-list", id="container-image"),
    pytest.param(lambda t: pod(t, WORKER).update(initContainers=[
        {"name": "i", "image": "busybox:1", "resources": {"limits": {"cpu": 1, "memory": "1Gi"}}}]),
        f"{WORKER}.initContainers[0].image", "allow-list", id="init-container-image"),
    pytest.param(drop_cpu, f"{WORKER}.containers[0].resources.limits.cpu",
                 "whole cpu", id="no-limits"),
    pytest.param(lambda t: t["authOptions"].update(mode="disabled"), "authOptions.mode",
                 "token authentication off", id="auth-disabled"),
    pytest.param(lambda t: t["authOptions"].update(secretName="any-secret"),
                 "authOptions.secretName", "operator's to name", id="auth-secret"),
    pytest.param(lambda t: t.update(enableInTreeAutoscaling=True), "enableInTreeAutoscaling",
                 "API token", id="autoscaler"),
    pytest.param(lambda t: t.update(gcsFaultToleranceOptions={}), "gcsFaultToleranceOptions",
                 "can check", id="unchecked-field"),
    pytest.param(lambda t: t["headGroupSpec"].update(serviceType="LoadBalancer"),
                 "headGroupSpec.serviceType", "outside the cluster", id="load-balancer"),
    pytest.param(lambda t: t["workerGroupSpecs"][0]["rayStartParams"].update(
        {"node-manager-port": "7000"}), "workerGroupSpecs[0].rayStartParams.node-manager-port",
        "pinned port 8077", id="moved-port"),
    pytest.param(lambda t: pod(t, "workerGroupSpecs[0].template.metadata")["labels"].update(
        {"app.kubernetes.io/name": "ringpilot-operator"}),
        "workerGroupSpecs[0].template.metadata.labels.app.kubernetes.io/name", "trusts",
        id="trusted-label"),
]


def test_the_operators_own_cluster_is_admitted_as_a_template():
    assert plan_admission(spec_with(), [DEFAULT_IMAGE]) == []


@pytest.mark.parametrize("change, field, reason", REFUSED)
def test_refused_templates(change, field, reason):
    [refusal] = plan_admission(spec_with(change), [DEFAULT_IMAGE])
    assert refusal.field == f"spec.ray_cluster.template.{field}"
    assert reason in refusal.reason
    text = str(refusal)
    assert text.startswith(refusal.field + ": ") and "Fix: " in text and "\n" not in text


def test_image_off_the_allow_list_is_refused_naming_the_list_and_the_setting():
    [refusal] = plan_admission(spec_with(image="evil/miner:1"), [DEFAULT_IMAGE])
    assert refusal.field == "spec.image"
    assert DEFAULT_IMAGE in refusal.reason and "RINGPILOT_ALLOWED_IMAGES" in refusal.fix


def test_every_problem_is_reported_at_once():
    def two(t):
        pod(t, HEAD)["hostNetwork"] = True
        pod(t, WORKER)["hostPID"] = True

    fields = [r.field for r in plan_admission(spec_with(two, image="x:1"), [DEFAULT_IMAGE])]
    assert fields == ["spec.image", f"spec.ray_cluster.template.{HEAD}.hostNetwork",
                      f"spec.ray_cluster.template.{WORKER}.hostPID"]


@pytest.mark.parametrize("image, allowed, ok", [
    ("ghcr.io/r/r:0.1.0", ["ghcr.io/r/r:0.1.0"], True),
    ("ghcr.io/r/r:0.1.1", ["ghcr.io/r/r:0.1.0"], False),
    ("ghcr.io/r/other:0.1.0", ["ghcr.io/r/r:0.1.0"], False),
    ("ghcr.io/r/r", ["ghcr.io/r/r:latest"], True),
    # a tag entry does not admit a digest: that would admit any content of the repository
    (f"ghcr.io/r/r:0.1.0@{DIGEST}", ["ghcr.io/r/r:0.1.0"], False),
    (f"ghcr.io/r/r@{DIGEST}", [f"ghcr.io/r/r@{DIGEST}"], True),
    (f"ghcr.io/r/r:0.1.0@{DIGEST}", [f"ghcr.io/r/r@{DIGEST}"], True),
    (f"ghcr.io/r/r@{OTHER_DIGEST}", [f"ghcr.io/r/r@{DIGEST}"], False),
    ("ghcr.io/r/r:0.1.0", [f"ghcr.io/r/r@{DIGEST}"], False),  # digest-pinned: tags are not
    ("localhost:5000/r:dev", ["localhost:5000/r:dev"], True),
    ("not an image", ["not-an-image:1"], False),
])
def test_image_allow_list_matching(image, allowed, ok):
    assert image_allowed(image, allowed) is ok


def test_allow_list_configuration_is_parsed_and_checked():
    assert parse_allowed_images(f" a/b:1, c@{DIGEST}\nd:2 ") == ("a/b:1", f"c@{DIGEST}", "d:2")
    with pytest.raises(ValueError, match="entry 'Bad:1' is not an image reference"):
        parse_allowed_images("a/b:1,Bad:1")
    with pytest.raises(ValueError, match="empty"):
        parse_allowed_images(" , ")


# --- the enforced template: what a user's cluster gets filled in ------------------------------

def test_a_bare_template_gets_auth_security_no_token_limits_and_bounded_emptydirs():
    bare = {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {
        "containers": [{"name": "h", "image": DEFAULT_IMAGE,
                        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}}}],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}},
                    {"name": "scratch", "emptyDir": {}}]}}},
        "authOptions": {"mode": "token"}}
    spec = StagedTrainingSpec.model_validate(
        {**tiny_spec(), "ray_cluster": {"template": bare, "auth_secret": "ray-token"}})
    assert plan_admission(spec, [DEFAULT_IMAGE]) == []
    cluster = build_enforced_cluster(bare, spec)
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    head = cluster["headGroupSpec"]["template"]
    assert head["metadata"]["labels"][LABEL_RAY_POD] == "head"
    assert head["spec"]["automountServiceAccountToken"] is False
    assert head["spec"]["securityContext"]["runAsNonRoot"] is True
    [c] = head["spec"]["containers"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    sizes = [v["emptyDir"]["sizeLimit"] for v in head["spec"]["volumes"]]
    assert sizes == ["8Gi", TMP_SIZE]
    assert cluster["headGroupSpec"]["rayStartParams"]["node-manager-port"] == "8077"
    assert bare["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"}}  # the spec's own template is not changed


def test_the_operators_own_cluster_is_unchanged_by_enforcement():
    spec = spec_with()
    assert build_enforced_cluster(own_template(), spec) == own_template()


# --- the operator: one message, on the status and as an event, and nothing created ------------

def test_refused_object_creates_nothing_and_says_why_once():
    template = own_template()
    pod(template, WORKER)["hostNetwork"] = True
    st = make_training(ray_cluster={"template": template})
    d = plan_reconcile(st, [], NODES, T0)
    assert d.of(CreateObject) == [] and d.of(ApplyConfigMap) == []
    assert d.status.phase == "Failed"
    [cond] = [c for c in d.status.conditions if c.type == "SpecValid"]
    assert (cond.status, cond.reason) == ("False", "Refused")
    assert cond.message.startswith(f"spec.ray_cluster.template.{WORKER}.hostNetwork: ")
    [event] = d.events()
    assert (event.type, event.reason, event.message) == ("Warning", "Refused", cond.message)
    # The next pass over the same generation neither creates nor repeats the event.
    again = plan_reconcile({**st, "status": d.status.model_dump(mode="json")}, [], NODES, T0)
    assert again.of(CreateObject) == [] and again.events() == []
    # Fixed (a new generation): the first stage starts.
    fixed = make_training(generation=2, status=d.status.model_dump(mode="json"))
    started = plan_reconcile(fixed, [], NODES, T0)
    assert [a.body["metadata"]["name"] for a in started.of(CreateObject)] == ["tiny-s256-a1"]


def test_allow_list_comes_from_the_settings():
    st = make_training(image="ghcr.io/ringpilot/ringpilot:0.2.0")
    refused = plan_reconcile(st, [], NODES, T0)
    assert refused.of(CreateObject) == [] and refused.events()[0].reason == "Refused"
    allowed = Settings(allowed_images=("ghcr.io/ringpilot/ringpilot:0.2.0",))
    job = plan_reconcile(st, [], NODES, T0, settings=allowed).of(CreateObject)[0].body
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["image"] == "ghcr.io/ringpilot/ringpilot:0.2.0"


def test_a_users_template_reaches_the_rayjob_enforced():
    template = own_template()
    del pod(template, WORKER)["automountServiceAccountToken"]
    pod(template, WORKER)["containers"][0]["securityContext"] = {}
    st = make_training(ray_cluster={"template": template})
    spec = StagedTrainingSpec.model_validate(st["spec"])
    job = build_rayjob({**st, "metadata": {**st["metadata"]}}, spec, "s256", 1, ["lost"])
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["automountServiceAccountToken"] is False
    assert worker["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    exprs = worker["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["lost"]} in exprs


def test_operator_flag_and_environment_set_the_allow_list(monkeypatch):
    from operators import __main__ as entry
    from operators.handlers import ALLOWED_IMAGES_ENV, build_settings

    monkeypatch.delenv(ALLOWED_IMAGES_ENV, raising=False)
    assert build_settings().allowed_images == (DEFAULT_IMAGE,)
    monkeypatch.setenv(ALLOWED_IMAGES_ENV, f"a/b:1,a/b@{DIGEST}")
    assert build_settings().allowed_images == ("a/b:1", f"a/b@{DIGEST}")
    args = entry.build_arg_parser().parse_args(["--allowed-image", "x:1", "--allowed-image", "y:2"])
    assert args.allowed_image == ["x:1", "y:2"]
    monkeypatch.setenv(ALLOWED_IMAGES_ENV, "Not An Image")
    assert entry.main(["--namespace", "ns"]) == 2  # refused before any API call


def test_a_running_stage_whose_spec_is_refused_is_stopped_and_restarts_once_fixed():
    from operators.decide import DeleteRayJob

    running = {"phase": "Running", "current_stage": "s256", "observedGeneration": 1,
               "stages": [{"name": "s256", "state": "Running", "ray_job": "tiny-s256-a1",
                           "attempts": 1}, {"name": "s1k"}, {"name": "s4k"}]}
    # The image was taken off the allow-list (or the spec edited to one off it) mid-stage.
    st = make_training(generation=2, status=running, image="evil/miner:1")
    d = plan_reconcile(st, [], NODES, T0)
    assert d.of(DeleteRayJob) == [DeleteRayJob("tiny-s256-a1")] and d.of(CreateObject) == []
    s256 = d.status.stages[0]
    assert (s256.state, s256.ray_job, s256.attempts) == ("Pending", None, 1)
    assert [e.reason for e in d.events()] == ["Refused"]
    again = plan_reconcile({**st, "status": d.status.model_dump(mode="json")}, [], NODES, T0)
    assert again.actions == [] and again.status == d.status  # settled: nothing more to do
    fixed = make_training(generation=3, status=d.status.model_dump(mode="json"))
    names = [a.body["metadata"]["name"] for a in plan_reconcile(fixed, [], NODES, T0)
             .of(CreateObject)]
    assert names == ["tiny-s256-a2"]
