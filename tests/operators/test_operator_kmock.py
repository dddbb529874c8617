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

from tests.manifests.conftest import kustomize
from tests.operators.authz import BOOTSTRAP_POLICY
from tests.operators.conftest import REPO, tiny_spec
from tests.operators.kmock_server import KMockThread
from tests.operators.operator_rbac import OPERATOR_CALLS, call_key, operator_identity

NS = "ringpilot"  # where manifests/ installs the operator, which serves its own namespace
TRAININGS = f"/apis/ringpilot.io/v1alpha1/namespaces/{NS}/stagedtrainings"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/ringpilot-operator"


# Long enough for a kopf operator process that starts on a loaded 2-core machine (8 s was not:
# a fresh-clone CI beside two benchmarks timed out once); the wait ends when `check` holds.
def wait_for(what: str, check: Callable[[], object], timeout: float = 60.0) -> object:
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
    """The emulated API, enforcing the RBAC that `kubectl apply -k manifests/` installs."""
    docs = kustomize("")
    ns, identity = operator_identity(docs)
    assert ns == NS, f"manifests/ installs the operator in {ns}; the e2e tests expect {NS}"
    with KMockThread(tmp_path, [*docs, *BOOTSTRAP_POLICY], identity, NS) as server:
        yield server


def start_operator(api: KMockThread, tmp_path: Path, identity: str | None) -> subprocess.Popen:
    """`kopf run` directly, or `python -m operators` (Lease first) when given an identity."""
    env = {**os.environ, "KUBECONFIG": str(api.kubeconfig()), "RINGPILOT_POLL_SECONDS": "0.5",
           "RINGPILOT_BACKOFF_SECONDS": "0.2", "RINGPILOT_LEASE_SECONDS": "3",
           "PYTHONPATH": str(REPO), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    log = open(tmp_path / "operator.log", "a")
    if identity is None:  # --verbose: the log is printed when a test fails
        cmd = ["-m", "kopf", "run", "--verbose", "--standalone", "--namespace", NS,
               "-m", "operators.handlers"]
    else:
        cmd = ["-m", "operators", "--namespace", NS, "--identity", identity]
    return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


class Operators:
    """The operator processes a test starts (`operator()` starts one), all as the manifests'
    ServiceAccount; `check_calls()` ends the test by judging everything they asked the API."""

    def __init__(self, api: KMockThread, tmp_path: Path, test: str):
        self.api, self.tmp_path, self.test = api, tmp_path, test
        self.procs: list[subprocess.Popen] = []

    def __call__(self, identity: str | None = None) -> subprocess.Popen:
        self.procs.append(start_operator(self.api, self.tmp_path, identity))
        return self.procs[-1]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def check_nothing_forbidden(self) -> None:
        forbidden = [str(d) for d in self.api.decisions(self.api.operator) if not d.allowed]
        assert not forbidden, "the operator's Role does not allow:\n" + "\n".join(forbidden)

    def check_calls(self) -> None:
        """Stop the operators (shutdown calls count too), then: the API forbade nothing they
        asked, they asked nothing OPERATOR_CALLS leaves out, and they made every call that
        OPERATOR_CALLS says this test makes."""
        self.stop()
        self.check_nothing_forbidden()
        decisions = self.api.decisions(self.api.operator)
        made = {call_key(d.attributes) for d in decisions if d.attributes.resource_request}
        assert made <= set(OPERATOR_CALLS), \
            f"calls missing from OPERATOR_CALLS: {sorted(made - set(OPERATOR_CALLS))}"
        due = {k for k, (_, test) in OPERATOR_CALLS.items() if test == self.test}
        assert due <= made, f"OPERATOR_CALLS says {self.test} makes {sorted(due - made)}"


@pytest.fixture
def operator(api: KMockThread, tmp_path: Path, request: pytest.FixtureRequest
             ) -> Iterator[Operators]:
    operators = Operators(api, tmp_path, request.node.name)
    yield operators
    operators.stop()
    log = tmp_path / "operator.log"
    if log.exists():
        sys.stdout.write(log.read_text()[-4000:])  # shown by pytest when a test fails
    for d in api.decisions(api.operator):
        if not d.allowed:
            sys.stdout.write(f"{d}\n")


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
    operator.check_calls()


def lease_writes(api: KMockThread) -> int:
    """How many times the operator tried to write over the Lease (whether allowed or not)."""
    return sum(1 for d in api.decisions(api.operator) if d.attributes.resource == "leases"
               and d.attributes.verb in ("update", "patch"))


def test_operator_restart_resumes_mid_stage(api, operator):
    first = operator("replica-a")
    create_training(api, retries=1)
    wait_for("the first stage's RayJob", lambda: "tiny-s256-a1" in jobs(api))
    wait_for("status Running", lambda: status(api).get("phase") == "Running")
    # RINGPILOT_LEASE_SECONDS=3: a renewal every second, which the Role must allow.
    wait_for("a renewal of the Lease", lambda: lease_writes(api) >= 1)
    operator.check_nothing_forbidden()
    first.send_signal(signal.SIGINT)
    first.wait(15)
    # While the operator is down the stage finishes; the new one must pick up from there.
    set_job_status(api, "tiny-s256-a1", "SUCCEEDED", "Complete")
    assert api.request("GET", LEASE)["spec"].get("holderIdentity") is None  # released
    operator("replica-b")
    wait_for("the second stage's RayJob after restart", lambda: "tiny-s1k-a1" in jobs(api))
    assert "tiny-s256-a2" not in jobs(api)
    wait_for("status at s1k", lambda: status(api).get("current_stage") == "s1k")
    assert api.request("GET", LEASE)["spec"]["holderIdentity"] == "replica-b"
    operator.check_calls()


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
    operator.check_calls()


def test_spec_edit_deletes_the_removed_stage_and_rewrites_the_run_file(api, operator):
    operator()
    create_training(api, retries=1)
    wait_for("the first stage's RayJob", lambda: "tiny-s256-a1" in jobs(api))
    wait_for("status Running at s256", lambda: status(api).get("current_stage") == "s256")
    # The edit drops the running stage; KMock bumps no generation, so the patch does.
    stages = tiny_spec()["stages"][1:]
    api.request("PATCH", f"{TRAININGS}/tiny",
                {"metadata": {"generation": 2}, "spec": {"stages": stages}},
                content_type="application/merge-patch+json")
    wait_for("the removed stage's RayJob deleted", lambda: "tiny-s256-a1" not in jobs(api))
    wait_for("the next stage's RayJob", lambda: "tiny-s1k-a1" in jobs(api))
    run_yaml = api.request("GET", f"/api/v1/namespaces/{NS}/configmaps/tiny-run")["data"]
    assert "s256" not in run_yaml["run.yaml"]
    reasons = {e["reason"] for e in api.list(f"/api/v1/namespaces/{NS}/events")}
    assert {"SpecChanged", "StageRemoved"} <= reasons
    operator.check_calls()


# A test-only hook, loaded by the operator process as sitecustomize: StagedTraining "stuck"
# plans until the file named by $RINGPILOT_TEST_RELEASE appears (the operator has no such hook).
HANGING_PLANNER = '''
import os, time
import operators.decide as decide
_real = decide.plan_reconcile
def plan_reconcile(st, *args, **kwargs):
    while st["metadata"]["name"] == "stuck" and not os.path.exists(
            os.environ["RINGPILOT_TEST_RELEASE"]):
        time.sleep(0.05)
    return _real(st, *args, **kwargs)
decide.plan_reconcile = plan_reconcile
'''


def liveness(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # not serving yet


def test_a_stuck_reconcile_blocks_no_other_and_fails_liveness(api, operator, tmp_path):
    import socket

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANGING_PLANNER)
    release = tmp_path / "release"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/healthz"
    env = {**os.environ, "KUBECONFIG": str(api.kubeconfig()), "RINGPILOT_POLL_SECONDS": "0.5",
           "RINGPILOT_BACKOFF_SECONDS": "0.2", "RINGPILOT_RECONCILE_DEADLINE_SECONDS": "1",
           "RINGPILOT_TEST_RELEASE": str(release), "PYTHONPATH": f"{hook}{os.pathsep}{REPO}",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    log = open(tmp_path / "operator.log", "a")
    operator.procs.append(subprocess.Popen(
        [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", NS, "--liveness", url,
         "-m", "operators.handlers"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    wait_for("the liveness endpoint healthy", lambda: liveness(url) == 200, timeout=60)
    for name, uid in (("stuck", "uid-stuck"), ("tiny", "uid-tiny")):
        api.request("POST", TRAININGS, {
            "apiVersion": "ringpilot.io/v1alpha1", "kind": "StagedTraining",
            "metadata": {"name": name, "namespace": NS, "uid": uid, "generation": 1},
            "spec": {**tiny_spec(), "name": name}})
        time.sleep(0.3)  # "stuck" is seen first
    # The other object is reconciled to its RayJob while "stuck" plans on.
    wait_for("tiny's first RayJob", lambda: "tiny-s256-a1" in jobs(api))
    stuck = f"{TRAININGS}/stuck"

    def deadline_condition():
        conds = (api.request("GET", stuck).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "Reconciled"), None)

    cond = wait_for("stuck's DeadlineExceeded condition", deadline_condition)
    assert (cond["status"], cond["reason"]) == ("False", "DeadlineExceeded")
    assert not any(j.startswith("stuck-") for j in jobs(api))
    # kopf caches probe results for 10 s: the stuck state shows within that.
    wait_for("liveness failing", lambda: liveness(url) == 500, timeout=60)
    release.touch()
    wait_for("stuck's RayJob once released", lambda: "stuck-s256-a1" in jobs(api), timeout=60)
    wait_for("liveness healthy again", lambda: liveness(url) == 200, timeout=60)
    wait_for("the condition back to True",
             lambda: (deadline_condition() or {}).get("status") == "True")
    operator.check_nothing_forbidden()
