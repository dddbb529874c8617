"""The local search and its moves on their own: the budget is counted in moves (the wall clock
only guards), and every move keeps the stage's GPUs and the unused ones apart."""

import random
from collections import Counter

import pytest
from topology_helpers import small_run

from specs.degrees import ParallelDims
from topology.cost import StageShape
from topology.planner import Planner
from topology.planner.search import LocalSearch
from topology.presets import build_leaf_spine_cluster


@pytest.fixture(scope="module")
def setting():
    """Four 4-GPU nodes behind 8:1 leaves; a 4 x 2 stage started on Ray's order, 8 GPUs
    unused."""
    spec = build_leaf_spine_cluster(4, nodes_per_leaf=2, oversubscription=8.0, nics=1, gpus=4)
    run = small_run(ring=4, dp=2, batch=2, workers=8, seq_len=8192)
    planner = Planner(spec, search_seconds=0.05)
    shape = StageShape.of(run, run.stages[0], ParallelDims(ring=4, dp_replicate=2))
    ray = planner.ray_default_order()
    start = planner.evaluate([ray[:4], ray[4:8]], shape)
    return planner, shape, start, ray[8:]


def test_the_budget_is_counted_in_moves_not_wall_time(setting, monkeypatch):
    planner, shape, start, spare = setting
    monkeypatch.setattr("topology.planner.search.time.perf_counter", lambda: 0.0)
    search = LocalSearch(planner.evaluator, planner.moves, start, shape, None, 0.05, seed=0)
    best, notes = search.run(spare)
    per_move = 2e-4 + 1.5e-6 * 8  # the nominal cost of evaluating 8 GPUs' rings
    assert search.tried == search.budget == int(0.05 / per_move)
    assert notes[-1].endswith(f"({search.budget} moves evaluated; stopped: the budget of "
                              f"0.05 s ({search.budget} moves) is spent)")
    assert best.cost.step_seconds <= start.cost.step_seconds


def test_ten_times_the_budget_in_wall_time_stops_the_search(setting, monkeypatch):
    planner, shape, start, spare = setting
    clock = iter(range(0, 10**6))  # each reading a second later: the guard trips at once
    monkeypatch.setattr("topology.planner.search.time.perf_counter", lambda: next(clock))
    search = LocalSearch(planner.evaluator, planner.moves, start, shape, None, 0.05, seed=0)
    _, notes = search.run(spare)
    assert search.tried < search.budget
    assert notes[-1].endswith("stopped: 10x the time budget of 0.05 s passed)")


def test_every_move_keeps_the_gpus_and_each_kind_is_offered(setting):
    planner, shape, start, spare = setting
    flat = [v for r in start.rings for v in r]
    kinds = Counter()
    for kind, cand, rest in planner.moves.generate(start, flat, spare, shape, random.Random(0)):
        assert len(cand) == len(flat) and len(set(cand)) == len(cand)
        assert sorted(cand + rest) == sorted(flat + spare), kind
        assert cand != flat or kind == "move a run to unused GPUs", kind
        kinds[kind] += 1
    assert {"swap in a ring", "swap across rings", "swap with an unused GPU", "rotate a ring",
            "reverse a segment", "move a segment", "move a run to unused GPUs"} <= set(kinds)
    assert any(k.startswith("swap a whole") for k in kinds)
