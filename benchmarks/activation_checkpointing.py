"""Benchmark the activation checkpointing policies on an attention-heavy CPU stage.

    .venv/bin/python benchmarks/activation_checkpointing.py            # 16K tokens, minutes
    .venv/bin/python benchmarks/activation_checkpointing.py --quick    # 4K tokens, under a minute

Stage: the tiny default's model (configs/tiny.yaml: 2 layers, hidden 128, 8 heads, GQA 2:1,
fp32 on CPU) on one ring of 2 gloo processes, one thread each, FSDP2 over both, a sequence of
16K tokens (8K per rank), batch 1: attention is most of the step, as at 65K-1M on GPUs.

- selective_ac_speedup: tokens/s under `attention` (ring attention's output and log-sum-exp
  kept through the recomputation) over tokens/s under `full` (the whole layer recomputed, the
  ring's forward run again), both through the trainer's parallelize() in the same processes,
  sessions alternating full, attention, full, attention (each policy's best session counts).
  no_ac_speedup: the same for `none` (nothing recomputed).
- ring_forward_kv_exchanges_full / _attention: forward K/V exchanges of one step (counted by
  the ring): the forward and its recomputation under `full`, the forward alone under
  `attention` (backward's K/V and dK/dV exchanges are the same under both).
- selective_ac_memory_delta_traced_mb / _predicted_mb: the per-GPU peak of `attention` minus
  that of `full`, traced (FSDPMemTracker under FakeTensorMode on a fake process group, the
  trainer's own parallelize: ray_jobs.train.memory) and predicted by the cost model
  (topology.cost.memory_per_gpu); selective_ac_memory_delta_error: their relative difference.
Last line: one JSON object. Timings on a shared 2-core machine are noisy; ratios are of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ray_jobs.train.memory import trace_stage_memory  # noqa: E402
from specs.degrees import ParallelDims  # noqa: E402
from specs.loading import load_model  # noqa: E402
from specs.run import RunSpec  # noqa: E402
from tests.support.worlds import run_world  # noqa: E402
from topology.cost import StageShape, memory_per_gpu  # noqa: E402
from topology.profile import get_profile  # noqa: E402

SESSIONS = ("full", "attention", "full", "attention", "none")


def bench_run(seq_len: int) -> RunSpec:
    """The tiny default with its last stage at `seq_len` tokens, batch 1, on a ring of 2."""
    run = load_model(ROOT / "configs" / "tiny.yaml", RunSpec)
    last = run.stages[-1].model_copy(update={"seq_len": seq_len, "batch_size": 1,
                                             "grad_accum_steps": 1})
    return run.model_copy(update={"stages": [*run.stages[:-1], last]})


def policy_body(rank, world, seq_len: int, steps: int):
    """Each session of SESSIONS on this ring: tokens/s over `steps` steps (after one untimed
    step) and the ring's exchanges by tag in one step."""
    from ray_jobs.ring_attention import zigzag_position_ids, zigzag_shard
    from ray_jobs.train.parallelize import build_mesh

    torch.set_num_threads(1)
    run = bench_run(seq_len)
    layout = build_mesh(ParallelDims.of(2, 1, 2), [[0, 1]], "cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, run.model.vocab_size, (1, seq_len), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    x, y = (zigzag_shard(t, 1, layout.ring_rank, 2) for t in (ids, labels))
    pos = zigzag_position_ids(seq_len, layout.ring_rank, 2).unsqueeze(0)
    return [_session(run, layout, policy, (x, pos, y), steps) for policy in SESSIONS]


def _session(run: RunSpec, layout, policy: str, batch, steps: int) -> dict:
    from ray_jobs.ring_attention import record_ring_timings
    from ray_jobs.train.model import build_model
    from ray_jobs.train.parallelize import (
        build_optimizer,
        clip_gradients,
        parallelize,
        ring_mean_loss,
    )

    model = build_model(run, len(run.stages) - 1, None, seed=0, attn_implementation="sdpa")
    root = parallelize(model, layout, mixed_precision=None, activation_checkpointing=policy,
                       loss_chunk_tokens=run.training.loss_chunk_tokens)
    opt = build_optimizer(root, 1e-4)

    def step():
        ring_mean_loss(*root(*batch), layout.ring).backward()
        clip_gradients(root, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with record_ring_timings() as counted:
        step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    tokens = steps * batch[0].shape[1] * 2  # both ranks' shards: the whole sequence
    return {"policy": policy, "tokens_per_s": tokens / (time.perf_counter() - t0),
            "exchanges": dict(counted.exchanges_by_tag)}


def traced_delta(run: RunSpec) -> tuple[float, float]:
    """(traced, predicted) bytes per GPU of `attention`'s peak over `full`'s, last stage."""
    stage, dims = run.stages[-1], ParallelDims.of(2, 1, 2)
    traced = {p: trace_stage_memory(run, stage, dims, policy=p).peak_bytes
              for p in ("full", "attention")}
    profile = get_profile("l40s")
    predicted = {p: sum(v for k, v in memory_per_gpu(StageShape.of(run, stage, dims, p),
                                                     profile).items()
                        if not k.startswith("reserve"))
                 for p in ("full", "attention")}
    return traced["attention"] - traced["full"], predicted["attention"] - predicted["full"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4K tokens, 1 timed step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per session")
    args = parser.parse_args(argv)
    seq_len, steps = (4096, 1) if args.quick else (16384, args.steps)

    sessions = run_world(2, policy_body, seq_len, steps, timeout_s=1800)
    best = {}
    for rank_sessions in zip(*sessions):  # the slower rank of each session
        slowest = min(rank_sessions, key=lambda r: r["tokens_per_s"])
        p = slowest["policy"]
        best[p] = max(best.get(p, 0.0), slowest["tokens_per_s"])
        print(f"{p:<10} {slowest['tokens_per_s']:8.0f} tokens/s  ring exchanges per step "
              f"{slowest['exchanges']} (1: K/V forward, 2: dK/dV, 3: K/V backward)", flush=True)
    exchanges = {r["policy"]: r["exchanges"] for r in sessions[0]}
    traced, predicted = traced_delta(bench_run(seq_len))
    print(f"attention over full, peak per GPU: traced {traced / 1e6:+.2f} MB, predicted "
          f"{predicted / 1e6:+.2f} MB")
    print(json.dumps({
        "seq_len": seq_len, "tokens_per_rank": seq_len // 2,
        "selective_ac_speedup": round(best["attention"] / best["full"], 3),
        "no_ac_speedup": round(best["none"] / best["full"], 3),
        "tokens_per_s": {p: round(v, 1) for p, v in best.items()},
        "ring_forward_kv_exchanges_full": exchanges["full"].get(1, 0),
        "ring_forward_kv_exchanges_attention": exchanges["attention"].get(1, 0),
        "selective_ac_memory_delta_traced_mb": round(traced / 1e6, 3),
        "selective_ac_memory_delta_predicted_mb": round(predicted / 1e6, 3),
        "selective_ac_memory_delta_error": round(abs(predicted - traced) / traced, 4)
        if traced else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
