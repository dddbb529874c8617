"""Loading the manifests as Kubernetes would see them: composed by kustomize, validated offline."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from operators.schema import build_validation_schema

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
# CI and this machine keep the KubeRay CRDs beside the repository, never inside it.
KUBERAY = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"
K8S_VERSION = "1.32.0"
KUSTOMIZATIONS = ["", "overlays/dev", "overlays/shared-storage"]


@functools.cache
def kustomize(subdir: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl apply -k manifests/<subdir>` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (v1.21+, with its built-in kustomize) is needed to compose "
                    "manifests/; install it or put it on PATH")
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / subdir)], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize manifests/{subdir} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def samples() -> list[Path]:
    return sorted((MANIFESTS / "samples").glob("*.yaml"))


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def load(path: Path) -> dict[str, Any]:
    """The object a sample is about: its last document (a ConfigMap it needs may come first)."""
    return load_all(path)[-1]


@functools.cache
def kuberay_schema(kind: str) -> dict[str, Any]:
    """JSON Schema of KubeRay v1.7.0's served, stored `ray.io/v1` version of `kind`."""
    plural = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}[kind]
    path = KUBERAY / f"ray.io_{plural}.yaml"
    if not path.is_file():
        pytest.fail(f"{path} not found: the KubeRay v1.7.0 CRDs must sit in ../shared/schemas "
                    "relative to the repository root")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("storage"))
    return build_validation_schema(version["schema"]["openAPIV3Schema"])


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod an object makes, RayJob-embedded clusters included."""
    kind, spec = obj["kind"], obj.get("spec", {})
    found: list[tuple[str, dict[str, Any]]] = []
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        found.append((f"{kind} template", spec["template"]["spec"]))
    cluster = spec if kind == "RayCluster" else spec.get("rayClusterSpec")
    if kind in ("RayCluster", "RayJob") and cluster:
        found.append((f"{kind} head", cluster["headGroupSpec"]["template"]["spec"]))
        for group in cluster.get("workerGroupSpecs", []):
            found.append((f"{kind} worker group {group['groupName']}", group["template"]["spec"]))
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        found.append(("RayJob submitter", spec["submitterPodTemplate"]["spec"]))
    return found
