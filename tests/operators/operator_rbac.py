"""What the operator calls on the Kubernetes API, declared once and checked from both sides.

The Role and ClusterRole in manifests/ must grant exactly OPERATOR_CALLS to the operator's
ServiceAccount (test_rbac.py), and the e2e tests (test_operator_kmock.py) fail on any call the
operator makes outside it, or when the test named for an entry does not make that call: the
table can neither miss a verb the code needs nor keep one it stopped needing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tests.operators.authz import Attributes, Identity, service_account

E2E_RUN = "test_stages_advance_retry_and_give_up"
E2E_RESTART = "test_operator_restart_resumes_mid_stage"
E2E_EDIT = "test_spec_edit_deletes_the_removed_stage_and_rewrites_the_run_file"

# (apiGroup, resource, verb) -> (what calls it, the e2e test that makes the call).
OPERATOR_CALLS: dict[tuple[str, str, str], tuple[str, str]] = {
    ("ringpilot.io", "stagedtrainings", "list"): ("kopf: the watch's initial listing", E2E_RUN),
    ("ringpilot.io", "stagedtrainings", "watch"): ("kopf: on.event, on.resume", E2E_RUN),
    ("ringpilot.io", "stagedtrainings", "patch"): (
        "kopf: the last-handled-configuration annotation of on.resume", E2E_RUN),
    ("ringpilot.io", "stagedtrainings/status", "patch"): ("apply.py: apply_decision", E2E_RUN),
    ("ray.io", "rayjobs", "list"): ("kopf: the rayjobs_by_owner index", E2E_RUN),
    ("ray.io", "rayjobs", "watch"): ("kopf: the rayjobs_by_owner index", E2E_RUN),
    ("ray.io", "rayjobs", "create"): ("apply.py: CreateObject, a stage's RayJob", E2E_RUN),
    ("ray.io", "rayjobs", "delete"): ("apply.py: DeleteRayJob, a stage left the spec", E2E_EDIT),
    ("", "configmaps", "get"): ("apply.py: _apply_configmap; handlers.read_cluster_yaml",
                                E2E_RUN),
    ("", "configmaps", "create"): ("apply.py: _apply_configmap, the run's working dir", E2E_RUN),
    ("", "configmaps", "patch"): ("apply.py: _apply_configmap, after a spec edit", E2E_EDIT),
    ("", "events", "create"): ("apply.py: _post, one Event per stage transition", E2E_RUN),
    ("coordination.k8s.io", "leases", "get"): ("leader.py: LeaseHolder._read", E2E_RESTART),
    ("coordination.k8s.io", "leases", "create"): ("leader.py: the first replica", E2E_RESTART),
    ("coordination.k8s.io", "leases", "update"): (
        "leader.py: renew, take over and release, each a replace", E2E_RESTART),
    ("", "nodes", "list"): ("kopf: the nodes_by_name index (cluster-scoped)", E2E_RUN),
    ("", "nodes", "watch"): ("kopf: the nodes_by_name index (cluster-scoped)", E2E_RUN),
}
CLUSTER_SCOPED = {("", "nodes")}  # granted by the ClusterRole; everything else by the Role


def call_key(a: Attributes) -> tuple[str, str, str]:
    return (a.api_group, a.target, a.verb)


def operator_identity(docs: Iterable[Mapping[str, Any]]) -> tuple[str, Identity]:
    """(namespace, identity) the operator's Deployment runs as, from rendered manifests."""
    deployments = [d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "ringpilot-operator"]
    assert len(deployments) == 1, "manifests/ should have one ringpilot-operator Deployment"
    d = deployments[0]
    ns = d["metadata"]["namespace"]
    return ns, service_account(ns, d["spec"]["template"]["spec"]["serviceAccountName"])
