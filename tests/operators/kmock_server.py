"""A KMock Kubernetes API emulator on 127.0.0.1 in a background thread, with a kubeconfig.

Two things KMock leaves out are added, because ringpilot's correctness on a real cluster
depends on them. Like a real apiserver it authorises every request by RBAC
(tests/operators/authz.py) against the Roles and bindings it is given, answers 403 to what they
do not allow, and records every decision, so a test can say which calls the operator made and
that none was denied. And it stamps a new resourceVersion on every write, answers a create with
201 Created, and serves PUT as a whole-object replace that a stale resourceVersion turns into
409 Conflict (the Lease's lock).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import threading
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

from tests.operators import authz
from tests.operators.authz import ANONYMOUS, Attributes, Grant, Identity

RESOURCES = {
    "ringpilot.io/v1alpha1/stagedtrainings": ("StagedTraining", True, {"status"}),
    "ray.io/v1/rayjobs": ("RayJob", True, {"status"}),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/events": ("Event", True, set()),
    "v1/nodes": ("Node", False, {"status"}),
    "v1/namespaces": ("Namespace", False, set()),  # kopf waits to discover it at startup
    "coordination.k8s.io/v1/leases": ("Lease", True, set()),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
# The test itself acts as a cluster admin (and as KubeRay, patching RayJob status).
ADMIN = Identity("kubernetes-admin", ("system:masters", "system:authenticated"))


@dataclass(frozen=True)
class Decision:
    """One request as the authoriser saw it, and whether it was let through."""
    attributes: Attributes
    allowed: bool

    def __str__(self) -> str:
        a = self.attributes
        what = (f"{a.verb} {a.api_group or 'core'}/{a.target}"
                f"{' ' + a.name if a.name else ''} in {a.namespace or 'the cluster scope'}"
                if a.resource_request else f"{a.verb} {a.path}")
        return f"{'allowed' if self.allowed else 'FORBIDDEN'}: {a.user.user} {what}"


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response(authz.status_body(code, reason, message), status=code)


@attrs.define(kw_only=True)
class StrictEmulator(kmock.KubernetesEmulator):
    """KMock's emulator behind RBAC (bearer token -> identity -> bound rules -> allow or 403),
    with PUT as an optimistically locked replace."""

    tokens: Mapping[str, Identity] = attrs.field(factory=dict)
    grants: Mapping[Identity, list[Grant]] = attrs.field(factory=dict)
    decisions: list[Decision] = attrs.field(factory=list)
    versions: itertools.count = attrs.field(factory=lambda: itertools.count(1))

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        who = self.tokens.get(auth.removeprefix("Bearer ").strip(), ANONYMOUS)
        query = {k: request.url.query.getall(k) for k in request.url.query}
        a = authz.request_attributes(request.method.value, request.url.path, query, who)
        allowed = authz.authorize(self.grants.get(who, []), a)
        self.decisions.append(Decision(a, allowed))
        if not allowed:  # before the emulator stores anything, as the apiserver would
            return aiohttp.web.json_response(authz.forbidden_status(a), status=403)
        method = request.method.value
        if method == "PUT" and request.name and not request.subresource:
            return await self._replace(request, a)
        writes = (method == "POST" and not request.name) or (method == "PATCH" and request.name)
        if request.resource is not None and writes and isinstance(request.data, dict):
            # Every write moves the object to a new resourceVersion, as on a real apiserver
            # (KMock stores and merges what it is given, so the stamp goes into the body).
            request.data.setdefault("metadata", {})["resourceVersion"] = str(next(self.versions))
        response = await super()._handle(request)
        if method == "POST" and request.resource is not None and response.status == 200:
            # 201 Created, as the apiserver answers: kubernetes' client returns None for a 200.
            response.set_status(201)
        return response

    async def _replace(self, request: kmock.Request, a: Attributes) -> aiohttp.web.Response:
        """Store the body as the object's next version; a body naming a resourceVersion other
        than the stored one gets 409, as two writers racing on a real apiserver would."""
        key = (request.resource, request.namespace, request.name)
        qualified = f"{a.resource}.{a.api_group}" if a.api_group else a.resource
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                return _status(404, "NotFound", f'{qualified} "{a.name}" not found')
            stored = self._objects[key].raw.get("metadata", {}).get("resourceVersion")
            sent = (request.data.get("metadata") or {}).get("resourceVersion")
            if sent and sent != stored:
                return _status(409, "Conflict", f'Operation cannot be fulfilled on {qualified} '
                               f'"{a.name}": the object has been modified; please apply your '
                               "changes to the latest version and try again")
            body = copy.deepcopy(request.data)
            body.setdefault("metadata", {})["resourceVersion"] = str(next(self.versions))
            self._objects[key].history.append(body)
            raw = self._objects[key].raw
            await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
        return aiohttp.web.json_response(raw)


class KMockThread:
    """Start with `with KMockThread(tmp_path, policy, operator, namespace) as api:`;
    `api.request(...)` talks HTTP to it as the admin, `api.kubeconfig()` lets a process in as
    `operator`, and `api.decisions(who)` lists what was asked and whether it was allowed.

    `policy`: the Roles, ClusterRoles and bindings in force (rendered manifests/ plus the
    cluster's bootstrap policy); `namespace`: the kubeconfig context's default.
    """

    def __init__(self, workdir: Path, policy: Iterable[Mapping[str, Any]], operator: Identity,
                 namespace: str):
        self.workdir = workdir
        self.operator, self.namespace = operator, namespace
        self._tokens = {"operator-token": operator, "admin-token": ADMIN}
        policy = list(policy)
        self._grants = {who: authz.grants_for(policy, who) for who in (operator, ADMIN, ANONYMOUS)}
        self._emulator: StrictEmulator | None = None
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> KMockThread:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("KMock did not start within 20 s")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        emulator = StrictEmulator(tokens=self._tokens, grants=self._grants)
        async with emulator as k8s, kmock.Server(k8s, host="127.0.0.1") as srv:
            for key, (kind, namespaced, subresources) in RESOURCES.items():
                k8s.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced,
                                                        subresources=subresources, verbs=VERBS)
            self.url = str(srv.url).rstrip("/")
            self._emulator = k8s
            self._ready.set()
            await self._stop.wait()

    def kubeconfig(self) -> Path:
        path = self.workdir / "kubeconfig.yaml"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "operator-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                                       "namespace": self.namespace}}],
        }))
        return path

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type,
                                              "Authorization": "Bearer admin-token"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def list(self, path: str) -> list[dict[str, Any]]:
        return self.request("GET", path)["items"]

    def decisions(self, who: Identity | None = None) -> list[Decision]:
        """Every request so far with its decision, in order; only `who`'s when given."""
        assert self._emulator is not None
        return [d for d in list(self._emulator.decisions)
                if who is None or d.attributes.user == who]
