"""Memory at real scale: the trainer's parallelize() traced on fake tensors (ray_jobs.train.memory)
against the planner's cost model, on shallow Llama-3 shapes so the suite stays fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specs.degrees import ParallelDims
from specs.loading import load_model
from specs.run import RunSpec
from topology.cost import StageShape, memory_per_gpu
from topology.profile import get_profile
from topology.run_plan import plan_run
from topology.sources import load_cluster

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "llama3-8b-1m.yaml"


def _shallow(run: RunSpec, layers: int) -> RunSpec:
    return run.model_copy(update={"model": run.model.model_copy(
        update={"num_hidden_layers": layers})})


def test_trace_of_a_two_layer_8b_matches_the_cost_model():
    """A fresh interpreter (the trace needs one without a process group) traces stage 65k of
    the 8B recipe at its planned layout, two decoder layers deep."""
    done = subprocess.run([sys.executable, "-m", "ray_jobs.train.memory", "--run", str(CONFIG),
                           "--stage", "65k", "--ring", "8", "--layers", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    trace = json.loads(done.stdout.strip().splitlines()[-1])
    run = _shallow(load_model(CONFIG, RunSpec), 2)
    parts = memory_per_gpu(StageShape.of(run, run.stages[0], ParallelDims(ring=8)),
                           get_profile("l40s"))
    predicted = sum(v for k, v in parts.items() if not k.startswith("reserve"))
    assert trace["layers"] == 2
    assert abs(predicted - trace["peak_bytes"]) / trace["peak_bytes"] < 0.10
    # the sharded model state is exact: fp32 weights over 8 GPUs, AdamW's two moments
    sharded = trace["parts"]["_FSDPRefType.SHARDED_PARAM"]
    assert sharded == pytest.approx(parts["weights (sharded)"], rel=0.01)
    assert trace["parts"]["_FSDPRefType.OPT"] == pytest.approx(2 * sharded, rel=0.01)


def test_plan_verify_memory_prints_predicted_and_traced(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ringpilot.cli", "plan", "--run", str(CONFIG),
                           "--out", str(tmp_path), "--verify-memory", "--trace-layers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted" in done.stdout and "traced" in done.stdout
    checks = json.loads((tmp_path / "memory.json").read_text())
    assert [c["stage"] for c in checks] == ["65k", "262k", "524k", "1m"]
    assert all(c["fits"] and abs(c["error"]) < 0.10 for c in checks), checks


def test_70b_recipe_plans_a_shard_group_that_fits():
    config = ROOT / "configs" / "llama3-70b-1m.yaml"
    run = load_model(config, RunSpec)
    plan = plan_run(load_cluster(config.parent / run.resources.cluster), run)
    assert [(s.dims.ring, s.dims.dp) for s in plan.stages] == [(8, 64), (32, 16), (64, 8),
                                                                   (128, 1)]
    for s in plan.stages:
        assert s.dims.shard > s.dims.ring or s.dims.dp == 1  # a ring alone is too small
        assert sum(s.prediction.memory_gb.values()) <= 48.0
        assert s.dims.world == s.dims.ring * s.dims.dp


def test_a_long_ring_traces_like_its_short_equivalent():
    """Memory per GPU depends on the tokens per GPU, not on the ring's length: the 262k stage
    on a ring of 32 and its equivalent on a ring of 8 (a quarter of the sequence, four times
    the shard slots) hold the same bytes. The benchmark traces 70B's rings of 64 and 128 so."""
    done = subprocess.run([sys.executable, "-c", (
        "import sys, json; from specs.loading import load_model; from specs.run import RunSpec;"
        "from specs.degrees import ParallelDims;"
        "from ray_jobs.train.memory import trace_stage_memory;"
        f"run = load_model({str(CONFIG)!r}, RunSpec); st = run.stages[1];"
        "dims = ParallelDims.of(32, 1, 32);"
        "a = trace_stage_memory(run, st, dims, layers=2);"
        "b = trace_stage_memory(run, st, dims, layers=2, max_ring=8);"
        "print(json.dumps([a.peak_bytes, b.peak_bytes, b.traced_as]))")],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    direct, short, traced_as = json.loads(done.stdout.strip().splitlines()[-1])
    assert direct == short and traced_as.startswith("ring 8 over 65,536 tokens, 32-GPU")


def test_a_ulysses_layout_is_refused_with_a_reason_not_traced_wrong():
    from ray_jobs.train.memory import trace_stage_memory

    run = load_model(ROOT / "configs" / "tiny.yaml", RunSpec)
    with pytest.raises(ValueError, match=r"tracing a Ulysses layout \(ring 1 x ulysses 2"):
        trace_stage_memory(run, run.stages[0], ParallelDims(ulysses=2))
