"""The Lease decision that keeps one operator active at a time."""

from __future__ import annotations

import datetime as dt

import pytest

from operators.leader import build_lease_spec, plan_lease

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
