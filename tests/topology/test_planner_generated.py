"""The planner on generated fabrics (topology.fabrics): against exhaustive search where that is
tractable, against Ray's default order always, and its bound never above what it plans."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from topology_helpers import small_run

from specs.degrees import ParallelDims
from topology.cost import StageShape
from topology.fabrics import build_generated_cluster
from topology.planner import TIE, PlanError, Planner, exhaustive_count, plan_exhaustive_any

EXHAUSTIVE_LIMIT = 1300  # placements the exhaustive search may try per example (~0.3 s)


@st.composite
def fabrics(draw):
    """Valid clusters of up to 16 GPUs: 1-6 nodes of 1-3 node types, 1-3 leaves, 1-4 NICs
    anywhere, oversubscription 1-16, ordered or interleaved GPU ids (topology.fabrics)."""
    return build_generated_cluster(lambda options: draw(st.sampled_from(list(options))))


def layouts(n_gpus: int) -> list[tuple[int, int]]:
    """(GPUs used, ring) pairs whose exhaustive search (every choice of the GPUs, partition
    and order) stays under EXHAUSTIVE_LIMIT."""
    return [(t, r) for t in range(2, n_gpus + 1) for r in range(2, t + 1)
            if t % r == 0 and exhaustive_count(n_gpus, t, r) <= EXHAUSTIVE_LIMIT]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=fabrics(), data=st.data())
def test_generated_fabrics_against_exhaustive_search_and_ray(spec, data):
    options = layouts(spec.num_gpus)
    if not options:
        return  # one GPU: nothing to place
    total, ring = data.draw(st.sampled_from(options))
    dp = total // ring
    run = small_run(ring=ring, dp=dp, batch=dp, workers=total, seq_len=2048 * ring)
    planner = Planner(spec)
    best, notes = planner.plan_rings(run, run.stages[0], ParallelDims(ring=ring, dp_replicate=dp))
    shape = StageShape.of(run, run.stages[0], ParallelDims(ring=ring, dp_replicate=dp))
    used = [v for r in best.rings for v in r]
    assert len(used) == len(set(used)) == total and all(len(r) == ring for r in best.rings)
    opt = plan_exhaustive_any(planner, shape)
    assert best.cost.step_seconds <= 1.05 * opt.cost.step_seconds, notes
    bound = planner.ring_lower_bound(shape)
    assert bound.seconds <= opt.ring.seconds * (1 + 1e-9)  # a bound: nothing beats it
    ray = planner.ray_default_order()[:total]
    ray_ev = planner.evaluate([ray[i * ring:(i + 1) * ring] for i in range(dp)], shape)
    # the planned hop is never slower than Ray's unless that bought a strictly faster step
    assert (best.ring.seconds <= ray_ev.ring.seconds * (1 + TIE)
            or best.cost.step_seconds < ray_ev.cost.step_seconds * (1 - TIE))


@settings(max_examples=5, deadline=None, derandomize=True)
@given(spec=fabrics())
def test_search_is_deterministic(spec):
    total = spec.num_gpus - spec.num_gpus % 2
    if total < 2:
        return
    run = small_run(ring=2, dp=total // 2, batch=total // 2, workers=total, seq_len=4096)
    plans = [Planner(spec, seed=3).plan_rings(run, run.stages[0],
                                              ParallelDims(ring=2, dp_replicate=total // 2))
             for _ in range(2)]
    assert plans[0][0].rings == plans[1][0].rings


def test_search_takes_the_ring_off_a_slow_socket_link_onto_two_nodes():
    """Two nodes under one leaf; on each, socket 0's GPUs sit behind a slow socket link from
    socket 1 and its NIC: a ring of three kept in one node crosses that link, the planner's
    ring crosses the NIC instead (what the named layouts alone missed)."""
    import random

    spec = build_generated_cluster(random.Random(39).choice)
    run = small_run(ring=3, dp=1, workers=3, seq_len=6144)
    planner = Planner(spec)
    best, notes = planner.plan_rings(run, run.stages[0], ParallelDims(ring=3))
    shape = StageShape.of(run, run.stages[0], ParallelDims(ring=3))
    optimum = plan_exhaustive_any(planner, shape)
    assert best.cost.step_seconds <= optimum.cost.step_seconds * (1 + TIE)
    assert best.ring.seconds <= planner.ring_lower_bound(shape).seconds * 1.05
    assert any(n.startswith("slowest K/V hop") and "x the lower bound" in n for n in notes)


@pytest.mark.parametrize("budget", [0, -1.0])
def test_a_budget_of_zero_or_less_is_refused(budget):
    spec = build_generated_cluster(lambda options: list(options)[0])
    with pytest.raises(PlanError, match=r"search_seconds is .*; the placement search needs a "
                       r"budget > 0 seconds \(e.g. --search-seconds 0.25"):
        Planner(spec, search_seconds=budget)


def test_plan_json_and_report_give_each_stage_its_gap_to_the_bound(tmp_path):
    import json

    from topology.presets import build_leaf_spine_cluster
    from topology.report import render_report
    from topology.run_plan import plan_run

    spec = build_leaf_spine_cluster(2, nodes_per_leaf=1, oversubscription=8.0, nics=1)
    plan = plan_run(spec, small_run(ring=4, dp=4, batch=4, workers=16))
    p = plan.stages[0].prediction
    assert p.ring_hop_bound_seconds <= p.ring_hop_seconds
    assert p.ring_hop_gap == pytest.approx(p.ring_hop_seconds / p.ring_hop_bound_seconds)
    render_report(plan, spec, tmp_path)
    saved = json.loads((tmp_path / "plan.json").read_text())["stages"][0]["prediction"]
    assert saved["ring_hop_gap"] == pytest.approx(p.ring_hop_gap)
    report = (tmp_path / "report.md").read_text()
    assert (f"**s1** slowest K/V hop: planned {p.ring_hop_seconds * 1e3:.3f} ms, lower bound "
            f"{p.ring_hop_bound_seconds * 1e3:.3f} ms, gap {p.ring_hop_gap:.3f}x.") in report


def test_cli_refuses_a_search_budget_of_zero(tmp_path, capsys):
    from topology_helpers import ROOT

    from topology.cli import main

    code = main(["--run", str(ROOT / "configs/llama3-8b-1m.yaml"), "--out", str(tmp_path),
                 "--search-seconds", "0"])
    assert code == 2
    assert "search_seconds is 0.0; the placement search needs a budget > 0" in \
        capsys.readouterr().err


def test_search_takes_a_ring_off_the_spine_when_that_costs_nothing():
    """Four one-NIC nodes, two per non-blocking leaf: rings of two nodes are as fast paired
    across the leaves as under one (the NICs limit both), so only the tie-break on traffic
    brings each ring under one leaf; the start pairs them across."""
    from topology.planner import TIERS, rank
    from topology.presets import build_leaf_spine_cluster

    spec = build_leaf_spine_cluster(4, nodes_per_leaf=2, oversubscription=1.0, nics=1)
    run = small_run(ring=16, dp=2, batch=2, workers=32, seq_len=65536)
    planner = Planner(spec)
    shape = StageShape.of(run, run.stages[0], ParallelDims(ring=16, dp_replicate=2))
    nodes = [[f"node-00{k}/gpu{g}" for g in range(8)] for k in range(4)]
    crossing = planner.evaluate([nodes[0] + nodes[2], nodes[1] + nodes[3]], shape)
    assert crossing.traffic[TIERS.index("leaf uplinks")] > 0
    best, notes = planner.search(crossing, shape, [])
    leaf = {f"node-00{k}": k // 2 for k in range(4)}
    assert all(len({leaf[v.split("/")[0]] for v in ring}) == 1 for ring in best.rings)
    # what still crosses the spine is the data-parallel sync between the two rings
    assert best.traffic[TIERS.index("leaf uplinks")] < crossing.traffic[TIERS.index(
        "leaf uplinks")] / 2
    assert best.ring.seconds <= crossing.ring.seconds * (1 + TIE)
    floor = (crossing.cost.step_seconds, crossing.ring.seconds)
    assert rank(best, floor) < rank(crossing, floor)
    assert "moves improved it" in notes[0]
