"""Memory per GPU at real scale without the hardware: the trainer's own parallelize() traced.

One rank of the stage's world runs two training steps of a full-size Llama under torch's
FakeTensorMode (tensors have shapes and dtypes, no storage) on a fake process group (collectives
do nothing), while torch's FSDPMemTracker counts every tensor alive by category: sharded and
unsharded parameters and gradients, optimizer state, activations, temporaries, all-gather and
reduce-scatter buffers. This is how torchtitan estimates memory. What it cannot see: kernel
workspaces (flash-attn, cuBLAS), the CUDA caching allocator's fragmentation and the NCCL and
CUDA context, which the planner's profile reserves separately (`memory_reserve_bytes`).

    python -m ray_jobs.train.memory --run configs/llama3-8b-1m.yaml --stage 65k --ring 8 --shard 8

with --policy attention (or none) to trace another activation checkpointing policy than full.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore

from ray_jobs.train.model import llama_config
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
from topology.cost import GB, StageShape, memory_per_gpu
from topology.profile import get_profile


@dataclass(frozen=True)
class MemoryTrace:
    """The peak of one rank's tracked memory and what it was made of at that moment."""

    peak_bytes: int
    parts: dict[str, int]  # FSDPMemTracker's categories at the peak, bytes
    layers: int  # decoder layers traced (the model's, unless a test asked for fewer)
    seconds: float  # wall time of the trace
    traced_as: str = ""  # the equivalent layout traced, when not the stage's own


def equivalent_layout(stage: StageSpec, dims: ParallelDims, ring: int
                      ) -> tuple[StageSpec, ParallelDims]:
    """The same per-GPU work on a shorter ring: a ring of `ring` over 1/k of the sequence, with
    k times the shard slots, so every tensor a rank holds has the same shape (tokens per GPU,
    K/V blocks, shard group, sequences per ring); only the ring's loop is shorter."""
    if dims.ring <= ring or dims.ring % ring:
        return stage, dims
    k = dims.ring // ring
    short = ParallelDims(dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard * k, ring=ring)
    per_ring = stage.batch_size // dims.dp
    return stage.model_copy(update={"seq_len": stage.seq_len // k,
                                    "batch_size": per_ring * short.dp}), short


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
    if max_ring is not None and dims.ring > max_ring:
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
            config = llama_config(model, stage.seq_len, model.rope_theta)
            if layers is not None:
                config.num_hidden_layers = layers
            # parallelize() switches a ring's attention to "ring" and binds it to the ring
            config._attn_implementation = "sdpa"
            default = torch.get_default_dtype()
            # Built in the storage dtype directly: .to(dtype) swaps tensors, which fake ones
            # do not support.
            torch.set_default_dtype(getattr(torch, model.dtype))
            try:
                from transformers import LlamaForCausalLM

                hf = LlamaForCausalLM(config)
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


@dataclass(frozen=True)
class MemoryCheck:
    """One stage's predicted peak (cost model, reserve excluded) against its trace."""

    stage: str
    layout: str
    policy: CheckpointPolicy  # activation checkpointing, as planned
    predicted_bytes: float
    traced_bytes: int
    reserve_bytes: float
    gpu_bytes: float
    trace_seconds: float

    @property
    def error(self) -> float:
        return (self.predicted_bytes - self.traced_bytes) / self.traced_bytes

    @property
    def fits(self) -> bool:
        return self.traced_bytes + self.reserve_bytes <= self.gpu_bytes


def verify_plan_memory(run: RunSpec, plan: Plan, *, layers: int | None = None
                       ) -> list[MemoryCheck]:
    """Trace every planned stage's layout under its planned activation checkpointing policy
    and set it beside the cost model's peak for the same shape and policy (`layers`: a
    shallower model for both, for quick checks)."""
    if layers is not None:
        run = run.model_copy(update={"model": run.model.model_copy(
            update={"num_hidden_layers": layers})})
    profile = get_profile(plan.profile or "l40s")
    checks = []
    for stage_plan in plan.stages:
        stage = next(s for s in run.stages if s.name == stage_plan.name)
        dims, policy = stage_plan.dims, stage_plan.activation_checkpointing
        trace = trace_stage_memory(run, stage, dims, policy=policy)
        parts = memory_per_gpu(StageShape.of(run, stage, dims, policy), profile)
        reserve = sum(v for k, v in parts.items() if k.startswith("reserve"))
        checks.append(MemoryCheck(
            stage=stage.name, layout=dims.describe(), policy=policy,
            predicted_bytes=sum(parts.values()) - reserve,
            traced_bytes=trace.peak_bytes, reserve_bytes=reserve, gpu_bytes=profile.hbm_bytes,
            trace_seconds=trace.seconds))
    return checks


def render_checks(checks: list[MemoryCheck]) -> str:
    """The table `ringpilot plan --verify-memory` prints."""
    lines = [f"{'stage':<8}{'layout':<46}{'policy':<11}{'predicted':>11}{'traced':>9}{'error':>8}"
             f"{'+reserve':>10}  fits?"]
    for c in checks:
        lines.append(f"{c.stage:<8}{c.layout:<46}{c.policy:<11}{c.predicted_bytes / GB:>9.1f}GB"
                     f"{c.traced_bytes / GB:>7.1f}GB{c.error:>+8.1%}"
                     f"{(c.traced_bytes + c.reserve_bytes) / GB:>8.1f}GB  "
                     f"{'yes' if c.fits else f'NO (> {c.gpu_bytes / GB:.0f} GB)'}")
    return "\n".join(lines)


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
    trace = trace_stage_memory(run, stage, dims, policy=args.policy, layers=args.layers)
    print(json.dumps(asdict(trace)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
