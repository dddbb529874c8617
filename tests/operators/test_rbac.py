"""RBAC as the apiserver applies it: request attributes, rule matching, the operator's grants."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.manifests.conftest import KUSTOMIZATIONS, kustomize
from tests.operators import authz
from tests.operators.authz import BOOTSTRAP_POLICY, Attributes, Grant, Identity
from tests.operators.kmock_server import ADMIN, KMockThread
from tests.operators.operator_rbac import CLUSTER_SCOPED, OPERATOR_CALLS, operator_identity

NS = "ringpilot"
ST = f"/apis/ringpilot.io/v1alpha1/namespaces/{NS}/stagedtrainings"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"


def attrs_of(method: str, url: str, who: Identity | None = None) -> Attributes:
    parts = urlsplit(url)
    return authz.request_attributes(method, parts.path, parse_qs(parts.query), who)


@pytest.mark.parametrize("method, url, verb, group, target, namespace, name", [
    ("GET", ST, "list", "ringpilot.io", "stagedtrainings", NS, ""),
    ("GET", ST + "?watch=true&resourceVersion=5", "watch", "ringpilot.io", "stagedtrainings",
     NS, ""),
    ("GET", ST + "?watch=1", "watch", "ringpilot.io", "stagedtrainings", NS, ""),
    ("GET", ST + "?watch=false", "list", "ringpilot.io", "stagedtrainings", NS, ""),
    ("GET", ST + "?fieldSelector=metadata.name%3Dtiny", "list", "ringpilot.io",
     "stagedtrainings", NS, "tiny"),
    ("GET", ST + "/tiny", "get", "ringpilot.io", "stagedtrainings", NS, "tiny"),
    ("PATCH", ST + "/tiny", "patch", "ringpilot.io", "stagedtrainings", NS, "tiny"),
    ("PATCH", ST + "/tiny/status", "patch", "ringpilot.io", "stagedtrainings/status", NS, "tiny"),
    ("PUT", ST + "/tiny/status", "update", "ringpilot.io", "stagedtrainings/status", NS, "tiny"),
    ("POST", f"/api/v1/namespaces/{NS}/events", "create", "", "events", NS, ""),
    ("PUT", LEASES + "/op", "update", "coordination.k8s.io", "leases", NS, "op"),
    ("PATCH", LEASES + "/op", "patch", "coordination.k8s.io", "leases", NS, "op"),
    ("DELETE", f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/j", "delete", "ray.io", "rayjobs", NS,
     "j"),
    ("DELETE", f"/apis/ray.io/v1/namespaces/{NS}/rayjobs", "deletecollection", "ray.io",
     "rayjobs", NS, ""),
    ("GET", "/apis/ray.io/v1/rayjobs", "list", "ray.io", "rayjobs", "", ""),  # all namespaces
    ("GET", "/api/v1/nodes?watch=true", "watch", "", "nodes", "", ""),
    ("GET", "/api/v1/nodes/n1", "get", "", "nodes", "", "n1"),
    ("GET", f"/api/v1/watch/namespaces/{NS}/configmaps", "watch", "", "configmaps", NS, ""),
    ("GET", f"/api/v1/namespaces/{NS}", "get", "", "namespaces", NS, NS),
    ("PUT", f"/api/v1/namespaces/{NS}/finalize", "update", "", "namespaces/finalize", NS, NS),
])
def test_request_attributes(method, url, verb, group, target, namespace, name):
    a = attrs_of(method, url)
    assert (a.resource_request, a.verb, a.api_group, a.target, a.namespace, a.name) == \
        (True, verb, group, target, namespace, name)


@pytest.mark.parametrize("method, url", [
    ("GET", "/api"), ("GET", "/api/v1"), ("GET", "/apis"), ("GET", "/apis/ray.io"),
    ("GET", "/apis/ray.io/v1"), ("GET", "/version"), ("POST", "/apis"), ("GET", "/healthz"),
])
def test_discovery_and_health_are_non_resource_requests(method, url):
    a = attrs_of(method, url)
    assert not a.resource_request and a.verb == method.lower() and a.path == url


SA = authz.service_account(NS, "op")


def grant(namespace: str | None = NS, **rule) -> Grant:
    return Grant(rule, namespace, "test")


@pytest.mark.parametrize("rule, a, allowed", [
    ({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
     Attributes("get", api_group="", resource="configmaps", namespace=NS, user=SA), True),
    ({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
     Attributes("list", api_group="", resource="configmaps", namespace=NS, user=SA), False),
    ({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]},
     Attributes("delete", api_group="", resource="configmaps", namespace=NS, user=SA), True),
    ({"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get"]},
     Attributes("get", api_group="", resource="rayjobs", namespace=NS, user=SA), False),
    # A resource does not cover its subresources, nor a subresource its resource.
    ({"apiGroups": ["ringpilot.io"], "resources": ["stagedtrainings"], "verbs": ["patch"]},
     Attributes("patch", api_group="ringpilot.io", resource="stagedtrainings",
                subresource="status", namespace=NS, user=SA), False),
    ({"apiGroups": ["ringpilot.io"], "resources": ["stagedtrainings/status"], "verbs": ["patch"]},
     Attributes("patch", api_group="ringpilot.io", resource="stagedtrainings", namespace=NS,
                user=SA), False),
    ({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["patch"]},
     Attributes("patch", api_group="ringpilot.io", resource="stagedtrainings",
                subresource="status", namespace=NS, user=SA), True),
    ({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["a"], "verbs": ["get"]},
     Attributes("get", api_group="", resource="configmaps", name="b", namespace=NS, user=SA),
     False),
    # The Lease bug: the Role granted get, create and update on leases; the renewal patched.
    ({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
      "verbs": ["get", "create", "update"]},
     Attributes("patch", api_group="coordination.k8s.io", resource="leases", name="op",
                namespace=NS, user=SA), False),
    ({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
      "verbs": ["get", "create", "update"]},
     Attributes("update", api_group="coordination.k8s.io", resource="leases", name="op",
                namespace=NS, user=SA), True),
])
def test_rule_matching(rule, a, allowed):
    assert authz.authorize([grant(**rule)], a) is allowed


def test_a_role_binding_grants_in_its_namespace_only():
    g = grant(apiGroups=["ray.io"], resources=["rayjobs"], verbs=["list"])
    rayjobs = dict(verb="list", api_group="ray.io", resource="rayjobs", user=SA)
    assert authz.authorize([g], Attributes(namespace=NS, **rayjobs))
    assert not authz.authorize([g], Attributes(namespace="default", **rayjobs))
    assert not authz.authorize([g], Attributes(namespace="", **rayjobs))  # across all namespaces
    assert authz.authorize([grant(None, **g.rule)], Attributes(namespace="default", **rayjobs))


def test_non_resource_urls_match_exactly_or_by_trailing_star():
    g = grant(None, nonResourceURLs=["/apis/*", "/version"], verbs=["get"])
    path = dict(resource_request=False, user=SA)
    assert authz.authorize([g], Attributes("get", path="/apis/ray.io/v1", **path))
    assert authz.authorize([g], Attributes("get", path="/version", **path))
    assert not authz.authorize([g], Attributes("get", path="/version/x", **path))
    assert not authz.authorize([g], Attributes("post", path="/apis/x", **path))
    assert not authz.authorize([grant(NS, **g.rule)], Attributes("get", path="/apis/x", **path))


def test_bindings_resolve_subjects_and_roles():
    docs = [
        {"kind": "Role", "metadata": {"name": "r", "namespace": NS},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]},
        {"kind": "RoleBinding", "metadata": {"name": "b", "namespace": NS},
         "roleRef": {"kind": "Role", "name": "r"},
         "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": NS}]},
        {"kind": "RoleBinding", "metadata": {"name": "missing", "namespace": NS},
         "roleRef": {"kind": "Role", "name": "nowhere"},
         "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": NS}]},
        *BOOTSTRAP_POLICY,
    ]
    assert [g.namespace for g in authz.grants_for(docs, SA)] == [NS, None]  # + discovery
    other = authz.service_account("other", "op")
    assert [g.namespace for g in authz.grants_for(docs, other)] == [None]
    assert authz.grants_for(docs, Identity("system:anonymous", ("system:unauthenticated",))) == []


def test_forbidden_status_is_a_kubernetes_status():
    a = attrs_of("PATCH", LEASES + "/op", SA)
    body = authz.forbidden_status(a)
    assert (body["kind"], body["status"], body["reason"], body["code"]) == \
        ("Status", "Failure", "Forbidden", 403)
    assert body["message"] == (
        'leases.coordination.k8s.io "op" is forbidden: User '
        '"system:serviceaccount:ringpilot:op" cannot patch resource "leases" in API group '
        '"coordination.k8s.io" in the namespace "ringpilot"')


# --- the operator's grants in manifests/ -------------------------------------------------------

def policy(subdir: str) -> list[dict]:
    return [*kustomize(subdir), *BOOTSTRAP_POLICY]


@pytest.mark.parametrize("subdir", KUSTOMIZATIONS)
def test_operator_is_granted_exactly_the_calls_it_makes(subdir):
    docs = policy(subdir)
    ns, who = operator_identity(docs)
    grants = authz.grants_for(docs, who)
    for (group, target, verb), (where, _) in OPERATOR_CALLS.items():
        resource, _, sub = target.partition("/")
        scope = "" if (group, resource) in CLUSTER_SCOPED else ns
        a = Attributes(verb, api_group=group, resource=resource, subresource=sub,
                       namespace=scope, user=who)
        assert authz.authorize(grants, a), f"{verb} {group}/{target} ({where}) is not granted"
        if scope:  # the Role is the operator's namespace's only
            assert not authz.authorize(grants, Attributes(verb, api_group=group, resource=resource,
                                                    subresource=sub, namespace="default",
                                                    user=who))
    granted = {(group, target, verb) for g in grants for group in g.rule.get("apiGroups", [])
               for target in g.rule.get("resources", []) for verb in g.rule["verbs"]}
    assert granted <= set(OPERATOR_CALLS), \
        f"granted but never called: {sorted(granted - set(OPERATOR_CALLS))}"


def test_the_lease_renewal_of_the_old_leader_is_forbidden_by_the_role():
    ns, who = operator_identity(policy(""))
    a = attrs_of("PATCH", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/x", who)
    assert not authz.authorize(authz.grants_for(policy(""), who), a)


# --- the emulator -----------------------------------------------------------------------------

@pytest.fixture
def operator_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    docs = policy("")
    ns, who = operator_identity(docs)
    with KMockThread(tmp_path, docs, who, ns) as server:
        yield server, config.new_client_from_config(str(server.kubeconfig()))


def test_emulator_answers_forbidden_and_records_every_decision(operator_api):
    server, api = operator_api
    coord = client.CoordinationV1Api(api)
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "x"}, "spec": {"holderIdentity": "me"}}
    coord.create_namespaced_lease(server.namespace, lease)
    with pytest.raises(ApiException) as denied:
        coord.patch_namespaced_lease("x", server.namespace, {"spec": {"holderIdentity": "you"}})
    status = json.loads(denied.value.body)
    assert denied.value.status == 403 and status["reason"] == "Forbidden"
    assert status["kind"] == "Status" and status["code"] == 403
    assert server.request("GET", f"{LEASES}/x")["spec"]["holderIdentity"] == "me"  # unchanged
    decisions = [(d.attributes.verb, d.allowed) for d in server.decisions(server.operator)
                 if d.attributes.resource == "leases"]
    assert decisions == [("create", True), ("patch", False)]
    assert all(d.allowed for d in server.decisions(ADMIN))


def test_emulator_replaces_with_optimistic_locking(operator_api):
    server, api = operator_api
    coord = client.CoordinationV1Api(api)
    body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "x"}, "spec": {"holderIdentity": "me", "leaseTransitions": 1}}
    coord.create_namespaced_lease(server.namespace, body)
    first = api.sanitize_for_serialization(coord.read_namespaced_lease("x", server.namespace))
    mine = coord.replace_namespaced_lease("x", server.namespace,
                                          {**first, "spec": {"holderIdentity": "me"}})
    assert mine.spec.lease_transitions is None  # a replace, not a merge
    with pytest.raises(ApiException) as stale:  # written since `first` was read
        coord.replace_namespaced_lease("x", server.namespace,
                                       {**first, "spec": {"holderIdentity": "you"}})
    assert stale.value.status == 409
    assert coord.read_namespaced_lease("x", server.namespace).spec.holder_identity == "me"


def test_emulator_answers_a_create_with_201_and_the_object(operator_api):
    server, api = operator_api
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "j"}, "spec": {}}
    created = client.CustomObjectsApi(api).create_namespaced_custom_object(
        "ray.io", "v1", server.namespace, "rayjobs", job)
    assert created["metadata"]["name"] == "j" and created["metadata"]["resourceVersion"]
