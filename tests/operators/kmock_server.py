"""A KMock Kubernetes API emulator on 127.0.0.1 in a background thread, with a kubeconfig."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import kmock
import yaml

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


class KMockThread:
    """Start with `with KMockThread(tmp_path) as api:`; `api.request(...)` talks HTTP to it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
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
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s, host="127.0.0.1") as srv:
            for key, (kind, namespaced, subresources) in RESOURCES.items():
                k8s.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced,
                                                        subresources=subresources, verbs=VERBS)
            self.url = str(srv.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def kubeconfig(self) -> Path:
        path = self.workdir / "kubeconfig.yaml"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                                       "namespace": "ml"}}],
        }))
        return path

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def list(self, path: str) -> list[dict[str, Any]]:
        return self.request("GET", path)["items"]
