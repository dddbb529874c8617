"""The Lease that keeps one operator active at a time: the decision, and the API calls."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import config

from operators.leader import LeaseHolder, build_lease_spec, plan_lease
from tests.manifests.conftest import kustomize
from tests.operators.authz import BOOTSTRAP_POLICY
from tests.operators.kmock_server import KMockThread
from tests.operators.operator_rbac import operator_identity

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)


def lease(holder, seconds_ago, duration=30):
    return {"holderIdentity": holder, "leaseDurationSeconds": duration,
            "renewTime": (NOW - dt.timedelta(seconds=seconds_ago)).isoformat()}


@pytest.mark.parametrize("spec, step", [
    (None, "create"),
    (lease("me", 5), "renew"),
    (lease("other", 5), "wait"),
    (lease("other", 29), "wait"),
    (lease("other", 31), "acquire"),
    (lease(None, 1), "acquire"),
    ({"holderIdentity": "other"}, "acquire"),
])
def test_plan_lease(spec, step):
    assert plan_lease(spec, "me", NOW) == step


def test_lease_spec_counts_transitions_only_on_takeover():
    taken = build_lease_spec("me", NOW, {"holderIdentity": "other", "leaseTransitions": 2})
    assert taken["leaseTransitions"] == 3 and taken["acquireTime"] == taken["renewTime"]
    renewed = build_lease_spec("me", NOW + dt.timedelta(seconds=10), taken)
    assert renewed["leaseTransitions"] == 3 and renewed["acquireTime"] == taken["acquireTime"]


# --- LeaseHolder against the emulated API, under the operator's RBAC --------------------------

@pytest.fixture
def lease_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KMockThread]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    docs = [*kustomize(""), *BOOTSTRAP_POLICY]
    ns, who = operator_identity(docs)
    with KMockThread(tmp_path, docs, who, ns) as server:
        yield server


def holder(api: KMockThread, identity: str, seconds: int = 30) -> LeaseHolder:
    return LeaseHolder(config.new_client_from_config(str(api.kubeconfig())), api.namespace,
                       "ringpilot-operator", identity, seconds)


def test_lease_is_taken_renewed_and_released_with_the_granted_verbs(lease_api):
    a, b = holder(lease_api, "a"), holder(lease_api, "b")
    assert a.try_hold() and a.try_hold()  # create, then renew
    assert not b.try_hold()  # held and fresh: b waits
    a.release()
    assert b.try_hold()  # released: b takes over at once
    lease = lease_api.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/"
                              f"{lease_api.namespace}/leases/ringpilot-operator")["spec"]
    assert lease["holderIdentity"] == "b" and lease["leaseTransitions"] == 2
    calls = lease_api.decisions(lease_api.operator)
    assert all(d.allowed for d in calls), [str(d) for d in calls if not d.allowed]
    assert {d.attributes.verb for d in calls} == {"get", "create", "update"}


def test_a_takeover_from_a_stale_read_loses_to_the_renewal(lease_api, monkeypatch):
    a, b = holder(lease_api, "a", seconds=1), holder(lease_api, "b")
    assert a.try_hold()
    time.sleep(1.1)
    stale = b._read()  # b sees a's lease expired...
    assert a.try_hold()  # ...but a renews before b writes
    monkeypatch.setattr(b, "_read", lambda: stale)
    assert not b.try_hold()  # b's replace carries the old resourceVersion: 409
    assert lease_api.decisions(lease_api.operator)[-1].attributes.verb == "update"  # it tried
    assert holder(lease_api, "c")._read()["spec"]["holderIdentity"] == "a"
