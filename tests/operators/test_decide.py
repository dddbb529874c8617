"""Table-driven tests of the operator's decisions over observed states."""

from __future__ import annotations

import datetime as dt

import pytest

from operators.decide import (
    ApplyConfigMap,
    CreateObject,
    DeleteRayJob,
    Requeue,
    Settings,
    plan_backoff,
    plan_reconcile,
)
from specs.ledger import CheckpointEntry, EvalEntry, HealthFinding, LedgerDoc, StageEntry
from tests.operators.conftest import T0, make_job, make_node, make_training

FAST = Settings(backoff_seconds=30, backoff_cap_seconds=600, poll_seconds=5)
NODES = [make_node(f"n{i}") for i in range(3)]


def stage_status(name, state="Pending", job=None, attempts=0, nodes=(), finished=None):
    return {"name": name, "state": state, "ray_job": job, "attempts": attempts,
            "nodes": list(nodes), "finished_at": finished}


def running_status(first_state="Running", job="tiny-s256-a1", attempts=1, finished=None,
                   nodes=("n0", "n1"), generation=1):
    return {"phase": "Running", "current_stage": "s256", "observedGeneration": generation,
            "stages": [stage_status("s256", first_state, job, attempts, nodes, finished),
                       stage_status("s1k"), stage_status("s4k")]}


def reasons(decision):
    return [e.reason for e in decision.events()]


def created(decision):
    return [a.body["metadata"]["name"] for a in decision.of(CreateObject)]


def dumped(decision):
    """The decided status as the API object holds it (what the next pass reads back)."""
    return decision.status.model_dump(mode="json")


def stage(decision, name):
    return next(s for s in decision.status.stages if s.name == name)


def test_fresh_object_creates_first_stage_rayjob_and_configmap():
    d = plan_reconcile(make_training(), [], NODES, T0, settings=FAST)
    assert created(d) == ["tiny-s256-a1"]
    assert d.status.phase == "Running" and d.status.current_stage == "s256"
    first = stage(d, "s256")
    assert (first.state, first.attempts, first.ray_job, first.nodes) == (
        "Running", 1, "tiny-s256-a1", ["n0", "n1", "n2"])
    cm = d.of(ApplyConfigMap)[0].body
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert "name: tiny" in cm["data"]["run.yaml"]
    assert reasons(d) == ["StageStarted"]
    job = d.of(CreateObject)[0].body
    assert job["spec"]["entrypoint"].endswith("--stage s256")
    assert job["metadata"]["ownerReferences"][0]["kind"] == "StagedTraining"


# (jobs observed, expected created RayJobs, expected state of s256, expected events, phase)
TABLE = [
    pytest.param([make_job("tiny-s256-a1")], [], "Running", [], "Running", id="still-running"),
    pytest.param([make_job("tiny-s256-a1", "SUCCEEDED", "Complete")], ["tiny-s1k-a1"],
                 "Succeeded", ["StageSucceeded", "StageStarted"], "Running", id="stage-succeeded"),
    pytest.param([make_job("tiny-s256-a1", "FAILED", "Failed")], [], "BackingOff",
                 ["StageFailed"], "Running", id="failed-with-retries-left"),
    pytest.param([make_job("tiny-s256-a1", "PENDING", "Failed")], [], "BackingOff",
                 ["StageFailed"], "Running", id="deployment-failed"),
    pytest.param([], ["tiny-s256-a1"], "Running", ["RayJobRecreated"], "Running",
                 id="operator-restarted-before-create-landed"),
]


@pytest.mark.parametrize("jobs, new_jobs, state, events, phase", TABLE)
def test_running_stage_table(jobs, new_jobs, state, events, phase):
    st = make_training(status=running_status())
    d = plan_reconcile(st, jobs, NODES, T0, settings=FAST)
    assert created(d) == new_jobs
    assert stage(d, "s256").state == state
    assert reasons(d) == events
    assert d.status.phase == phase


def test_retry_waits_for_backoff_then_creates_next_attempt():
    st = make_training(status=running_status("BackingOff", finished="2026-11-25T12:00:00Z"))
    early = plan_reconcile(st, [], NODES, T0 + dt.timedelta(seconds=10), settings=FAST)
    assert created(early) == []
    assert 20 in [a.after for a in early.of(Requeue)]
    late = plan_reconcile(st, [], NODES, T0 + dt.timedelta(seconds=31), settings=FAST)
    assert created(late) == ["tiny-s256-a2"]
    assert stage(late, "s256").attempts == 2 and reasons(late) == ["StageRetried"]


def test_backoff_doubles_and_is_capped():
    assert [plan_backoff(a, FAST) for a in (1, 2, 3, 6)] == [30, 60, 120, 600]


def test_failure_with_no_retries_left_gives_up():
    # tiny.yaml keeps the default stage_retries 2: the third failed attempt is the last.
    st = make_training(status=running_status(job="tiny-s256-a3", attempts=3))
    d = plan_reconcile(st, [make_job("tiny-s256-a3", "FAILED", "Failed")], NODES, T0,
                       settings=FAST)
    assert created(d) == [] and reasons(d) == ["GaveUp"]
    assert d.status.phase == "Failed" and stage(d, "s256").state == "Failed"
    complete = next(c for c in d.status.conditions if c.type == "Complete")
    assert complete.reason == "GaveUp"
    # Once given up, nothing more happens for the same generation.
    again = plan_reconcile({**st, "status": dumped(d)}, [], NODES, T0, settings=FAST)
    assert created(again) == [] and again.of(Requeue) == [] and again.status.phase == "Failed"


def test_zero_retries_gives_up_on_first_failure():
    st = make_training(status=running_status(), failure={"stage_retries": 0})
    d = plan_reconcile(st, [make_job("tiny-s256-a1", "FAILED", "Failed")], NODES, T0,
                       settings=FAST)
    assert d.status.phase == "Failed" and reasons(d) == ["GaveUp"]


@pytest.mark.parametrize("lost_node", [make_node("n1", ready=False), make_node("n1", cordoned=True),
                                       None], ids=["not-ready", "cordoned", "deleted"])
def test_lost_node_is_excluded_before_the_retry(lost_node):
    nodes = [make_node("n0"), make_node("n2")] + ([lost_node] if lost_node else [])
    st = make_training(status=running_status("BackingOff", finished="2026-11-25T12:00:00Z"))
    d = plan_reconcile(st, [], nodes, T0 + dt.timedelta(seconds=31), settings=FAST)
    assert reasons(d) == ["Replanned", "StageRetried"]
    assert d.status.excluded_nodes == ["n1"]
    job = d.of(CreateObject)[0].body
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    exprs = worker["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]} in exprs
    assert stage(d, "s256").nodes == ["n0", "n2"]


def gpu_training(ring, dp, status):
    """tiny on 16 GPUs = two 8-GPU worker pods, one per node."""
    st = make_training(status=status, resources={"device": "gpu", "workers": 16})
    for stage in st["spec"]["stages"]:
        stage.update(ring_degree=ring, data_parallel_degree=dp, batch_size=2)
    return st


def test_cpu_workers_share_nodes_so_one_node_left_still_runs():
    nodes = [make_node("n0"), make_node("n1", ready=False)]
    st = make_training(status=running_status("BackingOff", finished="2026-11-25T12:00:00Z"))
    d = plan_reconcile(st, [], nodes, T0 + dt.timedelta(seconds=31), settings=FAST)
    assert created(d) == ["tiny-s256-a2"]


def test_fixed_degrees_that_no_longer_fit_wait_for_nodes():
    nodes = [make_node("n0"), make_node("n1", ready=False)]
    st = gpu_training(8, 2, running_status("BackingOff", finished="2026-11-25T12:00:00Z"))
    d = plan_reconcile(st, [], nodes, T0 + dt.timedelta(seconds=31), settings=FAST)
    assert created(d) == [] and reasons(d) == ["Replanned", "InsufficientNodes"]
    [event] = [e for e in d.events() if e.reason == "InsufficientNodes"]
    assert "1 usable nodes x 8 GPUs" in event.message
    assert "= 16 workers, but Ray offers 8" in event.message
    assert stage(d, "s256").state == "BackingOff" and d.status.phase == "Running"


def test_auto_degrees_shrink_onto_the_remaining_nodes():
    nodes = [make_node("n0"), make_node("n1", ready=False)]
    st = gpu_training("auto", "auto", running_status("BackingOff",
                                                      finished="2026-11-25T12:00:00Z"))
    d = plan_reconcile(st, [], nodes, T0 + dt.timedelta(seconds=31), settings=FAST)
    assert created(d) == ["tiny-s256-a2"] and reasons(d) == ["Replanned", "Shrunk", "StageRetried"]
    job = d.of(CreateObject)[0].body
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1
    assert "workers: 8" in d.of(ApplyConfigMap)[0].body["data"]["run.yaml"]
    assert stage(d, "s256").workers == 8
    # Once the stage succeeds, the next one is planned at full size again.
    status = dumped(d)
    done = plan_reconcile(gpu_training("auto", "auto", status),
                          [make_job("tiny-s256-a2", "SUCCEEDED", "Complete")],
                          nodes + [make_node("n2")], T0 + dt.timedelta(seconds=60),
                          settings=FAST)
    assert created(done) == ["tiny-s1k-a1"]
    assert "workers: 16" in done.of(ApplyConfigMap)[0].body["data"]["run.yaml"]


def test_spec_edited_mid_run_keeps_done_stages_and_deletes_removed_running_stage():
    status = running_status(generation=1)
    status["stages"][0].update(state="Succeeded")
    status["stages"][1].update(state="Running", ray_job="tiny-s1k-a1", attempts=1)
    st = make_training(generation=2, status=status)
    st["spec"]["stages"] = [st["spec"]["stages"][0], st["spec"]["stages"][2]]  # drop s1k
    d = plan_reconcile(st, [make_job("tiny-s1k-a1")], NODES, T0, settings=FAST)
    assert DeleteRayJob("tiny-s1k-a1") in d.actions
    assert created(d) == ["tiny-s4k-a1"]
    assert [s.name for s in d.status.stages] == ["s256", "s4k"]
    assert reasons(d)[:2] == ["SpecChanged", "StageRemoved"]
    assert d.status.observedGeneration == 2


def test_spec_fixed_after_giving_up_restarts_the_failed_stage():
    status = running_status(first_state="Failed", job="tiny-s256-a3", attempts=3)
    status["phase"] = "Failed"
    st = make_training(generation=2, status=status)
    d = plan_reconcile(st, [make_job("tiny-s256-a3", "FAILED", "Failed")], NODES, T0,
                       settings=FAST)
    assert created(d) == ["tiny-s256-a1"] and d.status.phase == "Running"


def test_invalid_spec_fails_with_the_field_named():
    st = make_training(stages=[{"name": "s1", "seq_len": 100, "steps": 1, "lr": 0.1,
                                "ring_degree": 3, "data_parallel_degree": 1}])
    d = plan_reconcile(st, [], NODES, T0, settings=FAST)
    assert d.status.phase == "Failed" and created(d) == []
    [event] = d.events()
    assert event.reason == "InvalidSpec"
    assert "spec.stages[0]" in event.message and "zigzag" in event.message


def test_all_stages_done_completes_once():
    status = running_status()
    for s in status["stages"]:
        s.update(state="Succeeded")
    d = plan_reconcile(make_training(status=status), [], NODES, T0, settings=FAST)
    assert d.status.phase == "Succeeded" and reasons(d) == ["Completed"]
    again = plan_reconcile(make_training(status=dumped(d)), [], NODES, T0, settings=FAST)
    assert reasons(again) == [] and again.of(Requeue) == []


def test_ledger_fills_checkpoint_and_scores():
    ledger = LedgerDoc(run="tiny", stages={"s256": StageEntry(
        state="running",
        checkpoints=[CheckpointEntry(step=25, path="checkpoints/s256/step-000025",
                                     committed_at="2026-11-25T12:00:00Z")],
        eval={"checkpoints/s256/step-000025": EvalEntry(status="done",
                                                        scores={"niah_lite": 0.5,
                                                                "vt_lite": 1.0})})})
    d = plan_reconcile(make_training(status=running_status()), [make_job("tiny-s256-a1")], NODES,
                       T0, ledger=ledger, settings=FAST)
    assert stage(d, "s256").last_checkpoint == "checkpoints/s256/step-000025"
    assert stage(d, "s256").scores == {"niah_lite": 0.5, "vt_lite": 1.0}
    assert d.status.last_score == pytest.approx(0.75)


def test_no_node_information_still_runs():
    # Without Node read access (or on an empty node list) the operator does not block.
    d = plan_reconcile(make_training(), [], [], T0, settings=FAST)
    assert created(d) == ["tiny-s256-a1"]


def config_map_training(**kw):
    return make_training(topology={"source": "config-map", "config_map": "fabric"}, **kw)


def test_topology_config_map_is_copied_beside_the_run_file(repo):
    cluster = (repo / "configs" / "clusters" / "l40s-2node-leaf.yaml").read_text()
    d = plan_reconcile(config_map_training(), [], NODES, T0, settings=FAST, cluster_yaml=cluster)
    data = d.of(ApplyConfigMap)[0].body["data"]
    assert data["cluster.yaml"] == cluster
    assert "cluster: cluster.yaml" in data["run.yaml"]
    assert created(d) == ["tiny-s256-a1"]


@pytest.mark.parametrize("cluster_yaml, problem", [
    (None, "ConfigMap fabric (key cluster.yaml) not found"),
    ("name: x\nnode_types: {}\nnodez: []\n", "ConfigMap fabric: nodez: unknown field"),
])
def test_unusable_topology_config_map_waits_with_a_warning(cluster_yaml, problem):
    d = plan_reconcile(config_map_training(), [], NODES, T0, settings=FAST,
                       cluster_yaml=cluster_yaml)
    assert created(d) == [] and d.of(ApplyConfigMap) == []
    [event] = d.events()
    assert event.reason == "ClusterSpecUnusable" and problem in event.message
    topo = next(c for c in d.status.conditions if c.type == "TopologyReady")
    assert topo.status == "False"
    # The same problem is not announced again on the next pass.
    again = plan_reconcile(config_map_training(status=dumped(d)), [], NODES, T0, settings=FAST,
                           cluster_yaml=cluster_yaml)
    assert again.events() == []


def finding(seq: int, kind: str = "slow_hop", step: int = 40) -> HealthFinding:
    return HealthFinding(seq=seq, kind=kind, step=step, at="2026-12-07T03:00:00+00:00", rank=3,
                         node="n1", gpu="n1/gpu3", sender=2 if kind == "slow_hop" else None,
                         message=f"{kind} finding {seq}")


def test_ring_health_findings_become_one_event_each_and_a_condition():
    """The driver's ring-health findings in the ledger: each is announced once as a Warning
    Event, the stage shows the newest, RingHealthy turns False with its kind as reason."""
    ledger = LedgerDoc(run="tiny", stages={"s256": StageEntry(state="running",
                                                                findings=[finding(1)])})
    job = [make_job("tiny-s256-a1")]
    d = plan_reconcile(make_training(status=running_status()), job, NODES, T0, ledger=ledger,
                       settings=FAST)
    [event] = d.events()
    assert (event.type, event.reason) == ("Warning", "SlowRingHop")
    assert event.message == "stage s256 step 40: slow_hop finding 1"
    assert (stage(d, "s256").health, stage(d, "s256").health_seen) == ("slow_hop finding 1", 1)
    healthy = next(c for c in d.status.conditions if c.type == "RingHealthy")
    assert (healthy.status, healthy.reason) == ("False", "SlowRingHop")

    again = plan_reconcile(make_training(status=dumped(d)), job, NODES, T0, ledger=ledger,
                           settings=FAST)
    assert again.events() == []  # announced already

    ledger.stages["s256"].findings.append(finding(2, "hang", 55))
    later = plan_reconcile(make_training(status=dumped(again)), job, NODES, T0, ledger=ledger,
                           settings=FAST)
    assert [(e.reason, e.message) for e in later.events()] == [
        ("RankStopped", "stage s256 step 55: hang finding 2")]
    healthy = next(c for c in later.status.conditions if c.type == "RingHealthy")
    assert (healthy.status, healthy.reason) == ("False", "RankStopped")


def test_a_stage_without_findings_is_ring_healthy():
    ledger = LedgerDoc(run="tiny", stages={"s256": StageEntry(state="running")})
    d = plan_reconcile(make_training(status=running_status()), [make_job("tiny-s256-a1")], NODES,
                       T0, ledger=ledger, settings=FAST)
    healthy = next(c for c in d.status.conditions if c.type == "RingHealthy")
    assert (healthy.status, healthy.reason) == ("True", "NoFindings") and d.events() == []
