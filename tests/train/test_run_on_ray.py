"""Staged training on a local Ray cluster with real Ray Train workers and ring attention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_jobs.ray_setup import state_api_env
from ray_jobs.train.driver import main
from specs.checkpoint import checkpoint_dir, locate, read_state
from specs.ledger import COMMITTED, Ledger
from tests.support.faults import (
    CrashOnce,
    CrashOnceTimed,
    StaleWriteOnce,
    TakeOverOnce,
    crash_marker,
    worker_starts,
)
from tests.train.conftest import mini_spec, write_spec

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def _train(tmp: Path, before_step=None, **overrides) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    spec = write_spec(tmp / "run.yaml", mini_spec(tmp / "runs", **overrides))
    assert main(["--run", str(spec)], before_step=before_step) == 0
    return tmp / "runs" / "mini"


def _trajectory(run_dir: Path, stage: str) -> dict[int, tuple[float, list[str]]]:
    """step -> (loss, sample ids); a step run twice (after a restart) keeps its last record."""
    out = {}
    for line in (run_dir / "metrics" / f"{stage}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = (rec["loss"], rec["samples"])
    return out


@pytest.fixture(scope="module")
def baseline(ray_cluster, tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("baseline"), **{"storage.checkpoint_every": 2})


def test_stages_carry_weights_and_raise_theta(baseline):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from ray_jobs.train.model import weights_checksum
    from specs.loading import load_model
    from specs.run import RunSpec

    run = load_model(baseline.parent.parent / "run.yaml", RunSpec)
    ledger = Ledger(baseline)
    doc = ledger.read()
    assert [doc.stages[s].state for s in ("s64", "s128")] == ["done", "done"]
    first, second = ledger.latest_committed("s64"), ledger.latest_committed("s128")
    assert (first.name, second.name) == ("step-000006", "step-000004")
    # keep_last 2: the stage's oldest checkpoint was forgotten in the ledger, then deleted
    assert [c.step for c in doc.stages["s64"].checkpoints] == [4, 6]
    assert not (baseline / "checkpoints" / "s64" / "step-000002").exists()
    m1, m2 = LlamaForCausalLM.from_pretrained(first), LlamaForCausalLM.from_pretrained(second)
    assert m1.config.rope_parameters["rope_theta"] == pytest.approx(run.stage_theta(0))
    assert m2.config.rope_parameters["rope_theta"] == pytest.approx(run.stage_theta(1))
    assert run.stage_theta(1) > run.stage_theta(0)
    s2 = read_state(second)
    assert (s2.seq_len, s2.init_from) == (128, "checkpoints/s64/step-000006")
    assert s2.attention_kernel == "torch-cpu-flash (the CPU device)"
    assert s2.init_checksum == pytest.approx(weights_checksum(m1), rel=1e-12)
    # the step's phases (ray_jobs.train.loop.StepClock) add up to the training time measured
    assert set(s2.parts_seconds) == {"data", "forward + backward", "optimizer",
                                     "loss all-reduce"}
    assert all(v > 0 for v in s2.parts_seconds.values())
    assert sum(s2.parts_seconds.values()) == pytest.approx(s2.seconds, rel=1e-6)
    assert weights_checksum(m2) != pytest.approx(weights_checksum(m1), rel=1e-9)  # it trained on
    tok = PreTrainedTokenizerFast.from_pretrained(second)
    assert tok.decode(tok.encode("The pass key is 42")) == "The pass key is 42"
    plan = json.loads((baseline / "plan.json").read_text())
    assert [len(s["rings"][0]) for s in plan["stages"]] == [2, 2]


def test_worker_killed_mid_stage_matches_uninterrupted_run(baseline, tmp_path):
    run_dir = _train(tmp_path, CrashOnceTimed("s64", 3), **{"storage.checkpoint_every": 2})
    assert crash_marker(run_dir, "s64", 3).exists()  # the worker really died once
    # a new pair of worker processes took the stage on from step 2
    # (benchmarks/train.py splits recovery's seconds with these records)
    crashed = crash_marker(run_dir, "s64", 3).stat().st_mtime
    starts = worker_starts(run_dir, "s64")
    assert sorted((s["rank"], s["step"]) for s in starts) == [(0, 0), (0, 2), (1, 0), (1, 2)]
    starts = [s for s in starts if s["step"] == 2]
    # (Ray may hand an actor an idle worker process it started earlier: only the order of a
    # process's own two times and the restart after the death are certain)
    assert all(crashed < s["first_step"] and s["spawned"] < s["first_step"]
               for s in starts[2:]), starts
    for stage in ("s64", "s128"):
        got, want = _trajectory(run_dir, stage), _trajectory(baseline, stage)
        assert sorted(got) == sorted(want)
        for step in want:
            assert got[step][1] == want[step][1], f"{stage} step {step}: other samples"
            assert got[step][0] == pytest.approx(want[step][0], rel=1e-5), f"{stage} step {step}"
    losses = read_state(Ledger(run_dir).latest_committed("s64")).losses
    assert losses == pytest.approx(read_state(Ledger(baseline).latest_committed("s64")).losses,
                                   rel=1e-5)


def test_driver_killed_then_rerun_resumes_without_redoing_stages(ray_cluster, tmp_path):
    """A killed driver's workers may live on for a while; the rerun takes the next epoch, and
    from then on nothing of the old attempt is written (fencing, specs/ledger.py). Deterministic:
    a stale write is injected during the rerun and must be refused; the ordering of the records
    in the file proves no old-epoch line landed after the new attempt's first."""
    spec = write_spec(tmp_path / "run.yaml", mini_spec(
        tmp_path / "runs", **{"stages.1.steps": 40, "storage.checkpoint_every": 3}))
    run_dir = tmp_path / "runs" / "mini"
    ledger = Ledger(run_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO), **state_api_env()}
    driver = subprocess.Popen([sys.executable, "-m", "ray_jobs.train", "--run", str(spec),
                               "--address", ray_cluster], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while ledger.latest_committed("s128") is None:
            assert driver.poll() is None and time.time() < deadline, "driver ended early"
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    step = locate(ledger.latest_committed("s128")).step
    assert 0 < step < 40 and ledger.read().epoch == 1
    # a newer checkpoint left half-written (no COMMITTED marker) must be ignored
    torn = checkpoint_dir(run_dir, "s128", step + 1)
    torn.mkdir(parents=True, exist_ok=True)
    (torn / "config.json").write_text("{")
    assert not (torn / COMMITTED).exists()

    stale = StaleWriteOnce("s128", 39, epoch=1)  # during the rerun, as attempt 1's straggler
    assert main(["--run", str(spec), "--address", ray_cluster], before_step=stale) == 0

    doc = ledger.read()
    assert doc.epoch == 2
    assert (doc.stages["s64"].attempts, doc.stages["s128"].attempts) == (1, 2)
    assert doc.stages["s128"].state == "done"
    assert (run_dir / ".stale-write-1").read_text().startswith(
        "refused: driver attempt 1 was superseded by attempt 2")
    records = [json.loads(x) for x in (run_dir / "metrics" / "s128.jsonl").read_text().splitlines()]
    assert not any(r.get("stale") for r in records)
    first = next(i for i, r in enumerate(records) if r["epoch"] == 2)
    assert all(r["epoch"] == 2 for r in records[first:])  # no old-attempt line after the takeover
    (start,) = [s for s in doc.stages["s128"].starts if s.epoch == 2]
    assert start.step >= step  # the checkpoint seen at the kill, or one its stragglers committed
    assert records[first]["step"] == start.step + 1  # the rerun follows its checkpoint
    assert [r["step"] for r in records[first:]] == list(range(start.step + 1, 41))
    final = read_state(ledger.latest_committed("s128"))
    assert final.step == 40 and len(final.losses) == 40


def test_a_driver_overtaken_while_it_runs_stops_without_writing(ray_cluster, tmp_path, capsys):
    """Another driver takes the run after s64's second step: this one's workers stop at their
    next write (step 3's report and checkpoint) and the driver exits with code 3, one line,
    leaving the run to the newer attempt."""
    spec = write_spec(tmp_path / "run.yaml", mini_spec(tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "mini"
    assert main(["--run", str(spec), "--address", ray_cluster],
                before_step=TakeOverOnce("s64", 2)) == 3
    assert "stopped: driver attempt 1 was superseded by attempt 2" in capsys.readouterr().err
    doc = Ledger(run_dir).read()
    assert doc.epoch == 2 and doc.stages["s64"].state == "running"  # not marked done by attempt 1
    assert "s128" not in doc.stages
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics" / "s64.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 2]  # reported at step 2; step 3's report was refused
    assert doc.stages["s64"].checkpoints == []  # and so was its checkpoint (checkpoint_every 3)
    assert not (run_dir / "checkpoints").exists()


def test_two_rings_and_ulysses_train_like_one_ring(ray_cluster, tmp_path):
    """ring 2 x dp 2 (4 workers, DDP across the rings) and ulysses 2 x ring 2 (4 workers, one
    sequence) take the same steps as ring 2 x dp 1 on the same global batch. Passkey only:
    every sample scores 5 tokens, so the mean of the two replicas' mean losses equals the one
    ring's mean over both samples."""
    one_stage = {"stages": [{"name": "s64", "seq_len": 64, "steps": 4, "batch_size": 2, "lr": 3e-3,
                             "ring_degree": 2, "data_parallel_degree": 1}],
                 "data.mix": {"passkey": 1.0, "kv_retrieval": 0.0}}
    single = _train(tmp_path / "dp1", **one_stage)
    one_stage["stages"][0]["data_parallel_degree"] = 2
    double = _train(tmp_path / "dp2", **one_stage, **{"resources.workers": 4})
    got, want = _trajectory(double, "s64"), _trajectory(single, "s64")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert sorted(got[step][1]) == sorted(want[step][1]), f"step {step}: other samples"
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-4), f"step {step}"
    plan = json.loads((double / "plan.json").read_text())
    assert [len(r) for r in plan["stages"][0]["rings"]] == [2, 2]

    # Ulysses 2 x ring 2 on 4 workers: one sequence over all four, heads split in pairs.
    one_stage["stages"][0] |= {"data_parallel_degree": 1, "ulysses_degree": 2}
    hybrid = _train(tmp_path / "u2", **one_stage, **{"resources.workers": 4})
    got = _trajectory(hybrid, "s64")
    for step in want:
        assert sorted(got[step][1]) == sorted(want[step][1]), f"step {step}: other samples"
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-4), f"step {step}"
    plan = json.loads((hybrid / "plan.json").read_text())["stages"][0]
    assert (plan["ring_degree"], plan["ulysses_degree"], [len(r) for r in plan["rings"]]) == (
        2, 2, [4])
    state = read_state(Ledger(hybrid).latest_committed("s64"))
    assert (state.dims.ring, state.dims.ulysses) == (2, 2)


def test_every_sink_sees_each_step_once_across_a_worker_kill(ray_cluster, tmp_path, capsys):
    """All sinks on; the last worker dies before s64's step 6, after step 4's records were
    written and step 3's checkpoint committed: the restart replays steps 4-5, and each sink
    still holds every step once, on one axis over both stages (s128's steps are 7-10)."""
    import urllib.request

    import ray
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _train(tmp_path, CrashOnce("s64", 5), observability={
        "tensorboard": True, "mlflow": {"tracking_uri": "mlruns"},
        "wandb": {"project": "ringpilot-test"}, "prometheus": True})
    assert crash_marker(run_dir, "s64", 5).exists()
    assert "observability:" not in capsys.readouterr().err  # no sink failed
    recorded = [json.loads(line)["step"] for line in
                (run_dir / "metrics" / "s64.jsonl").read_text().splitlines()]
    assert recorded.count(4) == 2  # the replay really wrote step 4 twice

    # TensorBoard: one run per stage, every step's loss once, the values the workers recorded
    for stage, steps in (("s64", range(1, 7)), ("s128", range(7, 11))):
        acc = EventAccumulator(str(run_dir / "tensorboard" / stage))
        acc.Reload()
        got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
        want = _trajectory(run_dir, stage)
        offset = 0 if stage == "s64" else 6
        assert [s for s, _ in got] == list(steps)
        assert [v for _, v in got] == pytest.approx([want[s - offset][0] for s, _ in got],
                                                    rel=1e-6)
        assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "phase/forward_backward",
                "rank0/memory_peak_bytes", "rank1/kv_wait_s"} <= set(acc.Tags()["scalars"])

    # MLflow: a parent run, a nested run per stage, params, metrics and artifacts
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    exp = client.get_experiment_by_name("ringpilot")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"s64", "s128"} and len(runs) == 3
    assert parent.data.params["model.hidden_size"] == "32"
    assert children["s128"].data.params["seq_len"] == "128"
    assert float(children["s128"].data.params["rope_theta"]) > float(
        children["s64"].data.params["rope_theta"])
    assert children["s64"].data.params["layout"]
    history = client.get_metric_history(children["s64"].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert "plan.json" in {a.path for a in client.list_artifacts(children["s64"].info.run_id)}
    assert {children[s].info.status for s in children} == {"FINISHED"}

    # W&B offline: its files, made without an account
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))

    # Prometheus: Ray's exporter on this node serves ringpilot's gauges with run/stage/rank
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    wanted = ('ray_ringpilot_train_loss{', 'ray_ringpilot_train_kv_wait_seconds{')
    for _ in range(60):  # Ray's agent exports what processes recorded every few seconds
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        lines = [ln for ln in body.decode().splitlines() if 'run="mini"' in ln]
        if all(any(ln.startswith(w) and 'stage="s128"' in ln for ln in lines) for w in wanted):
            break
        time.sleep(1)
    loss = next(ln for ln in lines if ln.startswith(wanted[0]) and 'stage="s128"' in ln)
    assert 'rank="all"' in loss
    assert any(ln.startswith(wanted[1]) and 'rank="1"' in ln for ln in lines)
