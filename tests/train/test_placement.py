"""One plan from planner to worker: every rank builds its DeviceMesh from exactly the plan's
ParallelDims and rings, whoever made the plan; state.json records the layout trained on."""

from __future__ import annotations

import json

import pytest

from specs.checkpoint import STATE_DIR, TrainerState, read_state, write_state
from specs.degrees import ParallelDims
from specs.plan import StagePlan, Worker
from specs.run import RunSpec
from tests.support.worlds import run_world
from tests.train import parallel_worlds as worlds
from tests.train.conftest import mini_spec
from topology.run_plan import plan_from_workers


def _rank(w: Worker) -> int:
    """The rank mesh_from_one_plan starts on (node, local device): local devices run against
    rank order."""
    return int(w.node.split("-")[1]) * 2 + 1 - w.gpu


def _run(tmp_path, **overrides) -> RunSpec:
    return RunSpec.model_validate(mini_spec(tmp_path / "runs", **{"resources.workers": 4,
                                                                  **overrides}))


def _driver_plan() -> StagePlan:
    """What a driver with a ClusterSpec hands the workers: HSDP (2 replicas of a ring of 2), its
    rings across the nodes, serialised as plan.json spells it."""
    rings = [[Worker(node="node-1", gpu=0), Worker(node="node-0", gpu=0)],
             [Worker(node="node-1", gpu=1), Worker(node="node-0", gpu=1)]]
    return StagePlan(name="s64", seq_len=64, rope_theta=10000.0, dims=ParallelDims.of(2, 2, 2),
                     rings=rings)


@pytest.mark.multiprocess
@pytest.mark.parametrize("who, overrides", [
    ("rank 0", {"stages.0.data_parallel_degree": 2}),  # ring 2 x dp 2 from the workers' places
    ("rank 0", {"stages.0.ring_degree": 1, "stages.0.ulysses_degree": 2,
                "stages.0.data_parallel_degree": 2}),  # Ulysses groups of 2, two of them
    ("driver", {"stages.0.data_parallel_degree": 2}),
])
def test_every_rank_builds_the_mesh_of_the_one_plan(tmp_path, who, overrides):
    run = _run(tmp_path, **overrides)
    if who == "driver":
        plan = _driver_plan()
    else:
        one_stage = run.model_copy(update={"stages": [run.stages[0]]})
        plan = plan_from_workers({"node-0": 2, "node-1": 2}, one_stage).stage("s64")
    text = plan.model_dump_json()
    assert StagePlan.model_validate_json(text) == plan  # what travels is exactly the plan
    results = run_world(4, worlds.mesh_from_one_plan, run,
                        text if who == "driver" else None, timeout_s=120)

    dims = plan.dims
    rank_rings = [[_rank(w) for w in ring] for ring in plan.rings]
    grid = dims.rings_grid(rank_rings)
    shard_groups = [sum((g for ring in rep for g in ring), []) for rep in grid]
    for rank, got in enumerate(results):
        assert got["plan"] == text, f"rank {rank} was handed another plan"
        assert got["dims"] == dims
        assert got["mesh"] == grid  # (dp_replicate, dp_shard, ring, ulysses), the plan's order
        mesh_shape = (len(grid), len(grid[0]), len(grid[0][0]), len(grid[0][0][0]))
        assert mesh_shape == dims.mesh_shape
        index, ring = next((i, r) for i, r in enumerate(rank_rings) if rank in r)
        assert got["dp_rank"] == index
        position, member = divmod(ring.index(rank), dims.ulysses)
        assert got["ring"] == [ring[p * dims.ulysses + member] for p in range(dims.ring)]
        assert got["ulysses"] == ring[position * dims.ulysses:(position + 1) * dims.ulysses]
        want_fsdp = shard_groups if dims.dp_replicate > 1 else shard_groups[0]
        assert got["fsdp"] == want_fsdp


def test_state_json_records_the_layout_and_old_files_still_load(tmp_path):
    state = TrainerState(stage="s64", stage_index=0, step=3,
                         dims=ParallelDims(dp_replicate=2, ring=2, ulysses=2))
    (tmp_path / STATE_DIR).mkdir()
    write_state(tmp_path, state)
    doc = json.loads((tmp_path / STATE_DIR / "state.json").read_text())
    assert (doc["ring_degree"], doc["dp_degree"], doc["shard_degree"],
            doc["ulysses_degree"]) == (2, 2, 4, 2)
    assert read_state(tmp_path) == state
    old = {"stage": "s64", "stage_index": 0, "step": 3, "world_size": 4, "ring_degree": 2,
           "dp_degree": 2, "shard_degree": 4, "ulysses_degree": 1, "losses": [1.5]}
    (tmp_path / STATE_DIR / "state.json").write_text(json.dumps(old))
    assert read_state(tmp_path).dims == ParallelDims(dp_shard=2, ring=2)
