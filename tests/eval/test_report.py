"""`ringpilot eval report RUN_DIR`: Markdown + HTML with score-vs-step plots and heatmaps."""

import os

import pytest

from ray_jobs.eval.runner import evaluate
from ringpilot.cli import main as ringpilot
from specs.checkpoint import eval_dir
from specs.ledger import EvalEntry, Ledger
from tests.eval.oracle import constant, oracle


@pytest.fixture
def run_dir(tmp_path, count_tokens):
    """A run whose ledger holds three evaluated checkpoints over two stages and one failure."""
    run = tmp_path / "tiny"
    ledger = Ledger(run)
    for stage, step, model in [("s256", 25, constant), ("s256", 50, oracle),
                               ("s1k", 20, oracle)]:
        ckpt = f"checkpoints/{stage}/step-{step:06d}"
        out = eval_dir(run, stage, step)
        res = evaluate(model, count_tokens, checkpoint=str(run / ckpt), stage=stage, step=step,
                       tasks=["niah_lite", "cwe_lite"],
                       lengths=[384], depths=[0.0, 100.0], samples=1, seed=0, out_dir=out)
        ledger.record_eval(stage, ckpt, EvalEntry(
            status="done", attempts=1, scores=res.scores,
            results=os.path.relpath(out / "results.json", run)))
    ledger.record_eval("s1k", "checkpoints/s1k/step-000040", EvalEntry(
        status="failed", attempts=3, error="evaluation actor died: ActorDiedError"))
    return run


def test_report_renders_markdown_html_and_plots(run_dir, capsys):
    assert ringpilot(["eval", "report", str(run_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (run_dir / "eval/report.md").read_text()
    assert "| stage | step | status | attempts | cwe_lite | niah_lite |" in md
    assert "| s256 | 25 | done | 1 | 0.000 | 0.000 |" in md
    assert "| s256 | 50 | done | 1 | 1.000 | 1.000 |" in md
    assert "| s1k | 40 | failed (evaluation actor died: ActorDiedError) | 3 | - | - |" in md
    assert "![niah_lite](score_vs_step_niah_lite.png)" in md
    assert "![s1k step 20: niah_lite](s1k/step-000020/heatmap_niah_lite.png)" in md
    page = (run_dir / "eval/report.html").read_text()
    assert "<img src='s256/step-000050/heatmap_niah_lite.png'" in page
    assert "<td>failed (evaluation actor died: ActorDiedError)</td>" in page
    for png in ["score_vs_step_niah_lite.png", "score_vs_step_cwe_lite.png",
                "s1k/step-000020/heatmap_niah_lite.png"]:
        assert (run_dir / "eval" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_directory_without_ledger_is_refused(tmp_path, capsys):
    assert ringpilot(["eval", "report", str(tmp_path)]) == 2
    assert "has no ledger.json; pass a run directory" in capsys.readouterr().err
