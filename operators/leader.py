"""One active operator at a time: a coordination.k8s.io/v1 Lease held while kopf runs.

Kopf's own peering would freeze every replica when two share a priority and needs an extra
cluster-wide CRD; a Lease is the Kubernetes-native lock and needs only namespaced RBAC: get,
create and update (every write is a full replace carrying the resourceVersion that was read, as
client-go's LeaseLock does, so of two replicas racing for the Lease one gets 409 Conflict).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from typing import Any, Literal

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("ringpilot.operator")
# The e2e tests shorten the lease so that renewals happen while they run.
LEASE_SECONDS = int(os.environ.get("RINGPILOT_LEASE_SECONDS", "30"))
RENEW_SECONDS = 10


def _micro(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(t: Any) -> dt.datetime | None:
    if isinstance(t, dt.datetime):
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    if not t:
        return None
    return dt.datetime.fromisoformat(str(t).replace("Z", "+00:00"))


def plan_lease(spec: dict[str, Any] | None, me: str, now: dt.datetime
               ) -> Literal["create", "renew", "acquire", "wait"]:
    """What `me` should do about the Lease whose spec is `spec` (None: there is no Lease)."""
    if spec is None:
        return "create"
    holder = spec.get("holderIdentity")
    if holder == me:
        return "renew"
    renewed = _parse(spec.get("renewTime"))
    duration = spec.get("leaseDurationSeconds") or LEASE_SECONDS
    if not holder or renewed is None or now >= renewed + dt.timedelta(seconds=duration):
        return "acquire"  # released, or its holder stopped renewing: take it over
    return "wait"


def build_lease_spec(me: str, now: dt.datetime, previous: dict[str, Any] | None,
                     seconds: int = LEASE_SECONDS) -> dict[str, Any]:
    previous = previous or {}
    same = previous.get("holderIdentity") == me
    return {"holderIdentity": me, "leaseDurationSeconds": seconds,
            "acquireTime": previous.get("acquireTime") if same else _micro(now),
            "renewTime": _micro(now),
            "leaseTransitions": (previous.get("leaseTransitions") or 0) + (0 if same else 1)}


class LeaseHolder:
    """Acquire, renew and release one Lease through the Kubernetes API."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str,
                 seconds: int = LEASE_SECONDS):
        self.coord = client.CoordinationV1Api(api)
        self.api = api
        self.namespace, self.name, self.identity, self.seconds = namespace, name, identity, seconds

    def _read(self) -> dict[str, Any] | None:
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return self.api.sanitize_for_serialization(lease)

    def try_hold(self) -> bool:
        """Take or renew the Lease if that is due; True while this process holds it."""
        now = dt.datetime.now(dt.timezone.utc)
        current = self._read()
        spec = (current or {}).get("spec") if current is not None else None
        step = plan_lease(spec if current is not None else None, self.identity, now)
        if step == "wait":
            return False
        lease_spec = build_lease_spec(self.identity, now, spec, self.seconds)
        try:
            if current is None:
                self.coord.create_namespaced_lease(self.namespace, {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": lease_spec})
            else:
                self._replace(current, lease_spec)
        except ApiException as e:
            if e.status in (409, 422):
                return False
            raise
        if step != "renew":
            log.info("lease %s/%s acquired by %s", self.namespace, self.name, self.identity)
        return True

    def _replace(self, current: dict[str, Any], spec: dict[str, Any]) -> None:
        """Write `spec` over the Lease read as `current`: the resourceVersion read makes the
        write conditional (409 if anyone wrote in between), and `update` is all it needs."""
        body = {**current, "spec": spec}
        self.coord.replace_namespaced_lease(self.name, self.namespace, body)

    def release(self) -> None:
        """Let a successor take over at once instead of after the lease duration."""
        current = self._read()
        spec = (current or {}).get("spec") or {}
        if current is None or spec.get("holderIdentity") != self.identity:
            return
        # An explicit null: a replace drops the holder on any server, even one that merges.
        self._replace(current, {**spec, "holderIdentity": None})

    def keep(self, stop: threading.Event) -> None:
        """Renew until `stop`; if renewing fails past the lease duration, exit the process so
        that two operators never act at once (the Deployment restarts this one)."""
        last_ok = dt.datetime.now(dt.timezone.utc)
        while not stop.wait(min(RENEW_SECONDS, self.seconds / 3)):
            try:
                held = self.try_hold()
            except Exception as e:  # API unreachable: keep trying until the lease runs out
                log.warning("lease renewal failed: %s", e)
                held = None
            now = dt.datetime.now(dt.timezone.utc)
            if held:
                last_ok = now
            elif held is False or (now - last_ok).total_seconds() > self.seconds:
                log.error("lease %s/%s lost; exiting so only one operator acts", self.namespace,
                          self.name)
                os._exit(3)
