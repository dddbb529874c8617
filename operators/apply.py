"""Carry out a Decision against the Kubernetes API (the only module here that writes to it)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from operators.decide import ApplyConfigMap, CreateObject, Decision, DeleteRayJob, Emit
from operators.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION

log = logging.getLogger("ringpilot.operator")
COMPONENT = "ringpilot-operator"


def build_event(st: dict[str, Any], emit: Emit, now: dt.datetime) -> dict[str, Any]:
    """A core/v1 Event about the StagedTraining; the name is unique per message and time."""
    meta = st["metadata"]
    stamp = now.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    digest = hashlib.sha256(f"{emit.reason}{emit.message}{stamp}".encode()).hexdigest()[:10]
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{digest}", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "type": emit.type, "reason": emit.reason, "message": emit.message[:1024],
        "source": {"component": COMPONENT},
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


def apply_decision(api: client.ApiClient, st: dict[str, Any], decision: Decision,
                   now: dt.datetime) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Run the actions, then write the status.

    Returns the updated StagedTraining (None: status unchanged) and the RayJobs created, so the
    caller's caches hold them before the watches echo them back.
    """
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    ns = st["metadata"]["namespace"]
    created: list[dict[str, Any]] = []
    for action in decision.actions:
        if isinstance(action, CreateObject):
            group, version = action.body["apiVersion"].split("/")
            try:
                created.append(custom.create_namespaced_custom_object(
                    group, version, ns, "rayjobs", action.body))
            except ApiException as e:
                if e.status != 409:  # 409: already created (deterministic names), fine
                    raise
                continue
            if action.announce is not None:
                _post(core, st, action.announce, now)
        elif isinstance(action, ApplyConfigMap):
            _apply_configmap(core, ns, action.body)
        elif isinstance(action, DeleteRayJob):
            try:
                custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", action.name)
            except ApiException as e:
                if e.status != 404:
                    raise
        elif isinstance(action, Emit):
            _post(core, st, action, now)
    status = decision.status.model_dump(mode="json")
    old = {k: v for k, v in (st.get("status") or {}).items() if k in status}
    if old == status:
        return None, created
    return custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, st["metadata"]["name"], {"status": status}), created


def _post(core: client.CoreV1Api, st: dict[str, Any], emit: Emit, now: dt.datetime) -> None:
    ns = st["metadata"]["namespace"]
    log.info("%s %s/%s: %s", emit.reason, ns, st["metadata"]["name"], emit.message)
    try:
        core.create_namespaced_event(ns, build_event(st, emit, now))
    except ApiException as e:  # an event is worth a log line, never a failed reconcile
        log.warning("event %s not posted: %s", emit.reason, e.reason)


def _apply_configmap(core: client.CoreV1Api, ns: str, body: dict[str, Any]) -> None:
    name = body["metadata"]["name"]
    try:
        current = core.read_namespaced_config_map(name, ns)
    except ApiException as e:
        if e.status != 404:
            raise
        core.create_namespaced_config_map(ns, body)
        return
    if (current.data or {}) != body["data"]:
        core.patch_namespaced_config_map(name, ns, {"data": body["data"]})
