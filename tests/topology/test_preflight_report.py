"""The preflight's report: findings, preflight.json, the table and the fabric plot."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import FancyArrowPatch
from topology_helpers import NBYTES, UPLINK, ring_host_by_host
from topology_helpers import simulated_preflight as preflight

from topology.cost import ring_flows
from topology.preflight_report import (
    TABLE_WIDTH,
    exit_code,
    fabric_figure,
    findings,
    plot_fabric,
    render_table,
    write_preflight,
)
from topology.tomography import HopTiming, explain, predict_hops, slowed

PNG = b"\x89PNG\r\n\x1a\n"


def test_findings_of_a_throttled_link_before_and_after_the_probes(netns):
    first, _, final = preflight(netns, slowed(netns, {UPLINK: 40}))
    (ambiguous,) = findings(first)
    assert ambiguous.kind == "ambiguous" and "host1/nic0->leaf0" in ambiguous.suspects
    assert ambiguous.text.startswith("ambiguous: 4 explanations fit the slow hops (hop "
                                     "host1/gpu1 -> host2/gpu0 ran 39.9x its prediction)")
    (named,) = findings(final)
    assert named.kind == "slow link" and named.suspects == ("host1/nic0->leaf0",)
    assert named.text.startswith("slow link host1/nic0 -> leaf0 (or host1/sw0->host1/nic0")
    assert "ran 39.9x their prediction (unique explanation" in named.text
    assert named.text.endswith("--exclude host1/nic0->leaf0)")
    assert "\n" not in named.text
    assert exit_code(first) == exit_code(final) == 1


def test_findings_of_a_clean_fabric_and_of_one_off_its_profile(netns):
    _, _, clean = preflight(netns, netns)
    (none,) = findings(clean)
    assert none.kind == "none" and none.text.startswith("no finding: all 8 hops within 2x")
    assert exit_code(clean) == 0
    pairs = ring_flows([ring_host_by_host()])
    hops = [HopTiming(s, d, NBYTES, p, p / 4) for (s, d), p in
            zip(pairs, predict_hops(netns, pairs, NBYTES))]
    (fabric,) = findings(explain(netns, hops))
    assert fabric.kind == "fabric"
    assert fabric.text.startswith("the whole fabric runs at 0.25x its profile (faster")


def test_inconsistent_hops_are_a_finding(netns):
    pairs = [("host0/gpu0", "host1/gpu0"), ("host0/gpu0", "host1/gpu1"),
             ("host0/gpu1", "host1/gpu0"), ("host2/gpu0", "host3/gpu0")]
    hops = [HopTiming(s, d, NBYTES, p, p * (10 if k == 0 else 1))
            for k, ((s, d), p) in enumerate(zip(pairs, predict_hops(netns, pairs, NBYTES)))]
    e = explain(netns, hops)
    assert [f.kind for f in findings(e)] == ["inconsistent"] and exit_code(e) == 1


def test_preflight_json_has_every_hop_the_rounds_and_the_findings(netns, tmp_path):
    first, batches, final = preflight(netns, slowed(netns, {UPLINK: 40}))
    numerics = {"ranks": {"0": {"out": 1e-3, "dq": 2e-3}}, "ok": True}
    path = write_preflight(tmp_path / "run", final.rounds, final, numerics)
    doc = json.loads(path.read_text())
    assert path.name == "preflight.json"
    assert [r["name"] for r in doc["rounds"]] == ["ring", "probe1"]
    assert len(doc["rounds"][0]["hops"]) == 8
    assert len(doc["rounds"][1]["hops"]) == sum(len(b) for b in batches)
    slow = [h for r in doc["rounds"] for h in r["hops"] if h["slow"]]
    assert slow and all(h["suspects"] == ["host1/nic0->leaf0"] for h in slow)
    assert all(h["ratio"] == pytest.approx(h["measured_s"] / h["predicted_s"])
               for r in doc["rounds"] for h in r["hops"])
    hop = doc["rounds"][0]["hops"][0]
    assert set(hop) == {"src", "dst", "nbytes", "predicted_s", "measured_s", "ratio", "slow",
                        "suspects"}
    assert doc["candidates"] == [["host1/nic0->leaf0"]] and doc["unique"] is True
    assert doc["findings"][0]["kind"] == "slow link" and doc["exit_code"] == 1
    assert doc["numerics"] == numerics


def test_preflight_json_refuses_unknown_hops_and_non_json_numerics(netns, tmp_path):
    first, _, _ = preflight(netns, netns)
    stranger = HopTiming("host0/gpu0", "host3/gpu1", NBYTES, 1e-3, 1e-3)
    with pytest.raises(ValueError, match=r"rounds\[0\]: hop host0/gpu0 -> host3/gpu1 is not in"):
        write_preflight(tmp_path, [[stranger]], first)
    with pytest.raises(ValueError, match="numerics: .*give plain JSON data"):
        write_preflight(tmp_path, first.rounds, first, {"err": np.float32(1.0)})
    with pytest.raises(ValueError, match="numerics: .*finite floats"):
        write_preflight(tmp_path, first.rounds, first, {"err": float("nan")})
    assert not (tmp_path / "preflight.json").exists()


def test_table_fits_100_columns_even_with_long_names(netns):
    _, _, final = preflight(netns, slowed(netns, {UPLINK: 40}))
    table = render_table(final)
    lines = table.splitlines()
    assert lines[0].split() == ["round", "from", "to", "MiB", "pred", "ms", "meas", "ms",
                                "ratio", "slow", "suspects"]
    assert len(lines) == 2 + len(final.hops)
    assert all(len(line) <= TABLE_WIDTH for line in lines)
    assert sum("SLOW" in line for line in lines) == len(final.slow_hops)
    long = HopTiming("a-very-long-node-name-indeed/gpu0", "another-long-node-name/gpu15",
                     NBYTES, 1e-3, 1e-3)
    wide = final.__class__(**{**final.__dict__, "rounds": ((long,),), "slow": (False,),
                              "hop_suspects": ((),)})
    row = render_table(wide).splitlines()[2]
    assert len(row) <= TABLE_WIDTH and "..me-indeed/gpu0 " in row


def test_fabric_plot_draws_certain_suspects_red_and_candidates_dashed(netns, tmp_path):
    first, _, final = preflight(netns, slowed(netns, {UPLINK: 40}))

    def arrows(fig):
        patches = [p for ax in fig.axes for p in ax.patches if isinstance(p, FancyArrowPatch)]
        return sorted((p.get_linestyle(), p.get_edgecolor()[:3]) for p in patches)

    fig = fabric_figure(netns, final)
    red = (0xd6 / 255, 0x27 / 255, 0x28 / 255)
    got = arrows(fig)
    assert len(got) == 2 and all(style == "-" and np.allclose(c, red) for style, c in got)
    plt.close(fig)
    fig = fabric_figure(netns, first)
    assert len(arrows(fig)) == 6 and all(style == "--" for style, _ in arrows(fig))
    assert "4 candidate explanations" in fig.axes[0].get_title()
    plt.close(fig)
    path = plot_fabric(netns, final, tmp_path / "fabric.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
