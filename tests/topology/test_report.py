"""The planning report's files and the `ringpilot plan` command."""

import json

import pytest
from matplotlib.patches import FancyArrowPatch
from topology_helpers import ROOT, small_run

from ringpilot.cli import main as ringpilot
from topology.presets import build_leaf_spine_cluster
from topology.report import MAX_RINGS_DRAWN, render_report, rings_figure
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


@pytest.mark.parametrize("where", ["/proc/x", "under-a-file"])
def test_cli_plan_out_that_cannot_be_created_is_one_line(tmp_path, capsys, where):
    if where == "under-a-file":
        (tmp_path / "f").write_text("a file, not a directory")
        where = str(tmp_path / "f" / "report")
    rc = ringpilot(["plan", "--run", str(ROOT / "configs/llama3-8b-1m.yaml"), "--out", where])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"ringpilot plan: --out {where}: cannot create or write it (")


def test_cli_plan_too_small_cluster(tmp_path, capsys):
    rc = ringpilot(["plan", "--run", str(ROOT / "configs/llama3-8b-1m.yaml"), "--cluster",
                    str(ROOT / "configs/clusters/l40s-8x-2s.yaml"), "--out", str(tmp_path)])
    assert rc == 2
    assert "stage '262k'" in capsys.readouterr().err


@pytest.mark.parametrize("ring, dp, in_gpu_order", [(8, 2, False), (2, 8, False),
                                                    (16, 1, False), (16, 1, True)])
def test_rings_plot_draws_every_ring_whole(ring, dp, in_gpu_order):
    """Each ring of a stage gets its panel (up to MAX_RINGS_DRAWN, the rest named), and every
    hop's arrow, the one closing the ring included, lies inside its panel and the figure. In
    GPU order a ring of 16 closes with one hop back across both nodes: the widest arc."""
    spec = build_leaf_spine_cluster(2, nodes_per_leaf=2)
    plan = plan_run(spec, small_run(ring=ring, dp=dp, batch=dp, workers=16))
    if in_gpu_order:
        stage = plan.stages[0]
        rings = [sorted(r, key=lambda w: (w.node, w.gpu)) for r in stage.rings]
        plan = plan.model_copy(update={"stages": [stage.model_copy(update={"rings": rings})]})
    fig = rings_figure(plan, spec)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == min(dp, MAX_RINGS_DRAWN)
    assert [t.split(": ring ")[1].split(" of")[0] for t in titles] == [
        str(k + 1) for k in range(len(titles))]
    if dp > MAX_RINGS_DRAWN:
        assert f"{dp - MAX_RINGS_DRAWN} more rings not drawn" in titles[-1]
    figure_box = fig.bbox
    arrows = 0
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        for patch in ax.patches:
            if not isinstance(patch, FancyArrowPatch):
                continue
            arrows += 1
            extent = patch.get_window_extent(renderer)
            for outer in (box, figure_box):
                assert (outer.x0 - 1 <= extent.x0 and extent.x1 <= outer.x1 + 1
                        and outer.y0 - 1 <= extent.y0 and extent.y1 <= outer.y1 + 1), (
                    ax.get_title(), extent, outer)
    assert arrows == ring * len(titles)  # one arrow per hop, the closing one included
