"""RULER through lm-eval inside the evaluation actors: on each stage's final checkpoint, per
length, into results.json, tables.md, the ledger's scores and the run report; and Kamradt's
needle-in-a-haystack test on the run's haystack files, beside it."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from ray_jobs.eval.report import render_run_report
from ray_jobs.eval.results import load_results
from ray_jobs.eval.scheduler import EvalScheduler
from ray_jobs.train.progress import ruler_table
from specs.checkpoint import checkpoint_dir
from specs.ledger import Ledger
from tests.eval.test_scheduler import tiny_run
from tests.support import eval_fixtures as fixtures

pytestmark = pytest.mark.ray

# What must not reach the job's console from an evaluation actor: tqdm's bars, terminal escape
# sequences, and the libraries' log lines (lm-eval's, datasets', transformers') and advice
LIBRARY_NOISE = re.compile(r"\d+%\||it/s\]|\x1b\[|Generating synthetic samples|Custom kwargs|"
                           r"\[(?:task|evaluator|utils|registry|huggingface)\.py:\d+\]|"
                           r"^(?:INFO|WARNING|DEBUG) +\[|fatal: not a git repository", re.M)


def worker_output() -> dict[Path, int]:
    """Every Ray worker's stdout and stderr file in this session (what log_to_driver forwards
    to the driver's console) and its size now."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return {p: p.stat().st_size for p in logs.glob("worker-*") if p.suffix in (".out", ".err")}


def written_since(sizes: dict[Path, int]) -> str:
    """What the session's workers wrote to their stdout and stderr since `sizes`."""
    text = []
    for path, size in worker_output().items():
        with path.open("rb") as f:
            f.seek(sizes.get(path, 0))
            text.append(f.read().decode("utf-8", "replace"))
    return "".join(text)


def test_final_checkpoints_get_ruler_per_length_and_downloads_are_listed(ray_cluster, tmp_path):
    import random

    from ray_jobs.eval import tasks as task_lib

    tokenizer = fixtures.ruler_tokenizer()
    rng = random.Random(0)
    (tmp_path / "essays").mkdir()
    (tmp_path / "essays" / "one.txt").write_text(
        " ".join(task_lib.filler_sentence(rng) for _ in range(300)))
    run = tiny_run(tmp_path, context_lengths=[512, 1024],
                   max_tokens_per_evaluator=1024,
                   ruler=dict(tasks=["niah_single_1", "ruler_vt", "niah_single_2"], samples=2),
                   kamradt=dict(haystack=["essays/*.txt"], depth_intervals=2))
    run_dir = tmp_path / run.name
    ledger = Ledger(run_dir, run.name)
    model = fixtures.build_tiny_model(len(tokenizer), 1024)
    for step, final in ((2, False), (4, True)):
        path = fixtures.save_checkpoint(model, tokenizer, checkpoint_dir(run_dir, "s192", step))
        ledger.commit_checkpoint("s192", step, path, final=final)
    before = worker_output()
    scheduler = EvalScheduler(run, run_dir, spec_dir=tmp_path).start()
    scheduler.stop(wait=True, timeout=600)
    evals = ledger.read().stages["s192"].eval
    middle, final = (evals[f"checkpoints/s192/step-{s:06d}"] for s in (2, 4))
    assert (middle.status, final.status) == ("done", "done"), (middle.error, final.error)
    # lm-eval ran RULER in the actor: its output is in the run's log file, not on the console
    console = written_since(before)
    assert not LIBRARY_NOISE.search(console), LIBRARY_NOISE.search(console).group(0) + console
    library = (run_dir / "logs" / "evaluation.log").read_text()
    assert "Custom kwargs can be passed" in library  # lm-eval's advice, kept for the curious
    assert load_results(run_dir / middle.results).ruler is None  # final_only
    res = load_results(run_dir / final.results)
    # Kamradt's test ran too, on its own depth grid, on the haystack resolved beside the run file
    assert [(c.length, c.depth) for c in res.cells if c.task == "niah_kamradt"] == [
        (512, 0.0), (512, 100.0), (1024, 0.0), (1024, 100.0)]
    assert res.kamradt["haystack_files"] == [str(tmp_path / "essays" / "one.txt")]
    ruler = res.ruler
    # RULER from its minimum length (1024) only; one row per length, as RULER publishes
    assert ruler["lengths"] == [1024] and [r["length"] for r in ruler["rows"]] == [1024]
    row = ruler["rows"][0]
    assert sorted(row["tasks"]) == ["niah_single_1", "ruler_vt"]
    assert row["samples"] == 2 * 2  # two tasks x two samples
    assert row["score"] == pytest.approx(sum(row["tasks"].values()) / 2)
    # two of 13 tasks: the average is labelled partial, and no effective length is claimed
    assert final.scores["ruler_partial@1024"] == pytest.approx(row["score"] / 100)
    assert "ruler@1024" not in final.scores and "ruler_effective_length" not in final.scores
    assert ruler["complete"] is False and ruler["label"].startswith("partial: 2 of 13")
    # the essay-haystack task needs the hub: listed with the reason, not averaged in
    assert "Paul Graham" in ruler["unavailable"]["niah_single_2"]
    out = run_dir / final.results
    assert (out.parent / ruler["results_path"]).is_file()  # lm-eval's own results, beside ours
    tables = (out.parent / "tables.md").read_text()
    assert "## RULER (lm-eval's tasks, ringpilot backend)" in tables
    assert "| 1,024 |" in tables and "- not run: niah_single_2:" in tables
    md, _ = render_run_report(run_dir)
    assert "## RULER per length" in md.read_text()
    # and the run's summary (what `make demo` prints last) has the per-length table
    console = Console(file=io.StringIO(), width=200)
    console.print(ruler_table(run, ledger.read(), run_dir))
    printed = console.file.getvalue()
    assert "RULER (lm-eval's tasks" in printed and "step-000004" in printed
    # which tasks ran, which did not, and that the average is partial
    assert "niah_single_1, ruler_vt" in printed and "niah_single_2" in printed
    assert "partial: 2 of 13 tasks" in printed
    assert "has never read RULER's instructions" in printed  # a tiny model's scores, explained
    line = next(x for x in printed.splitlines() if "1,024" in x)
    assert f"{row['score']:.1f}" in line and "niah_single_2" in line  # listed as not run
    assert "step-000002" not in printed


def test_ruler_beyond_one_evaluator_runs_on_the_gang(ray_cluster, tmp_path):
    """max_tokens_per_evaluator 1024: RULER at 2048 tokens goes to the evaluation gang (2
    members, derived), RULER at 1024 stays on the evaluator; both are scored per length."""
    tokenizer = fixtures.ruler_tokenizer()
    run = tiny_run(tmp_path, context_lengths=[1024, 2048], max_tokens_per_evaluator=1024,
                   ruler=dict(tasks=["niah_single_1"], samples=1, final_only=False))
    run_dir = tmp_path / run.name
    ledger = Ledger(run_dir, run.name)
    path = fixtures.save_checkpoint(fixtures.build_tiny_model(len(tokenizer), 2048), tokenizer,
                                    checkpoint_dir(run_dir, "s192", 2))
    ledger.commit_checkpoint("s192", 2, path)
    EvalScheduler(run, run_dir).start().stop(wait=True, timeout=600)
    entry = ledger.read().stages["s192"].eval["checkpoints/s192/step-000002"]
    assert entry.status == "done", entry.error
    res = load_results(run_dir / entry.results)
    assert res.engines == {"1024": "one evaluator", "2048": "evaluation gang of 2"}
    assert res.ruler["engines"] == res.engines and res.ruler["not_run"] == {}
    assert [(r["length"], r["samples"]) for r in res.ruler["rows"]] == [(1024, 1), (2048, 1)]
    assert res.ruler["gang_prompts"] == 1  # the 2048-token prompt, generated by the gang
