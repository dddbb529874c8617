"""Memory per GPU at real scale without the hardware: the trainer's own parallelize() traced.

One rank of the stage's world runs two training steps of a full-size model under torch's
FakeTensorMode (tensors have shapes and dtypes, no storage) on a fake process group (collectives
do nothing), while torch's FSDPMemTracker counts every tensor alive by category: sharded and
unsharded parameters and gradients, optimizer state, activations, temporaries, all-gather and
reduce-scatter buffers. This is how torchtitan estimates memory. What it cannot see: kernel
workspaces (flash-attn, cuBLAS), the CUDA caching allocator's fragmentation and the NCCL and
CUDA context, which the planner's profile reserves separately (`memory_reserve_bytes`).

A full-depth trace takes about 4 s a layer here, longer on long rings, so `ringpilot plan
--verify-memory` traces each stage at TRACE_DEPTHS layers on a ring of at most TRACE_RING
(`equivalent_layout`: the same tensors per GPU) and extrapolates per layer (`trace_stage_peak`).

    python -m ray_jobs.train.memory --run configs/llama3-8b-1m.yaml --stage 65k --ring 8 --shard 8

with --policy attention (or none) to trace another activation checkpointing policy than full,
--phase load or export to trace the stage's loading or its Hugging Face export instead of its
step (seconds, no training step: `trace_load_memory`, `trace_export_memory`; the host memory
of those phases is the cost model's, topology.cost.lifecycle_memory, not traced).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore

from ray_jobs.ring_attention.families import causal_lm_class
from ray_jobs.ring_attention.rope import apply_exact_rope
from ray_jobs.train.checkpoint import export_state_dict
from ray_jobs.train.model import (
    READ_CHUNK_BYTES,
    build_meta_model,
    fill_parameters,
    hf_parameters,
    llama_config,
    materialize,
)
from ray_jobs.train.parallelize import (
    build_mesh,
    build_optimizer,
    clip_gradients,
    compute_dtype_of,
    parallelize,
    ring_mean_loss,
)
from specs.degrees import CHECKPOINT_POLICIES, CheckpointPolicy, ParallelDims
from specs.loading import load_or_report
from specs.plan import Plan
from specs.run import RunSpec, StageSpec
from topology.cost import (
    GB,
    StageShape,
    lifecycle_memory,
    memory_per_gpu,
    policy_without_memory_model,
)
from topology.profile import HardwareProfile, get_profile


@dataclass(frozen=True)
class MemoryTrace:
    """The peak of one rank's tracked memory and what it was made of at that moment."""

    peak_bytes: int
    parts: dict[str, int]  # FSDPMemTracker's categories at the peak, bytes
    layers: int  # decoder layers traced (the model's, unless a test asked for fewer)
    seconds: float  # wall time of the trace
    traced_as: str = ""  # the equivalent layout traced, when not the stage's own
    extrapolated_from: tuple[int, ...] = ()  # depths traced, when `layers` is extrapolated


TRACE_RING = 8  # rings longer than this are traced as their equivalent on a ring this long
# Decoder layers traced; the peak is extrapolated per layer from them. From 3 layers on the
# peak grows by the same bytes per layer (8B, 70B, tiny: all policies); at 1 or 2 it sits in
# another phase of the step and the slope is wrong (70B 65k: 1.9 GB a layer from 2 to 3, 0.21
# from 3 on).
TRACE_DEPTHS = (4, 6)
TRACE_TOLERANCE = 0.10  # trace vs cost model, as the tests and benchmarks/memory.py hold it


def equivalent_ring(ring: int, max_ring: int) -> int:
    """The ring length a ring of `ring` is traced on: itself up to `max_ring`, else its longest
    divisor from 2 to `max_ring` (a ring of one exchanges nothing: not the same buffers)."""
    if ring <= max_ring:
        return ring
    return max((r for r in range(2, max_ring + 1) if ring % r == 0), default=ring)


def equivalent_layout(stage: StageSpec, dims: ParallelDims, max_ring: int
                      ) -> tuple[StageSpec, ParallelDims]:
    """The same per-GPU work on a shorter ring: a ring of `equivalent_ring` over 1/k of the
    sequence, with k times the shard slots, so every tensor a rank holds has the same shape
    (tokens per GPU, K/V blocks, heads per Ulysses rank, shard group, sequences per ring) and the
    world is the same size; only the ring's loop is shorter. The trace's time grows with the
    ring, its memory does not (tests/train/test_memory_trace.py traces both)."""
    ring = equivalent_ring(dims.ring, max_ring)
    if ring == dims.ring:
        return stage, dims
    k = dims.ring // ring
    short = ParallelDims(dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard * k, ring=ring,
                         ulysses=dims.ulysses)
    per_ring = stage.batch_size // dims.dp
    return stage.model_copy(update={"seq_len": stage.seq_len // k,
                                    "batch_size": per_ring * short.dp}), short


def per_gpu_shapes(stage: StageSpec, dims: ParallelDims) -> dict[str, int]:
    """What sets the size of every tensor one rank holds: an equivalent layout keeps these."""
    return {"tokens_per_gpu": stage.seq_len // dims.sequence,
            "sequences_per_ring": stage.batch_size // dims.dp,
            "shard_group": dims.shard, "ulysses": dims.ulysses,
            "grad_accum_steps": stage.grad_accum_steps, "world": dims.world}


def trace_stage_memory(run: RunSpec, stage: StageSpec, dims: ParallelDims, *,
                       policy: CheckpointPolicy = "full", layers: int | None = None,
                       max_ring: int | None = None) -> MemoryTrace:
    """Trace two optimizer steps of `stage` on rank 0 of `dims` (micro-steps: up to two of the
    stage's gradient accumulation), as the trainer runs it on run.resources.device. With
    `max_ring`, a longer ring is traced as its equivalent_layout (the trace's time grows with
    the ring, its memory does not). Needs a process without a process group; it leaves none."""
    if dist.is_initialized():
        raise RuntimeError("trace_stage_memory needs a process without a process group: it "
                           "creates a fake one of the stage's world size")
    if dims.ulysses > 1:  # its layout check reads gathered values, which fake tensors lack
        raise ValueError(f"stage {stage.name!r}: tracing a Ulysses layout ({dims.describe()}) "
                         "is not supported yet; the cost model's memory for it is untraced")
    traced_as = ""
    if max_ring is not None and equivalent_ring(dims.ring, max_ring) != dims.ring:
        stage, dims = equivalent_layout(stage, dims, max_ring)
        traced_as = (f"ring {dims.ring} over {stage.seq_len:,} tokens, {dims.shard}-GPU shard "
                     "group (the same tensors per GPU)")
    t0 = time.perf_counter()
    local_tokens = stage.seq_len // dims.ring
    per_ring = stage.batch_size // dims.dp
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dims.world)
    try:
        # The mesh is built outside FakeTensorMode (inside it, DeviceMesh fails).
        layout = build_mesh(dims, [list(range(i * dims.ring, (i + 1) * dims.ring))
                                   for i in range(dims.dp)], "cpu")
        model, training = run.model, run.training
        with FakeTensorMode():
            config = llama_config(model, stage.seq_len, plain_rope(model))
            if layers is not None:
                config.num_hidden_layers = layers
            # parallelize() switches a ring's attention to "ring" and binds it to the ring
            config._attn_implementation = "sdpa"
            default = torch.get_default_dtype()
            # Built in the storage dtype directly: .to(dtype) swaps tensors, which fake ones
            # do not support.
            torch.set_default_dtype(getattr(torch, model.dtype))
            try:
                hf = causal_lm_class(config.model_type)(config)
                apply_exact_rope(hf)  # as the trainer's apply_rope: cos/sin in fp32
            finally:
                torch.set_default_dtype(default)
            root = parallelize(hf, layout, mixed_precision=compute_dtype_of(run),
                               activation_checkpointing=policy,
                               loss_chunk_tokens=training.loss_chunk_tokens)
            opt = build_optimizer(root, lr=1e-5)
            tokens = torch.zeros(per_ring, local_tokens, dtype=torch.long)
            positions = torch.arange(local_tokens).unsqueeze(0).expand(per_ring, -1)
            tracker = FSDPMemTracker(root, opt)
            tracker.track_inputs((tokens, positions))
            with tracker:
                for _ in range(2):
                    for _ in range(min(stage.grad_accum_steps, 2)):
                        loss = ring_mean_loss(*root(tokens, positions, tokens), layout.ring)
                        loss.backward()
                        tracker.reset_mod_stats()  # per-module stats; the peak is kept
                    clip_gradients(root, training.grad_clip)
                    opt.step()
                    opt.zero_grad()
            peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    finally:
        dist.destroy_process_group()
    parts = {str(k): int(v) for k, v in peak.items() if str(k) != "Total"}
    return MemoryTrace(peak_bytes=int(peak["Total"]), parts=parts,
                       layers=config.num_hidden_layers, seconds=time.perf_counter() - t0,
                       traced_as=traced_as)


def trace_stage_peak(run: RunSpec, stage: StageSpec, dims: ParallelDims, *,
                     policy: CheckpointPolicy = "full", depths: tuple[int, int] = TRACE_DEPTHS,
                     max_ring: int | None = TRACE_RING) -> MemoryTrace:
    """The full-depth peak without tracing every layer: two shallow traces (`depths` decoder
    layers, longer rings as their equivalent_layout) extrapolated per layer to the model's
    depth, category by category. Assumes what the trainer's layout makes so: each decoder layer
    adds the same bytes at the peak (its sharded weights, gradients and AdamW state; its
    checkpointed input, or under `attention` its kept output and log-sum-exp), the rest
    (embedding, head, loss, one layer's recomputation) does not grow with depth. A model no
    deeper than `depths` is traced whole."""
    full, (lo, hi) = run.model.num_hidden_layers, depths
    if not 0 < lo < hi:
        raise ValueError(f"depths {depths}: give two layer counts, the first smaller")
    if full <= hi:
        return trace_stage_memory(run, stage, dims, policy=policy, max_ring=max_ring)
    a, b = (trace_stage_memory(run, stage, dims, policy=policy, layers=n, max_ring=max_ring)
            for n in depths)

    def at_full(x: int, y: int) -> int:
        return round(y + (y - x) * (full - hi) / (hi - lo))

    return MemoryTrace(peak_bytes=at_full(a.peak_bytes, b.peak_bytes),
                       parts={k: at_full(a.parts.get(k, 0), v) for k, v in b.parts.items()},
                       layers=full, seconds=a.seconds + b.seconds, traced_as=b.traced_as,
                       extrapolated_from=depths)


LIFECYCLE_TRACED = ("load", "export")  # the phases besides the step that verify-memory traces


@contextmanager
def _fake_world(dims: ParallelDims):
    """A fake process group of the layout's world (rank 0) and its mesh on the CPU."""
    if dist.is_initialized():
        raise RuntimeError("a memory trace needs a process without a process group: it "
                           "creates a fake one of the stage's world size")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dims.world)
    try:
        # The mesh is built outside FakeTensorMode (inside it, DeviceMesh fails).
        yield build_mesh(dims, [list(range(i * dims.ring, (i + 1) * dims.ring))
                                for i in range(dims.dp)], "cpu")
    finally:
        dist.destroy_process_group()


def _sharded_meta_model(run: RunSpec, stage: StageSpec, layout, layers: int | None):
    """The trainer's step 3 up to materialize: the model on the meta device, parallelized."""
    model = run.model
    config = llama_config(model, stage.seq_len, plain_rope(model))
    if layers is not None:
        config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"
    hf = build_meta_model(config, getattr(torch, model.dtype))
    root = parallelize(hf, layout, mixed_precision=compute_dtype_of(run),
                       activation_checkpointing=policy_without_memory_model(stage),
                       loss_chunk_tokens=run.training.loss_chunk_tokens)
    return hf, root


@contextmanager
def _materialized_model(run: RunSpec, stage: StageSpec, dims: ParallelDims, layers: int | None):
    """(hf, root, fake mode) on a fake world of `dims`: the trainer's step 3 through
    materialize, the shards given fake storage."""
    with _fake_world(dims) as layout:
        hf, root = _sharded_meta_model(run, stage, layout, layers)
        # meta tensors are real ones to FakeTensorMode: allow them as inputs of to_empty
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            materialize(hf, "cpu", plain_rope(run.model), stage.seq_len,
                        run.model.pretrain_seq_len)
        yield hf, root, mode


def _peak(tracker: FSDPMemTracker) -> tuple[int, dict[str, int]]:
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return int(peak["Total"]), {str(k): int(v) for k, v in peak.items() if str(k) != "Total"}


def trace_load_memory(run: RunSpec, stage: StageSpec, dims: ParallelDims, *,
                      layers: int | None = None,
                      chunk_bytes: int = READ_CHUNK_BYTES) -> MemoryTrace:
    """Trace a stage's load on rank 0 of `dims` with the trainer's own code: build_meta_model,
    parallelize, materialize (fake storage), then load_hf_weights's fill loop
    (model.fill_parameters) with the safetensors reader replaced by fake slices of the shapes
    and storage dtype it would return. The peak counts the sharded weights and the slice read
    (on the CPU trace both sit on the one device). Needs a process without a process group."""
    t0 = time.perf_counter()
    with _materialized_model(run, stage, dims, layers) as (hf, root, _):
        params = hf_parameters(hf)

        def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
            # made from a fake tensor, outside the fake mode, so the tracker sees it (the
            # placements fill_parameters reads use the real mesh: not under the fake mode)
            local = params[name].to_local() if hasattr(params[name], "to_local") else params[name]
            return local.new_empty([i.stop - i.start for i in index])

        tracker = FSDPMemTracker(root)
        with tracker:
            fill_parameters(params, read, chunk_bytes=chunk_bytes)
        peak, parts = _peak(tracker)
    return MemoryTrace(peak_bytes=peak, parts=parts, layers=hf.config.num_hidden_layers,
                       seconds=time.perf_counter() - t0)


def trace_export_memory(run: RunSpec, stage: StageSpec, dims: ParallelDims, *,
                        layers: int | None = None) -> MemoryTrace:
    """Trace a stage's Hugging Face export on rank 0 of `dims`: the model built, sharded and
    materialized as the trainer does, one AdamW step (gradients set to zeros: the state
    an optimizer step leaves, without tracing a training step), zero_grad(set_to_none=True),
    then, tracked, the export's state dict. What HuggingFaceStorageWriter and the consolidation
    then hold is host memory: modelled (topology.cost.lifecycle_memory), not traced."""
    t0 = time.perf_counter()
    with _materialized_model(run, stage, dims, layers) as (hf, root, mode):
        with mode:
            opt = build_optimizer(root, lr=1e-5)
            for p in root.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        tracker = FSDPMemTracker(root, opt)
        with tracker:
            state = export_state_dict(hf)  # what write_hf_export is handed
            del state
        peak, parts = _peak(tracker)
    return MemoryTrace(peak_bytes=peak, parts=parts, layers=hf.config.num_hidden_layers,
                       seconds=time.perf_counter() - t0)


def trace_phase_peak(phase: str, run: RunSpec, stage: StageSpec, dims: ParallelDims, *,
                     depths: tuple[int, int] | None = TRACE_DEPTHS) -> MemoryTrace:
    """`phase` ("load" or "export") traced at `depths` decoder layers and extrapolated per
    layer to the model's depth (each layer adds its shard of weights, and for export of AdamW
    state; the read chunk does not grow), or whole when `depths` is None or the model is no
    deeper."""
    trace = {"load": trace_load_memory, "export": trace_export_memory}[phase]
    full = run.model.num_hidden_layers
    if depths is None or full <= depths[1]:
        return trace(run, stage, dims)
    lo, hi = depths
    a, b = (trace(run, stage, dims, layers=n) for n in depths)

    def at_full(x: int, y: int) -> int:
        return round(y + (y - x) * (full - hi) / (hi - lo))

    return MemoryTrace(peak_bytes=at_full(a.peak_bytes, b.peak_bytes),
                       parts={k: at_full(a.parts.get(k, 0), v) for k, v in b.parts.items()},
                       layers=full, seconds=a.seconds + b.seconds, extrapolated_from=depths)


def predicted_phase_bytes(run: RunSpec, stage: StageSpec, dims: ParallelDims, phase: str,
                          profile: HardwareProfile) -> tuple[float, float, float]:
    """The cost model's peak of `phase` per GPU (reserve excluded), the reserve, and the peak
    per rank's host process (topology.cost.lifecycle_memory)."""
    sides = lifecycle_memory(StageShape.of(run, stage, dims), profile)[phase]
    reserve = sum(v for k, v in sides["device"].items() if k.startswith("reserve"))
    return sum(sides["device"].values()) - reserve, reserve, sum(sides["host"].values())


def predicted_step_bytes(run: RunSpec, stage: StageSpec, dims: ParallelDims,
                         policy: CheckpointPolicy | None, profile: HardwareProfile
                         ) -> tuple[float, float]:
    """The cost model's peak per GPU of a training step, (reserve excluded, the reserve)."""
    parts = memory_per_gpu(StageShape.of(run, stage, dims, policy), profile)
    reserve = sum(v for k, v in parts.items() if k.startswith("reserve"))
    return sum(parts.values()) - reserve, reserve


@dataclass(frozen=True)
class MemoryCheck:
    """One stage's predicted peak per GPU (cost model, reserve excluded) against its trace, in
    one phase of the stage's life: "step" (a training step), "load" (the model built, sharded
    and filled from a Hugging Face checkpoint) or "export" (the stage's final checkpoint
    written as Hugging Face files). `host_bytes`: the cost model's peak per rank's host
    process in that phase (modelled, not traced)."""

    stage: str
    layout: str
    policy: CheckpointPolicy  # activation checkpointing, as planned
    predicted_bytes: float
    traced_bytes: int
    reserve_bytes: float
    gpu_bytes: float
    trace_seconds: float
    phase: str = "step"
    traced_as: str = ""  # how it was traced, when not layer by layer on the planned ring
    host_bytes: float | None = None

    @property
    def error(self) -> float:
        return (self.predicted_bytes - self.traced_bytes) / self.traced_bytes

    @property
    def peak_bytes(self) -> float:
        """The larger of the two estimates, with the reserve: what the verdict is about."""
        return max(self.predicted_bytes, self.traced_bytes) + self.reserve_bytes

    @property
    def margin_bytes(self) -> float:
        """How far the real peak may sit above `peak_bytes`: the larger of the documented
        tolerance (TRACE_TOLERANCE) and this stage's own trace-vs-model error, of the tensors'
        bytes (the reserve is a budget, not an estimate)."""
        return max(TRACE_TOLERANCE, abs(self.error)) * (self.peak_bytes - self.reserve_bytes)

    @property
    def verdict(self) -> str:
        """"fits", "at the limit" (the GPU holds the peak but not its margin) or "does not
        fit"; only "fits" passes."""
        if self.peak_bytes > self.gpu_bytes:
            return "does not fit"
        return "at the limit" if self.peak_bytes + self.margin_bytes > self.gpu_bytes else "fits"

    @property
    def fits(self) -> bool:
        return self.verdict == "fits"


def describe_tracing(depths: tuple[int, int] | None, max_ring: int | None) -> str:
    """The assumptions a verify-memory table rests on, one sentence each, for its caption."""
    out = []
    if depths is not None:
        out.append(f"Each stage is traced at {depths[0]} and {depths[1]} decoder layers and its "
                   "peak extrapolated per layer to the model's depth (each layer adds the same "
                   "bytes: its shard of weights, gradients and optimizer state, its kept "
                   "activations).")
    if max_ring is not None:
        out.append(f"Rings longer than {max_ring} are traced as their equivalent on a ring of "
                   f"at most {max_ring} (the same tokens per GPU and shard group: the same "
                   "tensors per GPU, a shorter loop).")
    out.append("Load and export rows trace the trainer's own loading (meta build, parallelize, "
               "materialize, load_hf_weights's read loop on fake slices) and export (the state "
               "an AdamW step leaves, the export's state dict) on the planned layout; their "
               "host column (per rank process) is modelled from torch's and safetensors' "
               "code (the staged file share and its serialised bytes, the consolidated full "
               "tensor, the read chunk), not traced.")
    return " ".join(out)


def verify_plan_memory(run: RunSpec, plan: Plan, *, layers: int | None = None,
                       depths: tuple[int, int] | None = TRACE_DEPTHS,
                       max_ring: int | None = TRACE_RING,
                       phases: tuple[str, ...] = LIFECYCLE_TRACED,
                       progress: Callable[[str], None] | None = None) -> list[MemoryCheck]:
    """Trace every planned stage's layout under its planned activation checkpointing policy
    and set it beside the cost model's peak for the same shape and policy. By default each
    stage is traced shallow and on a short ring and extrapolated (trace_stage_peak: minutes
    for 70B, where layer by layer on a ring of 128 took hours); `depths=None, max_ring=None`
    traces every layer on the planned ring. `layers`: a shallower model for both the trace and
    the cost model, traced whole, for quick checks. Each stage's step row is followed by one row
    per phase of `phases` ("load", "export": fast, no training step). `progress` gets a line
    as each stage starts and finishes, and one for its other phases."""
    if layers is not None:
        run = run.model_copy(update={"model": run.model.model_copy(
            update={"num_hidden_layers": layers})})
        depths = None
    profile = get_profile(plan.profile or "l40s")
    say = progress or (lambda line: None)
    checks = []
    for i, stage_plan in enumerate(plan.stages, 1):
        stage = next(s for s in run.stages if s.name == stage_plan.name)
        dims, policy = stage_plan.dims, stage_plan.activation_checkpointing
        short = equivalent_layout(stage, dims, max_ring)[1] if max_ring else dims
        how = (f"ring {short.ring} x dp {short.dp}" if short != dims else "the planned ring")
        how += (f", {depths[0]} and {depths[1]} of {run.model.num_hidden_layers} layers"
                if depths and run.model.num_hidden_layers > depths[1]
                else f", all {run.model.num_hidden_layers} layers")
        say(f"stage {stage.name} ({i}/{len(plan.stages)}): tracing {dims.describe()} as "
            f"{how}, {policy} checkpointing")
        if depths is None:
            trace = trace_stage_memory(run, stage, dims, policy=policy, max_ring=max_ring)
        else:
            trace = trace_stage_peak(run, stage, dims, policy=policy, depths=depths,
                                     max_ring=max_ring)
        predicted, reserve = predicted_step_bytes(run, stage, dims, policy, profile)
        check = MemoryCheck(
            stage=stage.name, layout=dims.describe(), policy=policy, predicted_bytes=predicted,
            traced_bytes=trace.peak_bytes, reserve_bytes=reserve, gpu_bytes=profile.hbm_bytes,
            trace_seconds=trace.seconds, traced_as=how)
        checks.append(check)
        say(f"stage {stage.name} ({i}/{len(plan.stages)}): traced {trace.peak_bytes / GB:.1f} GB "
            f"per GPU in {trace.seconds:.1f} s: {check.verdict}")
        done = []
        for phase in phases:
            trace = trace_phase_peak(phase, run, stage, dims, depths=depths)
            predicted, reserve, host = predicted_phase_bytes(run, stage, dims, phase, profile)
            how = (f"{depths[0]} and {depths[1]} of {run.model.num_hidden_layers} layers"
                   if trace.extrapolated_from else f"all {run.model.num_hidden_layers} layers")
            checks.append(MemoryCheck(
                stage=stage.name, layout=dims.describe(), policy=policy,
                predicted_bytes=predicted, traced_bytes=trace.peak_bytes, reserve_bytes=reserve,
                gpu_bytes=profile.hbm_bytes, trace_seconds=trace.seconds, phase=phase,
                traced_as=f"the planned layout, {how}", host_bytes=host))
            done.append(f"{phase} {trace.peak_bytes / GB:.1f} GB in {trace.seconds:.1f} s: "
                        f"{checks[-1].verdict}")
        if done:
            say(f"stage {stage.name} ({i}/{len(plan.stages)}): traced " + ", ".join(done))
    return checks


def render_checks(checks: list[MemoryCheck]) -> str:
    """The table `ringpilot plan --verify-memory` prints: one row per stage and phase; `host`
    is the cost model's peak per rank's host process (modelled; "-" where not priced)."""
    lines = [f"{'stage':<7}{'phase':<8}{'layout':<46}{'policy':<11}{'predicted':>11}"
             f"{'traced':>9}{'error':>8}{'peak+reserve':>14}{'margin':>9}{'host':>9}  verdict"]
    for c in checks:
        verdict = c.verdict if c.fits else f"{c.verdict.upper()} ({c.gpu_bytes / GB:.0f} GB GPU)"
        host = "-" if c.host_bytes is None else f"{c.host_bytes / GB:.1f}GB"
        policy = c.policy if c.phase == "step" else "-"  # checkpointing acts in a step only
        lines.append(f"{c.stage:<7}{c.phase:<8}{c.layout:<46}{policy:<11}"
                     f"{c.predicted_bytes / GB:>9.1f}GB{c.traced_bytes / GB:>7.1f}GB"
                     f"{c.error:>+8.1%}{c.peak_bytes / GB:>12.1f}GB{c.margin_bytes / GB:>7.1f}GB"
                     f"{host:>9}  {verdict}")
    return "\n".join(lines)


def plain_rope(model) -> dict:
    """The base model's plain RoPE: a stage's rotary tables are a few KB, whatever the method."""
    return {"rope_type": "default", "rope_theta": model.rope_theta}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.train.memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="RunSpec YAML")
    parser.add_argument("--stage", required=True, help="stage name")
    parser.add_argument("--ring", type=int, required=True, help="ring degree")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel degree")
    parser.add_argument("--shard", type=int, help="shard degree (default: the ring)")
    parser.add_argument("--layers", type=int, help="trace fewer decoder layers (tests)")
    parser.add_argument("--policy", choices=CHECKPOINT_POLICIES, default="full",
                        help="activation checkpointing policy (default: full)")
    parser.add_argument("--phase", choices=("step", *LIFECYCLE_TRACED), default="step",
                        help="the phase traced (default: step)")
    args = parser.parse_args(argv)
    run = load_or_report(args.run, RunSpec)
    if run is None:
        return 2
    stage = next((s for s in run.stages if s.name == args.stage), None)
    if stage is None:
        print(f"--stage: no stage {args.stage!r} (stages: "
              f"{', '.join(s.name for s in run.stages)})", file=sys.stderr)
        return 2
    try:
        dims = ParallelDims.of(args.ring, args.dp, args.shard or args.ring)
    except ValueError as e:
        print(f"--ring/--dp/--shard: {e}", file=sys.stderr)
        return 2
    if args.phase == "step":
        trace = trace_stage_memory(run, stage, dims, policy=args.policy, layers=args.layers)
    else:
        trace = (trace_load_memory if args.phase == "load" else trace_export_memory)(
            run, stage, dims, layers=args.layers)
    print(json.dumps(asdict(trace)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

