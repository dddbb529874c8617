"""The run summary says what each evaluation number is: which task, over which lengths."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from ray_jobs.eval.results import CellResult, EvalResults
from ray_jobs.train.progress import render_summary
from specs.atomic import atomic_write
from specs.checkpoint import STATE_DIR, TrainerState, checkpoint_dir, write_state
from specs.degrees import ParallelDims
from specs.ledger import EvalEntry, Ledger, mark_committed
from specs.run import RunSpec
from tests.train.conftest import mini_spec


def test_eval_column_names_task_score_and_lengths(tmp_path):
    run = RunSpec.model_validate(mini_spec(tmp_path / "runs"))
    run_dir = run.run_dir
    run_dir.mkdir(parents=True)
    ledger = Ledger(run_dir, run.name)
    ledger.start_stage("s128")
    cells = [CellResult(task=t, length=n, depth=d, score=0.5, samples=2)
             for t in ("passkey", "niah_single_lite") for n in (64, 128) for d in (0.0, 100.0)]
    results = EvalResults(checkpoint="c", tasks=["passkey", "niah_single_lite"], lengths=[64, 128],
                          depths=[0.0, 100.0], samples=2, seed=0, max_length=4096,
                          started_unix=0.0, cells=cells, scores={"passkey": 0.17,
                                                                 "niah_single_lite": 0.5})
    (run_dir / "evals").mkdir()
    atomic_write(run_dir / "evals" / "r.json", results.model_dump_json())
    ledger.record_eval("s128", "checkpoints/s128/step-000004", EvalEntry(
        status="done", scores=results.scores, results="evals/r.json"))
    out = io.StringIO()
    render_summary(run, run_dir, {}, Console(file=out, width=250))
    text = out.getvalue()
    assert "passkey 0.17 @64-128 tok; niah_single_lite 0.50 @64-128 tok" in text
    assert "mean score over the context lengths shown and 5 needle depths" in " ".join(
        text.split())


def test_summary_names_the_attention_kernel_the_stages_ran_on(tmp_path):
    run = RunSpec.model_validate(mini_spec(tmp_path / "runs"))
    ledger = Ledger(run.run_dir, run.name)
    for stage, kernel in (("s64", "torch-cpu-flash (the CPU device)"),
                          ("s128", "torch-cuda-flash (flash-attn not used: no module)")):
        path = checkpoint_dir(run.run_dir, stage, 1)
        (path / STATE_DIR).mkdir(parents=True)
        state = TrainerState(stage=stage, stage_index=0, step=1, attention_kernel=kernel)
        write_state(path, state)
        mark_committed(path)
        ledger.commit_checkpoint(stage, 1, path, final=True)
    out = io.StringIO()
    render_summary(run, run.run_dir, {}, Console(file=out, width=250))
    text = " ".join(out.getvalue().split())
    assert ("attention kernel: torch-cpu-flash (the CPU device); torch-cuda-flash (flash-attn "
            "not used: no module)") in text


LOCAL_CPU = Path(__file__).resolve().parents[2] / "configs" / "clusters" / "local-cpu.yaml"


def _local_profile(**changes) -> dict:
    """A calibrated profile document of configs/clusters/local-cpu.yaml (as measured there)."""
    m = {"value": 1.0, "spread": 0.1, "samples": 5}
    doc = {"kind": "ringpilot.io/calibrated-profile", "cluster": "local-cpu",
           "node_type": "cpu-2", "base_profile": "cpu", "measured_at": "2026-12-02T00:00:00Z",
           "dense_flops": {**m, "value": 5e10}, "attention_flops": {**m, "value": 5e10},
           "links": {"loopback": {"bandwidth_gb_s": {**m, "value": 1.6},
                                  "latency_us": {**m, "value": 300.0}}},
           "optimizer_params_per_s": {**m, "value": 1e7}}
    return {**doc, **changes}


def test_summary_puts_the_calibrated_prediction_beside_the_measured_step(tmp_path):
    import yaml

    from ray_jobs.train.calibrate import calibrated_plan

    run = RunSpec.model_validate(mini_spec(tmp_path / "runs"))
    out = tmp_path / "calibration" / "local-cpu.yaml"
    out.parent.mkdir()
    out.write_text(yaml.safe_dump(_local_profile()))
    plan, fresh = calibrated_plan(run, LOCAL_CPU, out)  # kept: nothing is measured again
    assert not fresh and plan.assumptions[0].startswith("calibrated profile: measured on")
    predicted = plan.stage("s64").prediction.step_seconds
    ledger = Ledger(run.run_dir, run.name)
    path = checkpoint_dir(run.run_dir, "s64", 6)
    (path / STATE_DIR).mkdir(parents=True)
    state = TrainerState(stage="s64", stage_index=0, step=6, seconds=6 * 2 * predicted,
                         dims=ParallelDims(ring=2))
    write_state(path, state)
    mark_committed(path)
    ledger.commit_checkpoint("s64", 6, path, final=True)
    text = io.StringIO()
    render_summary(run, run.run_dir, {}, Console(file=text, width=250), predicted=plan)
    out = text.getvalue()
    assert "step time: predicted on the calibrated profile against measured" in out
    timing = out.split("against measured")[1]
    row = next(line for line in timing.splitlines() if " s64 " in line)
    assert f"{predicted:.4f}" in row and f"{2 * predicted:.4f}" in row and "0.50x" in row
    assert "2 x 1" in row
    s128 = next(line for line in timing.splitlines() if " s128 " in line)
    assert s128.count(" - ") >= 2  # not trained yet: nothing measured, no ratio


def test_a_profile_of_another_cluster_is_measured_again(tmp_path, monkeypatch):
    """A kept profile that is not this cluster's is not used: the cluster is calibrated anew
    and the new profile replaces it; a measurement that does not fit writes nothing."""
    import yaml

    import ray_jobs.train.calibrate as calibrate_mod
    from topology.calibration import CalibrationError

    run = RunSpec.model_validate(mini_spec(tmp_path / "runs"))
    out = tmp_path / "local-cpu.yaml"
    out.write_text(yaml.safe_dump(_local_profile(cluster="elsewhere")))
    calls = []
    monkeypatch.setattr(calibrate_mod, "calibrate",
                        lambda *a, **k: calls.append(a) or _local_profile())
    plan, fresh = calibrate_mod.calibrated_plan(run, LOCAL_CPU, out)
    assert fresh and len(calls) == 1 and yaml.safe_load(out.read_text())["cluster"] == "local-cpu"
    assert all(s.prediction.step_seconds > 0 for s in plan.stages)
    # a run's first calibration: RUN_DIR/calibration/ does not exist yet
    first = tmp_path / "runs" / "mini" / "calibration" / "local-cpu.yaml"
    assert calibrate_mod.calibrated_plan(run, LOCAL_CPU, first)[1] and first.is_file()
    too_fast = {"bandwidth_gb_s": {"value": 1.6, "spread": 0, "samples": 1}}
    monkeypatch.setattr(calibrate_mod, "calibrate",
                        lambda *a, **k: _local_profile(links={"nvlink": too_fast}))
    fresh_out = tmp_path / "new.yaml"
    with pytest.raises(CalibrationError, match="not link types of cluster 'local-cpu'"):
        calibrate_mod.calibrated_plan(run, LOCAL_CPU, fresh_out)
    assert not fresh_out.exists()


@pytest.mark.parametrize("width", [80, 200])
def test_every_table_of_the_summary_keeps_its_headers_at_terminal_width(tmp_path, width):
    """The summary, the RULER table and the predicted-against-measured table, printed at the
    width of an 80- and a 200-column terminal: each header cell whole on a header line, no line
    wider than the terminal."""
    import yaml

    from ray_jobs.train.calibrate import calibrated_plan
    from ray_jobs.train.progress import RULER_COLUMNS
    from ray_jobs.train.sheet import Sheet, header_lines

    run = RunSpec.model_validate(mini_spec(tmp_path / "runs"))
    out = tmp_path / "calibration" / "local-cpu.yaml"
    out.parent.mkdir()
    out.write_text(yaml.safe_dump(_local_profile()))
    plan, _ = calibrated_plan(run, LOCAL_CPU, out)
    ledger = Ledger(run.run_dir, run.name)
    path = checkpoint_dir(run.run_dir, "s64", 6)
    (path / STATE_DIR).mkdir(parents=True)
    write_state(path, TrainerState(stage="s64", stage_index=0, step=6, seconds=3.0,
                                   losses=[2.5], dims=ParallelDims(ring=2)))
    mark_committed(path)
    ledger.commit_checkpoint("s64", 6, path, final=True)
    console = Console(file=io.StringIO(), width=width, color_system=None)
    render_summary(run, run.run_dir, {"s64": 12.0}, console, predicted=plan)
    text = console.file.getvalue()
    headers = " ".join(header_lines(text))
    for cell in ("stage", "state", "seq_len", "rope", "steps", "tokens", "train time",
                 "this driver", "final loss", "checkpoints", "eval", "layout",
                 "predicted s/step", "measured s/step", "predicted / measured"):
        assert f" {cell} " in headers, (cell, text)
    assert "predicted on the calibrated profile against measured" in text
    assert max(len(line) for line in text.splitlines()) <= width

    # The RULER table's own columns, with a row as long as the demo's.
    wide = Sheet("RULER", [(c, "left") for c in RULER_COLUMNS])
    wide.add_row("s4k", "step-000012", "4,096", "0.0", "+/- 0.0", "12",
                 "niah_single_1, niah_single_2, niah_single_3, niah_multikey_1", "-",
                 "partial: 4 of 13 tasks, no effective length")
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(wide)
    headers = " ".join(header_lines(console.file.getvalue()))
    assert all(f" {cell} " in headers for cell in RULER_COLUMNS), console.file.getvalue()


def test_summary_names_each_stages_attention_over_packed_documents(tmp_path):
    """As the stage trained (its checkpoint's state), else as the RunSpec sets it; nothing
    when every stage is causal."""
    spec = mini_spec(tmp_path / "runs", **{"stages.1.attention": "document",
                                           "stages.1.position_ids": "per_document"})
    run = RunSpec.model_validate(spec)
    out = io.StringIO()
    render_summary(run, run.run_dir, {}, Console(file=out, width=250))
    assert ("attention over packed documents: s64 causal; s128 document, positions per "
            "document") in " ".join(out.getvalue().split())
    ledger = Ledger(run.run_dir, run.name)
    path = checkpoint_dir(run.run_dir, "s64", 1)
    (path / STATE_DIR).mkdir(parents=True)
    write_state(path, TrainerState(stage="s64", stage_index=0, step=1, attention="document"))
    mark_committed(path)
    ledger.commit_checkpoint("s64", 1, path, final=True)
    out = io.StringIO()
    render_summary(run, run.run_dir, {}, Console(file=out, width=250))
    assert "attention over packed documents: s64 document; s128 document" in " ".join(
        out.getvalue().split())
    out = io.StringIO()
    render_summary(RunSpec.model_validate(mini_spec(tmp_path / "other")), tmp_path / "other",
                   {}, Console(file=out, width=250))
    assert "packed documents" not in out.getvalue()
