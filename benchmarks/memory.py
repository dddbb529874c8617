"""Benchmark the memory model against ground truth, and FSDP2 against DDP on the tiny model.

    .venv/bin/python benchmarks/memory.py --max-ring 8   # full depth; run time: RESULTS.md
    .venv/bin/python benchmarks/memory.py --layers 2     # reduced depth, a few minutes

1. memory_model_error_max: for Llama-3 8B and 70B, every published stage at the layout and
   activation checkpointing policy the planner chooses on its cluster
   (configs/llama3-{8b,70b}-1m.yaml), the cost model's peak per
   GPU (reserve excluded) against an FSDPMemTracker trace of the trainer's own parallelize()
   under FakeTensorMode on a fake process group (ray_jobs.train.memory): max |predicted - traced| /
   traced. trace_seconds_8b: the wall time of the first 8B trace.
   lifecycle_peak_error_max: the same for the load and export phases of every one of those
   stages (ray_jobs.train.memory.trace_load_memory / trace_export_memory, at TRACE_DEPTHS
   layers extrapolated per layer, or at --layers): max |predicted - traced| / traced of the
   peak per GPU. Their host memory is the cost model's only (printed, not traced).
   `--lifecycle-only` runs just this part (seconds per stage).
2. memory_model_error_tiny: the tiny default's last stage (4K tokens, one ring of 2, FSDP2 over
   both) on 2 gloo processes: the peak rise of each process's resident set from just before the
   model is built to the end of the training steps (VmHWM after a reset through
   /proc/self/clear_refs, minus VmRSS then) against the cost model's prediction for that shape
   on CPU (fp32). Measured with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_), so a
   freed tensor's pages go back to the OS and the resident set follows live tensors; the rise
   under glibc's default (freed blocks kept in the heap, like a caching allocator's reserve) is
   printed beside it.
3. fsdp_step_ratio_vs_ddp: tokens/s of that tiny stage through parallelize() (FSDP2, the
   stage's activation checkpointing policy, chunked loss) over the same ring with the model
   replicated under
   DistributedDataParallel and a full-logits loss (the trainer before FSDP2), same processes.
Last line: one JSON object. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ray_jobs.train.memory import (  # noqa: E402
    LIFECYCLE_TRACED,
    TRACE_DEPTHS,
    predicted_phase_bytes,
    predicted_step_bytes,
    trace_phase_peak,
    trace_stage_memory,
)
from specs.degrees import ParallelDims  # noqa: E402
from specs.loading import load_model  # noqa: E402
from specs.run import RunSpec  # noqa: E402
from tests.support.worlds import run_world  # noqa: E402
from topology.profile import get_profile  # noqa: E402
from topology.run_plan import plan_from_workers, plan_run  # noqa: E402
from topology.sources import load_cluster  # noqa: E402

GB = 1e9


def predicted_bytes(run: RunSpec, stage, dims: ParallelDims, policy: str | None = None) -> float:
    return predicted_step_bytes(run, stage, dims, policy, get_profile("l40s"))[0]


def scale_rows(layers: int | None, max_ring: int | None) -> tuple[list[dict], float]:
    rows, first_8b = [], None
    # with `layers` the cost model sees the same shallow model as the trace
    for name, run, plan in _recipes(layers):
        for sp in plan.stages:
            stage = next(s for s in run.stages if s.name == sp.name)
            dims = sp.dims
            policy = sp.activation_checkpointing  # the plan's, as the trainer applies it
            trace = trace_stage_memory(run, stage, dims, policy=policy, max_ring=max_ring)
            pred = predicted_bytes(run, stage, dims, policy)
            rows.append({"model": name, "stage": sp.name, "layout": dims.describe(),
                         "checkpointing": policy,
                         "layers": trace.layers, "predicted_gb": pred / GB,
                         "traced_gb": trace.peak_bytes / GB,
                         "error": (pred - trace.peak_bytes) / trace.peak_bytes,
                         "trace_s": trace.seconds, "traced_as": trace.traced_as})
            if first_8b is None:
                first_8b = trace.seconds
            r = rows[-1]
            print(f"{name:<14}{sp.name:<6}{r['layout']:<34} {policy:<10}{r['layers']:>4} layers  "
                  "predicted "
                  f"{r['predicted_gb']:6.1f} GB  traced {r['traced_gb']:6.1f} GB  "
                  f"{r['error']:+6.1%}  ({r['trace_s']:.0f} s)"
                  + (f"  traced as {trace.traced_as}" if trace.traced_as else ""), flush=True)
    return rows, first_8b


def _recipes(layers: int | None):
    """(name, run, plan) of the 8B and 70B recipes on their clusters; with `layers` the run's
    model is that shallow (the plan is the full model's)."""
    for name in ("llama3-8b-1m", "llama3-70b-1m"):
        path = ROOT / "configs" / f"{name}.yaml"
        run = load_model(path, RunSpec)
        plan = plan_run(load_cluster(path.parent / run.resources.cluster), run)
        if layers is not None:
            run = run.model_copy(update={"model": run.model.model_copy(
                update={"num_hidden_layers": layers})})
        yield name, run, plan


def lifecycle_rows(layers: int | None, stages: set[str] | None = None) -> list[dict]:
    """Load and export of every planned stage (or those named in `stages`) of the 8B and 70B
    recipes: the cost model's peak per GPU against the trace of the trainer's code."""
    rows, profile = [], get_profile("l40s")
    for name, run, plan in _recipes(layers):
        for sp in plan.stages:
            if stages is not None and sp.name not in stages:
                continue
            stage = next(s for s in run.stages if s.name == sp.name)
            for phase in LIFECYCLE_TRACED:
                trace = trace_phase_peak(phase, run, stage, sp.dims,
                                         depths=None if layers is not None else TRACE_DEPTHS)
                pred, _, host = predicted_phase_bytes(run, stage, sp.dims, phase, profile)
                rows.append({"model": name, "stage": sp.name, "phase": phase,
                             "layout": sp.dims.describe(), "layers": trace.layers,
                             "predicted_gb": pred / GB, "traced_gb": trace.peak_bytes / GB,
                             "error": (pred - trace.peak_bytes) / trace.peak_bytes,
                             "host_gb_modelled": host / GB, "trace_s": trace.seconds})
                r = rows[-1]
                print(f"{name:<14}{sp.name:<6}{phase:<7}{r['layout']:<34}{r['layers']:>4} layers"
                      f"  predicted {r['predicted_gb']:6.2f} GB  traced {r['traced_gb']:6.2f} GB"
                      f"  {r['error']:+.2%}  host {r['host_gb_modelled']:.2f} GB (modelled)"
                      f"  ({r['trace_s']:.1f} s)", flush=True)
    return rows


def _rss() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def tiny_body(rank, world, mode: str, steps: int):
    """The tiny default's last stage on one ring of 2: 'fsdp' (the trainer's parallelize) or
    'ddp' (replicas, full logits). A first session loads every lazy module and kernel; its
    memory is freed and handed back to the OS (malloc_trim), then a second session is measured:
    tokens/s over `steps` steps and the peak rise of the resident set from before its model is
    built."""
    import ctypes
    import gc

    from ray_jobs.train.parallelize import build_mesh

    layout = build_mesh(ParallelDims.of(2, 1, 2), [[0, 1]], "cpu")
    _tiny_session(layout, mode, 1)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss()[0]
    tokens_per_s = _tiny_session(layout, mode, steps)
    return {"tokens_per_s": tokens_per_s, "rss_rise": _rss()[1] - before}


def _tiny_session(layout, mode: str, steps: int) -> float:
    from torch.nn.parallel import DistributedDataParallel

    from ray_jobs.ring_attention import apply_ring_attention, zigzag_position_ids, zigzag_shard
    from ray_jobs.train.model import build_model
    from ray_jobs.train.parallelize import (
        build_optimizer,
        clip_gradients,
        parallelize,
        ring_mean_loss,
    )

    run = load_model(ROOT / "configs" / "tiny.yaml", RunSpec)
    index = len(run.stages) - 1
    stage = run.stages[index]
    model = build_model(run, index, None, seed=0, attn_implementation="sdpa")
    seq, per_ring = stage.seq_len, stage.batch_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, run.model.vocab_size, (per_ring, seq), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    x, y = (zigzag_shard(t, 1, layout.ring_rank, 2) for t in (ids, labels))
    pos = zigzag_position_ids(seq, layout.ring_rank, 2).unsqueeze(0).expand(per_ring, -1)
    if mode == "fsdp":
        root = parallelize(model, layout, mixed_precision=None,
                           activation_checkpointing=plan_from_workers(
                               {"local": 2}, run).stages[index].activation_checkpointing,
                           loss_chunk_tokens=run.training.loss_chunk_tokens)
        opt = build_optimizer(root, stage.lr)

        def loss_of():
            return ring_mean_loss(*root(x, pos, y), layout.ring)

        def clip():
            clip_gradients(root, 1.0)
    else:
        apply_ring_attention(model, layout.ring)  # what parallelize() does in the other mode
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.0)

        def loss_of():
            logits = ddp(input_ids=x, position_ids=pos).logits.float()
            local = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                      reduction="sum")
            return ring_mean_loss(local, (y != -100).sum(), layout.ring)

        def clip():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def step():
        (loss_of() * 2).backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state, kernels: its memory counts, its time does not
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * per_ring * seq / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, help="trace this many decoder layers (quick)")
    parser.add_argument("--max-ring", type=int, help="trace longer rings as their equivalent "
                        "layout on a ring this long (ray_jobs.train.memory.equivalent_layout): "
                        "same tensors per GPU, a shorter loop; full-length rings of 70B take "
                        "hours")
    parser.add_argument("--steps", type=int, default=20, help="tiny training steps per mode")
    parser.add_argument("--lifecycle-only", action="store_true",
                        help="only the load and export traces (lifecycle_peak_error_max)")
    parser.add_argument("--stage", action="append", help="with --lifecycle-only: only this "
                        "stage (repeatable; default: every planned stage)")
    args = parser.parse_args(argv)

    life = lifecycle_rows(args.layers, set(args.stage) if args.stage else None)
    lifecycle_error = round(max(abs(r["error"]) for r in life), 6) if life else None
    if args.lifecycle_only:
        print(json.dumps({"lifecycle_peak_error_max": lifecycle_error,
                          "traced_layers": "full" if args.layers is None else args.layers,
                          "lifecycle": [{k: (round(v, 6) if isinstance(v, float) else v)
                                         for k, v in r.items()} for r in life]}))
        return 0
    rows, trace_8b = scale_rows(args.layers, args.max_ring)
    tiny_run = load_model(ROOT / "configs" / "tiny.yaml", RunSpec)
    stage = tiny_run.stages[-1]
    predicted = predicted_bytes(tiny_run, stage, ParallelDims(ring=2))
    ddp = run_world(2, tiny_body, "ddp", args.steps, timeout_s=600)
    fsdp = run_world(2, tiny_body, "fsdp", args.steps, timeout_s=600)
    ddp_again = run_world(2, tiny_body, "ddp", args.steps, timeout_s=600)
    # glibc raises its mmap threshold after each large free, so freed activations stay in the
    # heap and the resident set keeps what the allocator caches (as CUDA's reserved memory
    # does, which the GPU model leaves to its reserve). A fixed threshold returns each freed
    # block at once: the resident set then follows the tensors the memory model describes.
    os.environ[MMAP_THRESHOLD] = str(128 * 1024)
    try:
        returned = run_world(2, tiny_body, "fsdp", 3, timeout_s=600)
    finally:
        del os.environ[MMAP_THRESHOLD]
    rises = [r["rss_rise"] for r in returned]
    cached = [r["rss_rise"] for r in fsdp]
    tiny_error = max(abs(predicted - r) / r for r in rises)
    ddp_tps = (min(r["tokens_per_s"] for r in ddp) + min(r["tokens_per_s"] for r in ddp_again)) / 2
    fsdp_tps = min(r["tokens_per_s"] for r in fsdp)
    print(f"tiny {stage.name} (ring 2, shard 2, CPU fp32): predicted {predicted / 1e6:.1f} MB, "
          f"measured RSS rise per rank {[round(r / 1e6, 1) for r in rises]} MB with freed "
          f"blocks returned ({MMAP_THRESHOLD}=131072), {[round(r / 1e6, 1) for r in cached]} MB "
          "with glibc's default (freed blocks cached in the heap)")
    print(f"tiny {stage.name} tokens/s: FSDP2 {fsdp_tps:,.0f}, DDP {ddp_tps:,.0f} (mean of the "
          "runs before and after)")
    print(json.dumps({
        "memory_model_error_max": round(max(abs(r["error"]) for r in rows), 4),
        "lifecycle_peak_error_max": lifecycle_error,
        "memory_model_error_tiny": round(tiny_error, 4),
        "tiny_rss_rise_mb": round(max(rises) / 1e6, 1),
        "tiny_rss_rise_default_malloc_mb": round(max(cached) / 1e6, 1),
        "fsdp_step_ratio_vs_ddp": round(fsdp_tps / ddp_tps, 3),
        "trace_seconds_8b": round(trace_8b, 1),
        "traced_layers": "full" if args.layers is None else args.layers,
        "max_ring_traced": args.max_ring,
        "stages": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                   for r in rows],
        "lifecycle": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                      for r in life],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
