"""Carry out a Decision against the Kubernetes API (the only module here that writes to it)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from operators.decide import (
    ApplyConfigMap,
    CreateObject,
    Decision,
    DeleteRayJob,
    Emit,
    with_condition,
)
from operators.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION

log = logging.getLogger("ringpilot.operator")
COMPONENT = "ringpilot-operator"
OWNED = "ResourcesOwned"  # condition: False while an object the run needs belongs to another


class NotOwned(Exception):
    """An object the operator would write exists and is not the StagedTraining's own."""


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
    created: list[dict[str, Any]] = []
    try:
        _run_actions(custom, core, st, decision, now, created)
    except NotOwned as e:
        # Nothing after the refused write happens (a RayJob would run from that ConfigMap), and
        # the status says so instead of what the decision planned.
        was = next((c for c in (st.get("status") or {}).get("conditions") or []
                    if isinstance(c, dict) and c.get("type") == OWNED), {})
        if was.get("status") != "False" or was.get("message") != str(e):
            _post(core, st, Emit("Warning", "NotOwned", str(e)), now)
        return _write_status(custom, st, with_condition(st, OWNED, "False", "NotOwned", str(e),
                                                        now)), created
    return _write_status(custom, st, decision.status), created


def _write_status(custom: client.CustomObjectsApi, st: dict[str, Any], status_model: Any
                  ) -> dict[str, Any] | None:
    status = status_model.model_dump(mode="json")
    old = {k: v for k, v in (st.get("status") or {}).items() if k in status}
    if old == status:
        return None
    return custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, st["metadata"]["namespace"], PLURAL, st["metadata"]["name"],
        {"status": status})


def _run_actions(custom: client.CustomObjectsApi, core: client.CoreV1Api, st: dict[str, Any],
                 decision: Decision, now: dt.datetime, created: list[dict[str, Any]]) -> None:
    ns = st["metadata"]["namespace"]
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
            _apply_configmap(core, st, action.body)
        elif isinstance(action, DeleteRayJob):
            try:
                custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", action.name)
            except ApiException as e:
                if e.status != 404:
                    raise
        elif isinstance(action, Emit):
            _post(core, st, action, now)


def _post(core: client.CoreV1Api, st: dict[str, Any], emit: Emit, now: dt.datetime) -> None:
    ns = st["metadata"]["namespace"]
    log.info("%s %s/%s: %s", emit.reason, ns, st["metadata"]["name"], emit.message)
    try:
        core.create_namespaced_event(ns, build_event(st, emit, now))
    except ApiException as e:  # an event is worth a log line, never a failed reconcile
        log.warning("event %s not posted: %s", emit.reason, e.reason)


def owned_by(owners: Any, st: dict[str, Any]) -> bool:
    """Whether ownerReferences `owners` (dicts or client models) name this StagedTraining, by
    uid: a name alone could be a deleted run's, or an object a tenant made to look like one."""
    uid = st["metadata"].get("uid")
    for o in owners or []:
        get = o.get if isinstance(o, dict) else lambda k, o=o: getattr(o, _SNAKE.get(k, k), None)
        if uid and get("uid") == uid and get("kind") == KIND and get("apiVersion") == API_VERSION:
            return True
    return False


_SNAKE = {"apiVersion": "api_version"}


def _apply_configmap(core: client.CoreV1Api, st: dict[str, Any], body: dict[str, Any]) -> None:
    ns, name = st["metadata"]["namespace"], body["metadata"]["name"]
    try:
        current = core.read_namespaced_config_map(name, ns)
    except ApiException as e:
        if e.status != 404:
            raise
        core.create_namespaced_config_map(ns, body)
        return
    if not owned_by(current.metadata.owner_references, st):
        raise NotOwned(f"ConfigMap {name} exists and is not owned by StagedTraining "
                       f"{st['metadata']['name']} (no ownerReference with its uid); the operator "
                       "writes only objects it owns: delete or rename that ConfigMap")
    if (current.data or {}) != body["data"]:
        core.patch_namespaced_config_map(name, ns, {"data": body["data"]})
