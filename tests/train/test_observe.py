"""The driver's metric feed without Ray: step axis, replayed steps, a sink that fails, the eval
metrics (the local-Ray run with every sink is in test_run_on_ray.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ray_jobs.train.observe import Observer, eval_metrics, step_metrics
from specs.ledger import EvalEntry
from specs.run import RunSpec
from tests.train.conftest import mini_spec


def _run(tmp: Path, **observability) -> RunSpec:
    return RunSpec.model_validate(mini_spec(tmp / "runs", observability=observability))


def _write(run_dir: Path, stage: str, steps, loss=lambda s: 1.0 / s) -> None:
    path = run_dir / "metrics" / f"{stage}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for s in steps:
            fh.write(json.dumps({"step": s, "loss": loss(s), "time": time.time(), "lr": 1e-3,
                                 "grad_norm": 0.5, "step_s": 0.25, "tokens": 128,
                                 "phases": {"data": 0.05, "forward + backward": 0.2},
                                 "memory_peak_bytes": [10, 20], "kv_wait_s": [0.01, 0.02],
                                 "samples": []}) + "\n")


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_steps_continue_one_axis_once_across_replays_and_drivers(tmp_path):
    run = _run(tmp_path)
    run_dir = tmp_path / "runs" / "mini"
    _write(run_dir, "s64", [1, 2, 3, 4])
    _write(run_dir, "s64", [3, 4, 5, 6], loss=lambda s: 9.0)  # a restart replays 3 and 4
    first = Observer(run, run_dir, interval=60).start()
    first.stop("failed")  # a driver killed here: the rerun must not send steps 1-6 again
    _write(run_dir, "s128", [1, 2])
    second = Observer(run, run_dir, interval=60).start()
    second.stop("done")
    s64 = _scalars(run_dir / "tensorboard" / "s64", "train/loss")
    assert s64 == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25), (5, 9.0), (6, 9.0)]
    assert [s for s, _ in _scalars(run_dir / "tensorboard" / "s128", "train/loss")] == [7, 8]
    assert [s for s, _ in _scalars(run_dir / "tensorboard" / "s64", "rank1/kv_wait_s")] == \
        [1, 2, 3, 4, 5, 6]


def test_an_unreachable_mlflow_server_costs_one_warning(tmp_path):
    from ray_jobs.ray_setup import free_port

    run = _run(tmp_path, mlflow={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    run_dir = tmp_path / "runs" / "mini"
    _write(run_dir, "s64", [1, 2])
    warnings: list[str] = []
    obs = Observer(run, run_dir, interval=0.05, warn=warnings.append).start()
    time.sleep(0.3)
    _write(run_dir, "s64", [3])
    obs.stop("done")
    assert len(warnings) == 1 and "mlflow sink failed" in warnings[0], warnings
    assert [s for s, _ in _scalars(run_dir / "tensorboard" / "s64", "train/loss")] == [1, 2, 3]


def test_step_and_eval_metrics(tmp_path):
    got = step_metrics({"loss": 2.0, "step_s": 0.5, "tokens": 100, "lr": 1e-3,
                        "phases": {"forward + backward": 0.4},
                        "memory_peak_bytes": [5, 7], "kv_wait_s": [0.1, 0.3]}, 0.25)
    assert got["train/tokens_per_s"] == 200 and got["train/step_time_ratio"] == 2.0
    assert got["phase/forward_backward"] == 0.4 and got["train/memory_peak_bytes"] == 7
    results = tmp_path / "results.json"
    rows = [{"length": n, "score": s} for n, s in ((1024, 90.0), (2048, 86.0), (4096, 60.0),
                                                    (8192, 88.0))]
    results.write_text(json.dumps({
        "checkpoint": "c", "tasks": ["niah_lite"], "lengths": [64], "depths": [0.0, 50.0],
        "samples": 1, "seed": 0, "max_length": 64, "started_unix": 0.0,
        "cells": [{"task": "niah_lite", "length": 64, "depth": d, "score": v, "samples": 1}
                  for d, v in ((0.0, 1.0), (50.0, 0.5))],
        "ruler": {"rows": rows}}))
    out = eval_metrics(EvalEntry(status="done", scores={"niah_lite": 0.75,
                                                        "ruler_effective_length": 2048.0},
                                 results="results.json"), tmp_path)
    assert out["eval/niah_lite"] == 0.75 and out["eval/niah_lite/len64"] == 0.75
    assert out["eval/niah_lite/len64/depth50"] == 0.5 and out["eval/ruler/len4096"] == 60.0
    # the evaluation's effective length is a length, kept apart from the 0..1 scores
    assert out["eval/effective_length"] == 2048 and "eval/ruler_effective_length" not in out


def test_sink_libraries_keep_off_the_console(tmp_path, capfd):
    """MLflow (a file store in the run directory) and W&B offline: files, and no line of theirs
    on the driver's console (make demo prints only ringpilot's lines)."""
    run = _run(tmp_path, mlflow={"tracking_uri": "mlruns"}, wandb={"project": "t"})
    run_dir = tmp_path / "runs" / "mini"
    _write(run_dir, "s64", [1, 2])
    warnings: list[str] = []
    obs = Observer(run, run_dir, interval=60, warn=warnings.append).start()
    obs.finish_stage("s64", "done")
    obs.stop("done")
    out, err = capfd.readouterr()
    assert warnings == [] and out == "" and err == "", (warnings, out, err)
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((run_dir / "mlruns").rglob("train/loss"))


def test_the_feed_thread_runs_at_the_lowest_priority():
    """The sinks' thread gives way to the workers sharing the cores; the driver's own thread
    keeps its priority (Linux: nice is per thread)."""
    import os
    import sys
    import threading

    from ray_jobs.train.observe import lower_this_thread_priority

    if not sys.platform.startswith("linux"):  # nice is per process there: left alone
        assert lower_this_thread_priority() is False
        return
    seen = {}

    def probe():
        seen["lowered"] = lower_this_thread_priority()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert seen == {"lowered": True, "nice": 19}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_mlflow_sends_a_polls_steps_in_one_batch(tmp_path, monkeypatch):
    """Steps wait in the sink until the poll's flush: one request per poll to a server; none is
    lost at a stage's end or at close."""
    from ray_jobs.train.observe import flatten
    from ray_jobs.train.sinks import MlflowSink
    from specs.run import MlflowSinkSpec

    run = _run(tmp_path)
    sink = MlflowSink(MlflowSinkSpec(tracking_uri="mlruns"), tmp_path, run,
                      flatten({"a": 1}), {})
    calls = []
    real = sink.client.log_batch

    def counting(run_id, **kw):
        if kw.get("metrics"):
            calls.append(len(kw["metrics"]))
        return real(run_id, **kw)

    monkeypatch.setattr(sink.client, "log_batch", counting)
    for step in (1, 2, 3):
        sink.log_step("s64", step, {"train/loss": 1.0 / step, "train/lr": 1e-3}, time.time())
    assert calls == []
    sink.flush()
    assert calls == [6]
    sink.log_step("s64", 4, {"train/loss": 0.25}, time.time())
    sink.end_stage("s64", "done", [])
    assert calls == [6, 1]
    history = sink.client.get_metric_history(sink.state["stages"]["s64"], "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5),
                                                           (3, pytest.approx(1 / 3)), (4, 0.25)]
    sink.close("done")
