"""The run summary says what each evaluation number is: which task, over which lengths."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

from rich.console import Console

from ray_jobs.checkpoint import STATE_DIR, TrainerState, checkpoint_dir
from ray_jobs.eval.results import CellResult, EvalResults
from ray_jobs.progress import render_summary
from specs.atomic import atomic_write
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
             for t in ("passkey", "niah_single") for n in (64, 128) for d in (0.0, 100.0)]
    results = EvalResults(checkpoint="c", tasks=["passkey", "niah_single"], lengths=[64, 128],
                          depths=[0.0, 100.0], samples=2, seed=0, max_length=4096,
                          started_unix=0.0, cells=cells, scores={"passkey": 0.17,
                                                                 "niah_single": 0.5})
    (run_dir / "evals").mkdir()
    atomic_write(run_dir / "evals" / "r.json", results.model_dump_json())
    ledger.record_eval("s128", "checkpoints/s128/step-000004", EvalEntry(
        status="done", scores=results.scores, results="evals/r.json"))
    out = io.StringIO()
    render_summary(run, run_dir, {}, Console(file=out, width=250))
    text = out.getvalue()
    assert "passkey 0.17 @64-128 tok; niah_single 0.50 @64-128 tok" in text
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
        (path / STATE_DIR / "state.json").write_text(json.dumps(asdict(state)))
        mark_committed(path)
        ledger.commit_checkpoint(stage, 1, path, final=True)
    out = io.StringIO()
    render_summary(run, run.run_dir, {}, Console(file=out, width=250))
    text = " ".join(out.getvalue().split())
    assert ("attention kernel: torch-cpu-flash (the CPU device); torch-cuda-flash (flash-attn "
            "not used: no module)") in text
