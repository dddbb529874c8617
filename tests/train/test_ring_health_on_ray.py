"""Ring health on a real local-Ray run of two ranks in one ring: rank 0 posts every K/V send late
(a slow link out of it), and at step 7 rank 1 stops inside the step. The driver's watch must
name the slow hop within its window, name the stopped rank and its node, and the stage must fail
over as for a dead worker. One run (one stage: each trainer start costs seconds) serves both
tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_jobs.train.driver import main
from specs.ledger import Ledger
from tests.support.faults import DelaySends, Each, StopInStepOnce
from tests.train.conftest import mini_spec, write_spec

pytestmark = pytest.mark.ray
WINDOW, SLOW_STEPS = 4, 3
STOP = 6  # rank 1 stops inside the 7th step, after step 6's checkpoint


@pytest.fixture(scope="module")
def faulty_run(ray_cluster, tmp_path_factory) -> tuple[Path, str]:
    """(run directory, the driver's console) of the run with both faults."""
    import io
    from contextlib import redirect_stdout

    tmp = tmp_path_factory.mktemp("ring-health")
    spec = write_spec(tmp / "run.yaml", mini_spec(tmp / "runs", **{
        "stages": [{"name": "s64", "seq_len": 64, "steps": 9, "batch_size": 2, "lr": 3e-3,
                    "ring_degree": 2, "data_parallel_degree": 1}],
        "observability": {"tensorboard": False, "ring_health": {
            "window_steps": WINDOW, "slow_steps": SLOW_STEPS, "slow_factor": 3.0}},
        # above any step, checkpoint or start-up phase of this tiny run, however loaded the
        # machine; the stop is found within it plus a heartbeat and a look
        "failure.hang_timeout_s": 10.0,
    }))
    hooks = Each((DelaySends("s64", rank=0, seconds=0.1), StopInStepOnce("s64", STOP, rank=1)))
    console = io.StringIO()
    with redirect_stdout(console):
        assert main(["--run", str(spec), "--address", ray_cluster], before_step=hooks) == 0
    return tmp / "runs" / "mini", console.getvalue()


def test_a_slow_hop_is_named_within_its_window(faulty_run):
    run_dir, console = faulty_run
    findings = Ledger(run_dir).read().stages["s64"].findings
    [hop] = [f for f in findings if f.kind == "slow_hop"]
    assert (hop.sender, hop.rank) == (0, 1)  # the hop out of the late rank, not its reverse
    assert hop.step <= WINDOW  # slow from the first step: found within one window
    assert hop.gpu == f"{hop.node}/gpu1" and hop.links == []  # no cluster: no links to name
    assert "links unknown (no cluster description" in hop.message
    # the progress log's line, printed by the driver
    progress = [json.loads(x) for x in (run_dir / "progress" / "s64.jsonl").read_text()
                .splitlines()]
    assert [r["message"] for r in progress if r.get("health") == "slow_hop"] == [hop.message]
    assert "slow ring hop rank 0 -> rank 1" in console and "ring health" in console


def test_a_rank_stopped_inside_a_step_is_named_and_the_stage_fails_over(faulty_run):
    import ray

    run_dir, console = faulty_run
    doc = Ledger(run_dir).read()
    [hang] = [f for f in doc.stages["s64"].findings if f.kind == "hang"]
    assert (hang.kind, hang.rank, hang.step) == ("hang", 1, STOP + 1)
    assert hang.node == ray.get_runtime_context().get_node_id()  # one node: the test's
    assert hang.gpu == f"{hang.node}/gpu1" and hang.dump is None  # CPU: no flight recorder
    stopped_pid = (run_dir / f".stopped-s64-{STOP}").read_text()
    for part in (f"pid {stopped_pid}", "faults.py", "ranks 0 wait for it",
                 "ended its process", "Ray Train restarts the group"):
        assert part in hang.message, part
    # failed over as for a dead worker: restarted once, from step 6's checkpoint, to the end
    entry = doc.stages["s64"]
    assert entry.state == "done" and [s.step for s in entry.starts] == [0, STOP]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics" / "s64.jsonl").read_text()
             .splitlines()]
    assert sorted(set(steps)) == list(range(1, 10))
    assert "hang, no progress for" in console
