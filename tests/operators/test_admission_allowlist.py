"""Admission by allow-list: a pod template field not on the list is refused with its path, a
wrongly typed value is refused with its path, and any JSON under a template gets a verdict."""

from __future__ import annotations

import copy
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from operators.admission import Refusal, plan_admission
from operators.resource import DEFAULT_IMAGE, StagedTrainingSpec
from tests.operators.test_admission import HEAD, WORKER, own_template, pod, spec_with

C0 = f"{WORKER}.containers[0]"


def set_pod(where: str = WORKER, **values):
    return lambda t: pod(t, where).update(values)


def set_container(**values):
    return lambda t: pod(t, WORKER)["containers"][0].update(values)


def add_volume(volume: dict):
    return lambda t: pod(t, WORKER)["volumes"].append({"name": "x", **volume})


# (change, the field named, words of the reason)
REFUSED = [
    pytest.param(set_pod(nodeName="gpu-7"), f"{WORKER}.nodeName", "past the scheduler",
                 id="node-name"),
    pytest.param(set_pod(priorityClassName="system-node-critical"),
                 f"{WORKER}.priorityClassName", "preempt", id="priority-class"),
    pytest.param(set_pod(HEAD, runtimeClassName="runc-unsafe"), f"{HEAD}.runtimeClassName",
                 "runtime", id="runtime-class"),
    pytest.param(set_pod(hostAliases=[{"ip": "10.0.0.1", "hostnames": ["api"]}]),
                 f"{WORKER}.hostAliases", "/etc/hosts", id="host-aliases"),
    pytest.param(set_pod(resourceClaims=[{"name": "gpu"}]), f"{WORKER}.resourceClaims", "DRA",
                 id="pod-resource-claims"),
    pytest.param(lambda t: pod(t, WORKER)["containers"][0]["resources"].update(
        claims=[{"name": "gpu"}]), f"{C0}.resources.claims", "DRA", id="container-claims"),
    pytest.param(set_pod(tolerations=[{"operator": "Exists"}]), f"{WORKER}.tolerations[0].key",
                 "every taint", id="tolerate-everything"),
    pytest.param(set_pod(shareProcessNamespace=True), f"{WORKER}.shareProcessNamespace",
                 "processes", id="share-process-namespace"),
    pytest.param(set_pod(hostNetwork="yes"), f"{WORKER}.hostNetwork", "network namespace",
                 id="host-network-string"),
    pytest.param(add_volume({"emptyDir": {}, "hostPath": {"path": "/"}}), f"{WORKER}.volumes[2]",
                 "2 sources", id="empty-dir-and-host-path"),
    pytest.param(add_volume({}), f"{WORKER}.volumes[2]", "0 sources", id="no-source"),
    pytest.param(add_volume({"emptyDir": "big"}), f"{WORKER}.volumes[2].emptyDir",
                 "not an object", id="volume-not-object"),
    pytest.param(set_container(ports=[1]), f"{C0}.ports[0]", "a number (1)", id="port-number"),
    pytest.param(set_container(ports=[{"containerPort": "80"}]), f"{C0}.ports[0].containerPort",
                 "a string", id="port-string"),
    pytest.param(set_container(ports=[{"containerPort": 0}]), f"{C0}.ports[0].containerPort",
                 "not a port", id="port-zero"),
    pytest.param(set_container(ports=[{"containerPort": 80, "hostIP": "0.0.0.0"}]),
                 f"{C0}.ports[0].hostIP", "address of the node", id="host-ip"),
    pytest.param(set_container(env=["x"]), f"{C0}.env[0]", "a string ('x')", id="env-string"),
    pytest.param(set_container(env={"A": "1"}), f"{C0}.env", "an object", id="env-mapping"),
    pytest.param(set_container(env=[{"name": "A", "value": 1}]), f"{C0}.env[0].value",
                 "a number", id="env-value-number"),
    pytest.param(set_container(stdin=True), f"{C0}.stdin", "not a field", id="unknown-field"),
    pytest.param(set_container(command="python"), f"{C0}.command", "a string", id="command"),
    pytest.param(set_container(volumeMounts=[{"name": "tmp", "mountPath": "/x",
                                              "mountPropagation": "Bidirectional"}]),
                 f"{C0}.volumeMounts[0].mountPropagation", "propagates", id="propagation"),
    pytest.param(set_container(volumeMounts=[{"name": "tmp", "mountPath": "/x",
                                              "subPath": "../../etc"}]),
                 f"{C0}.volumeMounts[0].subPath", "leaves its volume", id="sub-path-escape"),
    pytest.param(set_container(resources=[]), f"{C0}.resources", "a list", id="resources-list"),
    pytest.param(set_container(image=["x"]), f"{C0}.image", "allow-list", id="image-list"),
    pytest.param(set_container(securityContext={"privileged": "true"}),
                 f"{C0}.securityContext.privileged", "every capability", id="privileged-string"),
    pytest.param(set_container(securityContext={"procMount": "Unmasked"}),
                 f"{C0}.securityContext.procMount", "/proc", id="proc-mount"),
    pytest.param(set_container(securityContext={"capabilities": {"add": "SYS_ADMIN"}}),
                 f"{C0}.securityContext.capabilities.add", "SYS_ADMIN", id="caps-string"),
    pytest.param(set_pod(securityContext={"sysctls": [{"name": "kernel.x", "value": "1"}]}),
                 f"{WORKER}.securityContext.sysctls", "kernel", id="sysctls"),
    pytest.param(lambda t: t["workerGroupSpecs"][0].update(rayStartParams=["x"]),
                 "workerGroupSpecs[0].rayStartParams", "a list", id="start-params-list"),
    pytest.param(lambda t: t["workerGroupSpecs"][0].update(replicas=10**12),
                 "workerGroupSpecs[0].replicas", "outside", id="replicas-huge"),
    pytest.param(lambda t: pod(t, "workerGroupSpecs[0].template").update(metadata=[]),
                 "workerGroupSpecs[0].template.metadata", "a list", id="metadata-list"),
]


@pytest.mark.parametrize("change, field, reason", REFUSED)
def test_fields_off_the_allow_list_and_wrong_types_are_refused_by_path(change, field, reason):
    refusals = plan_admission(spec_with(change), [DEFAULT_IMAGE])
    wanted = f"spec.ray_cluster.template.{field}"
    assert wanted in [r.field for r in refusals], [str(r) for r in refusals]
    [refusal] = [r for r in refusals if r.field == wanted]
    assert reason in refusal.reason
    assert "Fix: " in str(refusal) and "\n" not in str(refusal)


def test_a_template_with_the_allowed_extras_is_admitted():
    def extras(t):
        spec = pod(t, WORKER)
        spec.update(nodeSelector={"nvidia.com/gpu.product": "L40S"},
                    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists",
                                  "effect": "NoSchedule"}],
                    imagePullSecrets=[{"name": "registry"}], terminationGracePeriodSeconds=30)
        spec["containers"][0].update(
            env=[{"name": "A", "value": "1"},
                 {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
            envFrom=[{"configMapRef": {"name": "settings"}}], args=["--x"],
            volumeMounts=[{"name": "tmp", "mountPath": "/tmp", "subPath": "a/b"}],
            ports=[{"containerPort": 9000, "name": "extra", "protocol": "TCP"}])
        spec["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": "d"}})

    assert plan_admission(spec_with(extras), [DEFAULT_IMAGE]) == []


# --- fuzz: any JSON under a pod template gets a verdict ---------------------------------------

KEYS = st.sampled_from([
    "containers", "initContainers", "volumes", "securityContext", "env", "envFrom", "ports",
    "resources", "limits", "requests", "image", "name", "hostPath", "emptyDir", "capabilities",
    "add", "privileged", "valueFrom", "secretKeyRef", "configMapRef", "secretRef", "tolerations",
    "key", "operator", "containerPort", "volumeMounts", "subPath", "seccompProfile", "type",
    "seLinuxOptions", "metadata", "labels", "spec", "template", "rayStartParams", "runAsUser",
    "nodeSelector", "imagePullSecrets", "hostNetwork", "command", "cpu", "memory",
])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(string.printable, max_size=12) | st.just(DEFAULT_IMAGE),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(KEYS | st.text(max_size=6), inner, max_size=5),
    max_leaves=40)


BASE = spec_with()
OWN = own_template()


def with_template(template: dict) -> StagedTrainingSpec:
    """BASE with `template` as is (model_copy: the fuzz times admission, not pydantic)."""
    return BASE.model_copy(update={"ray_cluster": BASE.ray_cluster.model_copy(
        update={"template": template})})


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(JSON, st.sampled_from(["headGroupSpec", "workerGroupSpecs"]))
def test_any_json_as_a_pod_spec_gets_a_verdict(tree, where):
    template = copy.deepcopy(OWN)
    group = template[where] if where == "headGroupSpec" else template[where][0]
    group["template"]["spec"] = tree
    refusals = plan_admission(with_template(template), [DEFAULT_IMAGE])
    assert all(isinstance(r, Refusal) and r.field.startswith("spec.") for r in refusals)
    assert all("\n" not in str(r) for r in refusals)
    if not isinstance(tree, dict):
        assert refusals  # a pod spec that is not an object is never admitted


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS | st.text(max_size=6), JSON, max_size=6))
@example({"0\n": None})  # found by a CI run: `$` matched before the key's final newline
def test_any_json_as_a_group_or_container_gets_a_verdict(tree):
    template = copy.deepcopy(OWN)
    template["workerGroupSpecs"] = [tree]
    head = template["headGroupSpec"]["template"]["spec"]
    head["containers"] = [{**head["containers"][0], **tree}]
    refusals = plan_admission(with_template(template), [DEFAULT_IMAGE])
    assert all(isinstance(r, Refusal) and "\n" not in str(r) for r in refusals)
