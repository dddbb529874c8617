"""The planned layout's attention against unsharded attention, at the stage's world size.

Before hours of training trust a layout, one short random sequence runs through exactly what a
step runs: the plan's rings and Ulysses groups built by the trainer's build_mesh, zigzag
shards, sequence_parallel_attention (ring_attention when Ulysses is 1) with the real block
kernel on the real device, forward and backward. Rank 0 computes plain causal attention of the
whole sequence once and hands it to every rank, which compares its own shard of out, dq, dk
and dv. A rank whose ring position, group or kernel is wrong differs far beyond rounding; the
per-rank errors say which ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_jobs.ring_attention import sequence_parallel_attention, sequence_shard
from ray_jobs.train.parallelize import Layout

# Against unsharded attention in the same dtype, values O(1) from normal inputs: what the ring
# tests (tests/ring_attention) hold ring attention to.
TOLERANCE = {"float32": (2e-5, 1e-4), "bfloat16": (3e-2, 3e-2), "float16": (5e-3, 5e-3)}
OUTPUTS = ("out", "dq", "dk", "dv")


@dataclass(frozen=True)
class NumericsShape:
    """What the check computes: the model's heads at a short sequence of `chunk` tokens per
    zigzag chunk (2 x ring x ulysses chunks), in the compute dtype."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # "float32" or "bfloat16"
    chunk: int = 8
    batch: int = 1

    def seq_len(self, sequence_ranks: int) -> int:
        return 2 * sequence_ranks * self.chunk


def _inputs(shape: NumericsShape, seq_len: int, seed: int, device: torch.device
            ) -> list[torch.Tensor]:
    """q, k, v and the output's gradient for the whole sequence, (batch, seq, heads, dim), the
    same on every rank (drawn on the CPU from `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    sizes = (shape.heads, shape.kv_heads, shape.kv_heads, shape.heads)
    return [torch.randn(shape.batch, seq_len, h, shape.head_dim, generator=gen)
            .to(device=device, dtype=dtype) for h in sizes]


def unsharded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        dout: torch.Tensor) -> list[torch.Tensor]:
    """Plain causal attention of the whole sequence on this rank: out, dq, dk, dv."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True).transpose(1, 2)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def attention_numerics(layout: Layout, shape: NumericsShape, device: torch.device, *,
                       seed: int = 0, shard_position: tuple[int, int] | None = None
                       ) -> dict | None:
    """Collective over the world: every rank runs its layout's attention on its shard and
    compares it with rank 0's unsharded result. Rank 0 returns {seq_len, dtype, atol, rtol,
    ranks: [per rank: rank, ring_position, ulysses_position, errors {out, dq, dk, dv: max
    abs}, excess (worst |error| over atol + rtol |reference|; above 1 fails), ok], failed: the
    failing ranks, ok}; other ranks None.

    `shard_position` (ring position, Ulysses position): where this rank's piece of the sequence
    is cut, when it is not where its layout places it: the data side of a layout, to check the
    check with a ring listed out of order (None: the layout's own place)."""
    dims = layout.dims
    seq_len = shape.seq_len(dims.sequence)
    q, k, v, dout = _inputs(shape, seq_len, seed, device)
    reference = (unsharded_attention(q, k, v, dout) if dist.get_rank() == 0
                 else [torch.empty_like(t) for t in (q, q, k, v)])
    for t in reference:
        dist.broadcast(t, src=0)
    ring_pos, ulysses_pos = shard_position or (layout.ring_rank, layout.ulysses_rank)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return sequence_shard(t, 1, ring_pos, dims.ring, ulysses_pos, dims.ulysses)

    local = [shard(t).requires_grad_() for t in (q, k, v)]
    out = sequence_parallel_attention(*local, mesh=layout.sequence, causal=True)
    out.backward(shard(dout))
    atol, rtol = TOLERANCE[shape.dtype]
    errors, excess = {}, 0.0
    for name, got, want in zip(OUTPUTS, (out.detach(), *(t.grad for t in local)), reference):
        diff = (got.float() - shard(want).float()).abs()
        errors[name] = diff.max().item()
        excess = max(excess, (diff / (atol + rtol * shard(want).float().abs())).max().item())
    mine = {"rank": dist.get_rank(), "ring_position": ring_pos, "ulysses_position": ulysses_pos,
            "errors": errors, "excess": excess, "ok": excess <= 1.0}
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    if everyone is None:
        return None
    failed = [r["rank"] for r in everyone if not r["ok"]]
    return {"seq_len": seq_len, "dtype": shape.dtype, "atol": atol, "rtol": rtol,
            "ranks": everyone, "failed": failed, "ok": not failed}


def numerics_finding(result: dict) -> str | None:
    """One line for a failed check (None when every rank agrees with unsharded attention)."""
    if result["ok"]:
        return None
    worst = {name: max(r["errors"][name] for r in result["ranks"] if not r["ok"])
             for name in OUTPUTS}
    shown = ", ".join(f"{name} {value:.1e}" for name, value in worst.items())
    return (f"numerics: ranks {', '.join(map(str, result['failed']))} differ from unsharded "
            f"attention (max abs error {shown}; tolerance {result['atol']:g} + "
            f"{result['rtol']:g} x |value|, {result['dtype']}): their ring position, groups or "
            "kernel do not match the layout")
