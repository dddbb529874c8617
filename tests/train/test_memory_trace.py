"""Memory at real scale: the trainer's parallelize() traced on fake tensors (ray_jobs.train.memory)
against the planner's cost model, on shallow Llama-3 shapes so the suite stays fast."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ray_jobs.train.memory as memory
from ray_jobs.train.memory import (
    TRACE_DEPTHS,
    MemoryCheck,
    equivalent_layout,
    per_gpu_shapes,
    render_checks,
    trace_stage_memory,
    trace_stage_peak,
    verify_plan_memory,
)
from specs.degrees import ParallelDims, zigzag_problem
from specs.loading import load_model
from specs.run import RunSpec
from topology.cost import StageShape, memory_per_gpu
from topology.profile import get_profile
from topology.run_plan import plan_from_workers, plan_run
from topology.sources import load_cluster

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "llama3-8b-1m.yaml"


def _shallow(run: RunSpec, layers: int) -> RunSpec:
    return run.model_copy(update={"model": run.model.model_copy(
        update={"num_hidden_layers": layers})})


def _traced_65k_at_ring_8(config: Path, *, timeout: float) -> tuple[dict, dict, float]:
    """(trace, the memory model's parts, its predicted total) of stage 65k at a ring of 8, two
    decoder layers deep, traced in a fresh interpreter (the trace needs one without a process
    group)."""
    done = subprocess.run([sys.executable, "-m", "ray_jobs.train.memory", "--run", str(config),
                           "--stage", "65k", "--ring", "8", "--layers", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    trace = json.loads(done.stdout.strip().splitlines()[-1])
    run = _shallow(load_model(config, RunSpec), 2)
    parts = memory_per_gpu(StageShape.of(run, run.stages[0], ParallelDims(ring=8)),
                           get_profile("l40s"))
    return trace, parts, sum(v for k, v in parts.items() if not k.startswith("reserve"))


def test_trace_of_a_two_layer_8b_matches_the_cost_model():
    """A fresh interpreter (the trace needs one without a process group) traces stage 65k of
    the 8B recipe at its planned layout, two decoder layers deep."""
    trace, parts, predicted = _traced_65k_at_ring_8(CONFIG, timeout=120)
    assert trace["layers"] == 2
    assert abs(predicted - trace["peak_bytes"]) / trace["peak_bytes"] < 0.10
    # the sharded model state is exact: fp32 weights over 8 GPUs, AdamW's two moments
    sharded = trace["parts"]["_FSDPRefType.SHARDED_PARAM"]
    assert sharded == pytest.approx(parts["weights (sharded)"], rel=0.01)
    assert trace["parts"]["_FSDPRefType.OPT"] == pytest.approx(2 * sharded, rel=0.01)


def test_each_checkpointing_policy_traces_as_the_cost_model_predicts():
    """Stage 65k of the 8B recipe, four decoder layers, traced under full, attention and none.
    The memory held by `attention` beyond `full` (ring attention's output and fp32
    log-sum-exp, kept through the recomputation) is small beside the model state, so its
    delta is checked on its own: the trace must show it, and the cost model must price it."""
    layers = 4
    done = subprocess.run([sys.executable, "-c", (
        "import json; from specs.loading import load_model; from specs.run import RunSpec;"
        "from specs.degrees import ParallelDims;"
        "from ray_jobs.train.memory import trace_stage_memory;"
        f"run = load_model({str(CONFIG)!r}, RunSpec);"
        f"traces = {{p: trace_stage_memory(run, run.stages[0], ParallelDims(ring=8), policy=p,"
        f" layers={layers}) for p in ('full', 'attention', 'none')}};"
        "print(json.dumps({p: [t.peak_bytes, t.parts['_FSDPRefType.ACT']]"
        " for p, t in traces.items()}))")],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    traced = json.loads(done.stdout.strip().splitlines()[-1])
    run = _shallow(load_model(CONFIG, RunSpec), layers)
    predicted = {}
    for policy in traced:
        shape = StageShape.of(run, run.stages[0], ParallelDims(ring=8), policy)
        parts = memory_per_gpu(shape, get_profile("l40s"))
        predicted[policy] = sum(v for k, v in parts.items() if not k.startswith("reserve"))
        assert abs(predicted[policy] / traced[policy][0] - 1) < 0.10, (policy, predicted, traced)
    # every layer waiting for its backward keeps its output (bf16) and log-sum-exp (fp32)
    out_and_lse = 8192 * (32 * 128 * 2 + 32 * 4)  # 8,192 tokens per GPU, 32 heads of 128
    kept = traced["attention"][1] - traced["full"][1]
    assert kept == pytest.approx((layers - 1) * out_and_lse, rel=0.01)
    delta = traced["attention"][0] - traced["full"][0]
    assert delta > 0
    assert abs((predicted["attention"] - predicted["full"]) / delta - 1) < 0.10, (delta,
                                                                                 predicted)
    assert traced["none"][0] > traced["attention"][0]  # every layer's activations


def test_plan_verify_memory_prints_predicted_and_traced(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ringpilot.cli", "plan", "--run", str(CONFIG),
                           "--out", str(tmp_path), "--verify-memory", "--trace-layers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted" in done.stdout and "traced" in done.stdout
    checks = json.loads((tmp_path / "memory.json").read_text())
    stages = ["65k", "262k", "524k", "1m"]
    assert [(c["stage"], c["phase"]) for c in checks] == [
        (s, p) for s in stages for p in ("step", "load", "export")]
    assert [c["policy"] for c in checks] == ["attention"] * 12  # as planned (golden report)
    assert all(c["fits"] and abs(c["error"]) < 0.10 for c in checks), checks
    assert all(c["host_bytes"] > 0 for c in checks if c["phase"] != "step")


def test_70b_recipe_plans_a_shard_group_that_fits():
    config = ROOT / "configs" / "llama3-70b-1m.yaml"
    run = load_model(config, RunSpec)
    plan = plan_run(load_cluster(config.parent / run.resources.cluster), run)
    assert [(s.dims.ring, s.dims.dp) for s in plan.stages] == [(8, 64), (32, 16), (64, 8),
                                                                   (128, 1)]
    for s in plan.stages:
        assert s.dims.shard > s.dims.ring or s.dims.dp == 1  # a ring alone is too small
        assert sum(s.prediction.memory_gb.values()) <= 48.0
        # 8,192 tokens per GPU: keeping 78 layers' ring outputs does not fit beside 70B's state
        by = {o.policy: o for o in s.checkpointing_options}
        assert s.activation_checkpointing == "full" and not by["attention"].fits
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
    run = load_model(ROOT / "configs" / "tiny.yaml", RunSpec)
    with pytest.raises(ValueError, match=r"tracing a Ulysses layout \(ring 1 x ulysses 2"):
        trace_stage_memory(run, run.stages[0], ParallelDims(ulysses=2))


_STAGE = load_model(CONFIG, RunSpec).stages[0]


@settings(max_examples=150, deadline=1000)
@given(ring=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 7, 9]),
       ulysses=st.sampled_from([1, 2, 4]), dp_shard=st.integers(1, 8),
       dp_replicate=st.integers(1, 4), max_ring=st.sampled_from([2, 4, 8]),
       chunks=st.integers(1, 64), per_ring=st.integers(1, 4))
def test_the_equivalent_layout_keeps_every_per_gpu_shape(ring, ulysses, dp_shard, dp_replicate,
                                                         max_ring, chunks, per_ring):
    """What a verify-memory trace runs in place of the planned layout: every shape a rank's
    tensors take from the layout is the planned one's; only the ring is shorter."""
    dims = ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, ring=ring,
                        ulysses=ulysses)
    stage = _STAGE.model_copy(update={"seq_len": 2 * ring * ulysses * chunks,
                                             "batch_size": per_ring * dims.dp,
                                             "grad_accum_steps": 2})
    short_stage, short = equivalent_layout(stage, dims, max_ring)
    assert per_gpu_shapes(short_stage, short) == per_gpu_shapes(stage, dims)
    assert zigzag_problem(short_stage.seq_len, short.ring, short.ulysses) is None
    assert ring % short.ring == 0 and short.dp_replicate == dp_replicate
    divisors = [r for r in range(2, max_ring + 1) if ring % r == 0]
    if ring > max_ring and divisors:  # the longest ring that divides it, no longer than asked
        assert short.ring == max(divisors)
    else:
        assert (short_stage, short) == (stage, dims)


def _check(predicted_gb: float, traced_gb: float, reserve_gb: float = 4.0, gpu_gb: float = 48.0):
    return MemoryCheck(stage="1m", layout="ring 128 x dp 1, shard 128", policy="full",
                       predicted_bytes=predicted_gb * 1e9, traced_bytes=int(traced_gb * 1e9),
                       reserve_bytes=reserve_gb * 1e9, gpu_bytes=gpu_gb * 1e9,
                       trace_seconds=1.0)


def test_a_peak_within_the_margin_of_the_gpu_is_at_the_limit_not_fitting():
    """47.7 of 48 GB (a 70B layout in the issue) holds on paper but not within the trace's
    error: flagged. The margin is 10%, or the stage's own error when larger."""
    tight = _check(predicted_gb=43.0, traced_gb=43.7)  # 43.7 + 4 = 47.7 GB
    assert tight.peak_bytes == pytest.approx(47.7e9)
    assert tight.margin_bytes == pytest.approx(4.37e9)
    assert (tight.verdict, tight.fits) == ("at the limit", False)
    assert "AT THE LIMIT (48 GB GPU)" in render_checks([tight])
    planned = _check(predicted_gb=37.0, traced_gb=37.4)  # the 70B's 1m stage at full depth
    assert (planned.verdict, planned.fits) == ("fits", True)
    assert (_check(44.5, 44.1).verdict, _check(44.0, 44.1).verdict) == ("does not fit",
                                                                         "does not fit")
    # the model's estimate counts when it is the larger, and a large error widens the margin
    off = _check(predicted_gb=30.0, traced_gb=20.0)  # +50%: 34 GB + 15 GB
    assert off.margin_bytes == pytest.approx(15e9) and off.verdict == "at the limit"
    assert _check(predicted_gb=30.0, traced_gb=20.0, gpu_gb=50.0).verdict == "fits"


def test_plan_verify_memory_exits_2_and_names_a_stage_at_the_limit(tmp_path, monkeypatch,
                                                                   capsys):
    from ringpilot.cli import main

    monkeypatch.setattr(memory, "verify_plan_memory",
                        lambda run, plan, **_: [_check(37.0, 37.4), _check(43.0, 43.7)])
    code = main(["plan", "--run", str(ROOT / "configs" / "tiny.yaml"), "--cluster",
                 str(ROOT / "configs" / "clusters" / "local-cpu.yaml"), "--out",
                 str(tmp_path), "--verify-memory"])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "at the limit: the GPU holds their peak but not the margin" in err
    checks = json.loads((tmp_path / "memory.json").read_text())
    assert [(c["verdict"], c["fits"]) for c in checks] == [("fits", True),
                                                           ("at the limit", False)]
    assert checks[1]["peak_bytes"] == pytest.approx(47.7e9)


def test_the_default_depths_extrapolate_to_the_peak_of_every_layer_traced():
    """An eight-layer tiny model traced at the default depths and extrapolated per layer gives
    the peak of tracing all eight (at 2 and 3 layers the slope is wrong: 14% over here)."""
    run = _shallow(load_model(ROOT / "configs" / "tiny.yaml", RunSpec), 8)
    stage, dims = run.stages[0], ParallelDims(ring=2)
    whole = trace_stage_memory(run, stage, dims, policy="full")
    guess = trace_stage_peak(run, stage, dims, policy="full")
    assert guess.extrapolated_from == TRACE_DEPTHS and guess.layers == 8
    assert guess.peak_bytes == pytest.approx(whole.peak_bytes, rel=0.005)


def test_verify_memory_reports_each_stage_as_it_starts_and_ends():
    run = _shallow(load_model(ROOT / "configs" / "tiny.yaml", RunSpec), 3)
    run = run.model_copy(update={"stages": run.stages[:2]})
    lines = []
    checks = verify_plan_memory(run, plan_from_workers({"local": 2}, run), depths=(1, 2),
                                progress=lines.append)
    assert [(c.stage, c.phase) for c in checks] == [
        (s, p) for s in ("s64", "s256") for p in ("step", "load", "export")]
    assert len(lines) == 6
    for i, s in enumerate(run.stages):
        start, end, phases = lines[3 * i], lines[3 * i + 1], lines[3 * i + 2]
        assert re.fullmatch(rf"stage {s.name} \({i + 1}/2\): traced load \d+\.\d GB in "
                            r"[\d.]+ s: fits, export \d+\.\d GB in [\d.]+ s: fits", phases), phases
        assert start == (f"stage {s.name} ({i + 1}/2): tracing ring 2 x dp 1, shard 2 as the "
                         "planned ring, 1 and 2 of 3 layers, none checkpointing"), start
        assert end.startswith(f"stage {s.name} ({i + 1}/2): traced ") and " s: fits" in end, end


@pytest.mark.parametrize("argv, message", [
    (["--trace-layers", "0", "--verify-memory"], r"--trace-layers: give 1 or more decoder "
                                                  r"layers \(got 0\)"),
    (["--trace-exact"], r"--trace-exact: only with --verify-memory"),
])
def test_plan_refuses_a_bad_trace_flag_before_planning(tmp_path, capsys, argv, message):
    from ringpilot.cli import main

    code = main(["plan", "--run", str(CONFIG), "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("config, layers, dims", [
    ("tiny.yaml", None, ParallelDims(ring=2)),
    ("llama3-8b-1m.yaml", 2, ParallelDims(ring=8)),
    ("llama3-70b-1m.yaml", 2, ParallelDims.of(8, 64, 128)),  # its planned 65k layout (HSDP)
])
def test_load_and_export_trace_as_the_cost_model_predicts(config, layers, dims):
    """The trainer's own load (meta build, parallelize, materialize, the read loop on fake
    slices) and the state its export starts from, traced, against topology.cost's model."""
    run = load_model(ROOT / "configs" / config, RunSpec)
    if layers is not None:
        run = _shallow(run, layers)
    traced, weights = _load_and_export_as_predicted(run, dims, rel=0.01)
    assert traced.parts["_FSDPRefType.OPT"] == pytest.approx(2 * weights, rel=0.01)


def _load_and_export_as_predicted(run: RunSpec, dims: ParallelDims, *, rel: float):
    """Trace the first stage's load and export and hold each to the cost model (the peak within
    the tolerance, the sharded weights within `rel`); (the export's trace, the sharded weights'
    bytes)."""
    stage, profile = run.stages[0], get_profile("l40s")
    weights = memory_per_gpu(StageShape.of(run, stage, dims), profile)["weights (sharded)"]
    for phase, trace in (("load", memory.trace_load_memory), ("export",
                                                              memory.trace_export_memory)):
        traced = trace(run, stage, dims)
        predicted = memory.predicted_phase_bytes(run, stage, dims, phase, profile)[0]
        assert abs(predicted - traced.peak_bytes) / traced.peak_bytes < memory.TRACE_TOLERANCE
        assert traced.parts["_FSDPRefType.SHARDED_PARAM"] == pytest.approx(weights, rel=rel)
        assert traced.seconds < 30  # no training step: seconds, even for 70B's layout
    return traced, weights


def test_the_load_trace_counts_the_slices_it_reads():
    """8B, two layers, ring 8: the peak is the sharded weights plus one chunk of rows read
    (32 MB of the embedding's 16,032 rows), and a smaller chunk lowers it by the difference."""
    run, dims = _shallow(load_model(CONFIG, RunSpec), 2), ParallelDims(ring=8)
    big = memory.trace_load_memory(run, run.stages[0], dims)
    small = memory.trace_load_memory(run, run.stages[0], dims, chunk_bytes=1 << 20)
    assert big.peak_bytes - small.peak_bytes == (32 << 20) - (1 << 20)
    assert big.parts["_FSDPRefType.SHARDED_PARAM"] == small.parts["_FSDPRefType.SHARDED_PARAM"]


def test_load_and_export_extrapolate_per_layer_to_the_whole_trace():
    run = _shallow(load_model(ROOT / "configs" / "tiny.yaml", RunSpec), 4)
    stage, dims = run.stages[0], ParallelDims(ring=2)
    for phase in memory.LIFECYCLE_TRACED:
        whole = memory.trace_phase_peak(phase, run, stage, dims, depths=None)
        guess = memory.trace_phase_peak(phase, run, stage, dims, depths=(1, 2))
        assert guess.extrapolated_from == (1, 2) and whole.layers == guess.layers == 4
        assert guess.peak_bytes == pytest.approx(whole.peak_bytes, rel=0.001), phase


def test_render_checks_prints_a_row_per_phase_with_its_host_memory():
    step = _check(37.0, 37.4)
    load = MemoryCheck(**{**step.__dict__, "phase": "load", "predicted_bytes": 6.24e9,
                          "traced_bytes": int(6.24e9), "host_bytes": 0.07e9})
    export = MemoryCheck(**{**step.__dict__, "phase": "export", "predicted_bytes": 50e9,
                            "traced_bytes": int(50e9), "host_bytes": 4.24e9})
    lines = render_checks([step, load, export]).splitlines()
    assert lines[0].split()[:2] == ["stage", "phase"] and "host" in lines[0].split()
    assert lines[1].split()[:2] == ["1m", "step"] and lines[1].split()[-2:] == ["-", "fits"]
    assert lines[1].split()[9] == "full"  # the step's policy; the other phases have none
    assert lines[2].split()[:2] == ["1m", "load"] and lines[2].split()[9] == "-"
    assert "0.1GB" in lines[2].split()
    assert lines[3].split()[:2] == ["1m", "export"] and "4.2GB" in lines[3].split()
    assert lines[3].endswith("DOES NOT FIT (48 GB GPU)")  # 50 GB traced + 4 GB reserve


# Qwen3-4B's attention and embeddings (Qwen/Qwen3-4B config.json): head_dim 128 beside hidden
# 2560 / 32 heads = 80, QK-norm, tied embeddings, GQA 4:1; on the Qwen2.5 recipe's stages. Its
# MLP is Qwen2.5-7B's (18,944), not its own 9,728: with that narrow MLP the traced step peaks in
# the optimizer step (a plain Llama of the same shape too), which the cost model does not price
# (docs/planning.md, "Model families"); this keeps the peak in the decoder layer it does price.
QWEN3_4B = {"architecture": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
            "intermediate_size": 18944, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "attention_bias": False,
            "tie_word_embeddings": True}


def _family_run(tmp_path, family: str) -> Path:
    """A RunSpec file of each family's shape: the shipped Qwen2.5-7B and Mistral-7B configs, and
    a Qwen3 one (QWEN3_4B) written from the Qwen2.5 config."""
    import yaml

    if family != "qwen3":
        return ROOT / "configs" / f"{family}.yaml"
    spec = yaml.safe_load((ROOT / "configs" / "qwen2.5-7b-1m.yaml").read_text())
    spec["model"].update(QWEN3_4B)
    spec["resources"]["cluster"] = str(ROOT / "configs" / spec["resources"]["cluster"])
    path = tmp_path / "qwen3-4b.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("family", ["qwen2.5-7b-1m", "mistral-7b-1m", "qwen3"])
def test_each_familys_step_trace_matches_the_cost_model(tmp_path, family):
    """The memory model from the config (q/k/v biases, tied embeddings, head_dim != hidden /
    heads, QK-norm, the GQA ratio) against the trace of the family's own model, two decoder
    layers deep at its 65k layout: the sharded weights exactly, the peak within 10%."""
    config = _family_run(tmp_path, family)
    trace, parts, predicted = _traced_65k_at_ring_8(config, timeout=180)
    assert trace["parts"]["_FSDPRefType.SHARDED_PARAM"] == pytest.approx(
        parts["weights (sharded)"], rel=1e-3)
    assert abs(predicted - trace["peak_bytes"]) / trace["peak_bytes"] < 0.10


@pytest.mark.parametrize("family", ["qwen2.5-7b-1m", "qwen3"])
def test_each_familys_load_and_export_trace_as_the_cost_model_predicts(tmp_path, family):
    """The load and export phases price the family's own weight list (biases, QK-norm, one
    tied embedding): topology.cost.parameter_shapes, which the load reads slice by slice."""
    run = _shallow(load_model(_family_run(tmp_path, family), RunSpec), 2)
    _load_and_export_as_predicted(run, ParallelDims(ring=8), rel=1e-3)
