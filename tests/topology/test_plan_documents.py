"""`ringpilot plan` with a document-length histogram: both attention maskings priced per stage
in plan.json and the report; plans without one unchanged."""

import json

import yaml
from topology_helpers import ROOT, small_run

from ray_jobs.data.prepared import MANIFEST
from ringpilot.cli import main as ringpilot
from specs.run import DocumentLengthBucket
from topology.presets import build_l40s_server
from topology.report import render_report
from topology.run_plan import plan_run

SHORT_DOCUMENTS = [{"max_tokens": 512, "share": 0}, {"max_tokens": 2048, "share": 1}]


def with_histogram(run, buckets):
    data = run.data.model_copy(update={"document_lengths": [DocumentLengthBucket(**b)
                                                            for b in buckets]})
    return run.model_copy(update={"data": data})


def test_both_maskings_are_priced_and_the_stages_own_is_the_prediction(tmp_path):
    spec = build_l40s_server()
    run = with_histogram(small_run(ring=8, dp=1, seq_len=32768), SHORT_DOCUMENTS)
    plan = plan_run(spec, run, search_seconds=0.02)
    stage = plan.stages[0]
    causal, document = stage.attention_options
    assert (causal.attention, causal.chosen, document.attention, document.chosen) == (
        "causal", True, "document", False)
    assert causal.step_seconds == stage.prediction.step_seconds  # today's prediction, unmoved
    assert (causal.work, causal.imbalance, causal.skipped_blocks) == (1.0, 1.0, 0.0)
    assert document.work < 0.1 and document.imbalance > 1 and document.skipped_blocks > 0
    assert document.step_seconds < causal.step_seconds
    assert document.attention_seconds < causal.attention_seconds
    assert any("document masking" in n and "the speed of causal" in n for n in stage.notes)
    assert any(a.startswith("attention document:") for a in plan.assumptions)
    render_report(plan, spec, tmp_path)
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Attention over packed documents")[1].split("\n## ")[0]
    speedup = causal.step_seconds / document.step_seconds
    row = next(line for line in section.splitlines() if line.startswith("| s1 |"))
    assert (f"| s1 | causal | {causal.step_seconds:,.1f} s" in row
            and f"| {document.imbalance:.2f}x |" in row and f"| {speedup:.2f}x (" in row), row
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["stages"][0]["attention_options"][1]["attention"] == "document"


def test_a_plan_without_a_histogram_is_unchanged(tmp_path):
    spec = build_l40s_server()
    plan = plan_run(spec, small_run(ring=8, dp=1, seq_len=32768), search_seconds=0.02)
    assert plan.stages[0].attention_options == []
    assert not any("document" in n for n in plan.stages[0].notes + plan.assumptions)
    render_report(plan, spec, tmp_path)
    assert "Attention over packed documents" not in (tmp_path / "report.md").read_text()


def test_plan_prices_the_prepared_corpuss_histogram(tmp_path, capsys):
    # The run file says short documents; the corpus, prepared, holds one long one per sequence.
    data = tmp_path / "prepared"
    data.mkdir()
    (data / MANIFEST).write_text(json.dumps({"documents": 3, "document_lengths": [
        {"max_tokens": 1 << 29, "share": 0}, {"max_tokens": 1 << 30, "share": 1}]}))
    run = with_histogram(small_run(ring=8, dp=1, seq_len=32768), SHORT_DOCUMENTS)
    doc = run.model_dump(mode="json", exclude_defaults=True)
    doc["data"]["prepared"] = {"path": "prepared", "sources": [{"name": "web",
                                                                "paths": ["web.jsonl"]}]}
    doc["data"]["mix"] = {"documents": 1.0}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    assert ringpilot(["plan", "--run", str(tmp_path / "run.yaml"), "--cluster",
                      str(ROOT / "configs/clusters/l40s-8x-2s.yaml"), "--out", str(out),
                      "--search-seconds", "0.02"]) == 0
    capsys.readouterr()
    plan = json.loads((out / "plan.json").read_text())
    assert any("the prepared corpus's" in a and "3 documents" in a for a in plan["assumptions"])
    document = plan["stages"][0]["attention_options"][1]
    assert document["work"] > 0.99  # the corpus's long documents, not the run file's short ones


def test_a_stage_training_with_document_masking_is_planned_and_predicted_by_it():
    run = with_histogram(small_run(ring=8, dp=1, seq_len=32768), SHORT_DOCUMENTS)
    stage = run.stages[0].model_copy(update={"attention": "document"})
    plan = plan_run(build_l40s_server(), run.model_copy(update={"stages": [stage]}),
                    search_seconds=0.02)
    causal, document = plan.stages[0].attention_options
    assert (causal.chosen, document.chosen) == (False, True)
    assert document.step_seconds == plan.stages[0].prediction.step_seconds
    assert any(n.startswith("attention document (the stage's)") for n in plan.stages[0].notes)
