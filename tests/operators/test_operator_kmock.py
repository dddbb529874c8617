"""End to end: the real kopf operator process against the KMock API emulator on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.operators.conftest import REPO, tiny_spec
from tests.operators.kmock_server import KMockThread

NS = "ml"
TRAININGS = f"/apis/ringpilot.io/v1alpha1/namespaces/{NS}/stagedtrainings"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"


def wait_for(what: str, check: Callable[[], object], timeout: float = 8.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[KMockThread]:
    with KMockThread(tmp_path) as server:
        yield server


def start_operator(api: KMockThread, tmp_path: Path, identity: str | None) -> subprocess.Popen:
    """`kopf run` directly, or `python -m operators` (Lease first) when given an identity."""
    env = {**os.environ, "KUBECONFIG": str(api.kubeconfig()), "RINGPILOT_POLL_SECONDS": "0.5",
           "RINGPILOT_BACKOFF_SECONDS": "0.2", "PYTHONPATH": str(REPO),
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    log = open(tmp_path / "operator.log", "w")
    if identity is None:  # --verbose: the log is printed when a test fails
        cmd = ["-m", "kopf", "run", "--verbose", "--standalone", "--namespace", NS,
               "-m", "operators.handlers"]
    else:
        cmd = ["-m", "operators", "--namespace", NS, "--identity", identity]
    return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


@pytest.fixture
def operator(api: KMockThread, tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen]]:
    procs: list[subprocess.Popen] = []

    def start(identity: str | None = None) -> subprocess.Popen:
        procs.append(start_operator(api, tmp_path, identity))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    log = tmp_path / "operator.log"
    if log.exists():
        sys.stdout.write(log.read_text()[-4000:])  # shown by pytest when a test fails


def create_training(api: KMockThread, retries: int) -> None:
    spec = tiny_spec()
    spec["failure"]["stage_retries"] = retries
    api.request("POST", TRAININGS, {
        "apiVersion": "ringpilot.io/v1alpha1", "kind": "StagedTraining",
        # KMock stores what it is given: it assigns no uid or generation itself.
        "metadata": {"name": "tiny", "namespace": NS, "uid": "uid-tiny", "generation": 1},
        "spec": spec})


def jobs(api: KMockThread) -> dict[str, dict]:
    return {j["metadata"]["name"]: j for j in api.list(RAYJOBS)}


def set_job_status(api: KMockThread, name: str, job_status: str, deployment: str) -> None:
    api.request("PATCH", f"{RAYJOBS}/{name}/status",
                {"status": {"jobStatus": job_status, "jobDeploymentStatus": deployment}},
                content_type="application/merge-patch+json")


def status(api: KMockThread) -> dict:
    return api.request("GET", f"{TRAININGS}/tiny").get("status") or {}


def test_stages_advance_retry_and_give_up(api, operator, tmp_path):
    operator()
    create_training(api, retries=1)
    first = wait_for("the first stage's RayJob", lambda: jobs(api).get("tiny-s256-a1"))
    assert first["spec"]["entrypoint"] == "python -m ray_jobs.train --run run.yaml --stage s256"
    assert first["metadata"]["ownerReferences"][0]["uid"] == "uid-tiny"
    cm = api.request("GET", f"/api/v1/namespaces/{NS}/configmaps/tiny-run")
    assert "name: tiny" in cm["data"]["run.yaml"]
    wait_for("status Running at s256", lambda: status(api).get("current_stage") == "s256")

    set_job_status(api, "tiny-s256-a1", "SUCCEEDED", "Complete")
    wait_for("the second stage's RayJob", lambda: "tiny-s1k-a1" in jobs(api))
    wait_for("status at s1k", lambda: status(api).get("current_stage") == "s1k")

    set_job_status(api, "tiny-s1k-a1", "FAILED", "Failed")
    wait_for("a retry of s1k", lambda: "tiny-s1k-a2" in jobs(api))
    set_job_status(api, "tiny-s1k-a2", "FAILED", "Failed")
    final = wait_for("give-up status", lambda: (s := status(api)).get("phase") == "Failed" and s)
    s1k = next(s for s in final["stages"] if s["name"] == "s1k")
    assert s1k["state"] == "Failed" and s1k["attempts"] == 2
    assert "tiny-s1k-a3" not in jobs(api) and "tiny-s4k-a1" not in jobs(api)
    events = [e["reason"] for e in api.list(f"/api/v1/namespaces/{NS}/events")]
    # One event per transition: s256 and s1k started, s256 succeeded, s1k failed, retried, and
    # failed again with no retries left.
    assert sorted(events) == sorted(["StageStarted", "StageSucceeded", "StageStarted",
                                     "StageFailed", "StageRetried", "GaveUp"])
    # No cleanup needs the operator (owner references cascade), so it adds no finalizer.
    meta = api.request("GET", f"{TRAININGS}/tiny")["metadata"]
    assert not meta.get("finalizers")


def test_operator_restart_resumes_mid_stage(api, operator):
    first = operator("replica-a")
    create_training(api, retries=1)
    wait_for("the first stage's RayJob", lambda: "tiny-s256-a1" in jobs(api))
    wait_for("status Running", lambda: status(api).get("phase") == "Running")
    first.send_signal(signal.SIGINT)
    first.wait(15)
    # While the operator is down the stage finishes; the new one must pick up from there.
    set_job_status(api, "tiny-s256-a1", "SUCCEEDED", "Complete")
    lease = api.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/"
                        "ringpilot-operator")
    assert lease["spec"].get("holderIdentity") is None  # released on a clean stop
    operator("replica-b")
    wait_for("the second stage's RayJob after restart", lambda: "tiny-s1k-a1" in jobs(api))
    assert "tiny-s256-a2" not in jobs(api)
    wait_for("status at s1k", lambda: status(api).get("current_stage") == "s1k")
    lease = api.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/"
                        "ringpilot-operator")
    assert lease["spec"]["holderIdentity"] == "replica-b"
    lease = api.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/"
                        "ringpilot-operator")
    assert lease["spec"]["holderIdentity"] == "replica-b"


def test_lost_node_is_excluded_from_the_retry(api, operator):
    for name in ("n0", "n1", "n2"):
        api.request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    operator()
    create_training(api, retries=1)
    wait_for("the first stage's RayJob", lambda: "tiny-s256-a1" in jobs(api))
    wait_for("the nodes in status", lambda: any(
        s.get("nodes") == ["n0", "n1", "n2"] for s in status(api).get("stages", [])))
    api.request("PATCH", "/api/v1/nodes/n1", {"spec": {"unschedulable": True}},
                content_type="application/merge-patch+json")
    set_job_status(api, "tiny-s256-a1", "FAILED", "Failed")
    retry = wait_for("the retry", lambda: jobs(api).get("tiny-s256-a2"))
    worker = retry["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    terms = worker["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]} in \
        terms["nodeSelectorTerms"][0]["matchExpressions"]
    wait_for("n1 excluded in status", lambda: status(api).get("excluded_nodes") == ["n1"])
    reasons = {e["reason"] for e in api.list(f"/api/v1/namespaces/{NS}/events")}
    assert "Replanned" in reasons
