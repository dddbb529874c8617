"""The planning report's files and the `ringpilot plan` command."""

import json

import pytest
from topology_helpers import ROOT, small_run

from ringpilot.cli import main as ringpilot
from topology.presets import build_leaf_spine_cluster
from topology.report import render_report
from topology.run_plan import plan_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_files(tmp_path):
    spec = build_leaf_spine_cluster(2, nodes_per_leaf=2)
    run = small_run(ring=8, dp=2, batch=2, workers=16)
    plan = plan_run(spec, run)
    files = render_report(plan, spec, tmp_path, compare_minutes=[1.0])
    names = {f.name for f in files}
    assert {"plan.json", "report.md", "report.html", "step_breakdown.png", "memory.png",
            "planned_vs_baselines.png", "link_load.png", "rings.png"} <= names
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == PNG and f.stat().st_size > 2000
    md = (tmp_path / "report.md").read_text()
    first = md.split("## ")[1]  # the headline section comes first
    assert first.startswith("Headline") and "Predicted wall time" in first
    assert ("The network is not the bottleneck" in first) != ("The network limits stage" in first)
    assert "| s1 | 16,384 |" in md and "8 x 2" in md and "Assumptions" in md
    html = (tmp_path / "report.html").read_text()
    assert '<img src="rings.png"' in html and "<table>" in html
    loaded = json.loads((tmp_path / "plan.json").read_text())
    assert loaded["stages"][0]["ring_degree"] == 8


def test_cli_plan_with_what_if(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = ringpilot(["plan", "--run", str(ROOT / "configs/llama3-8b-1m.yaml"), "--cluster",
                    str(ROOT / "configs/clusters/l40s-64-leaf-spine.yaml"), "--out", str(out),
                    "--without-node", "node-005",
                    "--degrade-link", "node-000/cpu0-node-000/cpu1=0.5",
                    "--compare-minutes", "202,555,61,87"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Predicted wall time" in printed
    md = (out / "report.md").read_text()
    assert "What if: link node-000/cpu0 - node-000/cpu1 at 0.5x bandwidth; node node-005 lost" in md
    whatif = json.loads((out / "plan-whatif.json").read_text())
    assert whatif["excluded"] == ["node-005"]
    # 504 GPUs left: the 32 x 16 stages fall back to 32 x 8, said in the notes
    assert whatif["stages"][3]["dp_degree"] == 8
    assert any("fewer rings" in n for n in whatif["stages"][3]["notes"])
    workers = {(w["node"]) for r in whatif["stages"][3]["rings"] for w in r}
    assert "node-005" not in workers


@pytest.mark.parametrize("args,message", [
    (["--degrade-link", "nowhere-else=0.5"], "no link between two vertices"),
    (["--without-node", "node-x"], "no such node"),
])
def test_cli_plan_bad_what_if(tmp_path, capsys, args, message):
    rc = ringpilot(["plan", "--run", str(ROOT / "configs/llama3-8b-1m.yaml"), "--cluster",
                    str(ROOT / "configs/clusters/l40s-8x-2s.yaml"), "--out", str(tmp_path),
                    *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_plan_too_small_cluster(tmp_path, capsys):
    rc = ringpilot(["plan", "--run", str(ROOT / "configs/llama3-8b-1m.yaml"), "--cluster",
                    str(ROOT / "configs/clusters/l40s-8x-2s.yaml"), "--out", str(tmp_path)])
    assert rc == 2
    assert "stage '262k'" in capsys.readouterr().err
