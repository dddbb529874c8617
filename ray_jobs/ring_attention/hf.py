"""transformers integration: the "ring" attention implementation, batch sharding and the loss."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_jobs.ring_attention.comm import Ring, resolve_ring
from ray_jobs.ring_attention.ring import ring_attention
from ray_jobs.ring_attention.zigzag import zigzag_position_ids, zigzag_shard

ATTENTION_NAME = "ring"
_ACTIVE_RING: Ring | None = None


def set_ring_group(group: "Ring | dist.ProcessGroup | None") -> None:
    """Set the ring used by attn_implementation="ring" in this process (None: the whole world)."""
    global _ACTIVE_RING
    _ACTIVE_RING = resolve_ring(group)


@contextmanager
def use_ring_group(group: "Ring | dist.ProcessGroup | None") -> Iterator[Ring]:
    """Run model forward AND backward inside this block so "ring" attention finds its ring.

    group: a Ring (build_ring_groups(...).ring), a process group, or None for the world.
    The previous ring (or none) is restored on exit.
    """
    global _ACTIVE_RING
    previous = _ACTIVE_RING
    set_ring_group(group)
    try:
        yield _ACTIVE_RING
    finally:
        _ACTIVE_RING = previous


def ring_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers attention function: (B, H, S_local, D) after RoPE in,
    ((B, S_local, H, D), None) out.

    Causality comes from the module (`is_causal`, True for Llama); transformers passes no mask
    to custom functions, and any other mask (padding) cannot be honoured and is refused.
    """
    if _ACTIVE_RING is None:
        raise RuntimeError(
            'attn_implementation="ring" needs a ring: wrap forward and backward in '
            "`with use_ring_group(group):` (or call set_ring_group(group))"
        )
    if dropout:
        raise ValueError(
            f"ring attention has no attention dropout, got dropout={dropout}; "
            "set attention_dropout=0.0"
        )
    if attention_mask is not None:
        raise ValueError(
            "ring attention takes no attention_mask (padding masks are unsupported); "
            "pack sequences without padding and pass attention_mask=None"
        )
    out = ring_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        group=_ACTIVE_RING, causal=getattr(module, "is_causal", True), scale=scaling,
    )
    return out, None


def register_ring_attention() -> str:
    """Register ring attention with transformers; select it with attn_implementation="ring"."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, ring_attention_forward)
    return ATTENTION_NAME


def build_shifted_labels(
    input_ids: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """Next-token targets aligned with the inputs:
    out[:, t] = labels[:, t + 1], out[:, -1] = ignore_index.

    Shift BEFORE sharding: a shard does not hold its successor token.
    `labels` defaults to input_ids.
    """
    labels = input_ids if labels is None else labels
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def shard_causal_lm_batch(
    input_ids: torch.Tensor, rank: int, world: int, labels: torch.Tensor | None = None
) -> dict:
    """This ring rank's zigzag shard of a (batch, seq) batch: input_ids, position_ids,
    shifted labels.

    Pass input_ids and position_ids to the model (RoPE then sees global positions) and the
    labels to ring_causal_lm_loss.
    """
    seq_len = input_ids.shape[1]
    return {
        "input_ids": zigzag_shard(input_ids, 1, rank, world),
        "position_ids": zigzag_position_ids(
            seq_len, rank, world, input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1),
        "labels": zigzag_shard(build_shifted_labels(input_ids, labels), 1, rank, world),
    }


def ring_causal_lm_loss(
    logits: torch.Tensor, shifted_labels: torch.Tensor, group: "Ring | dist.ProcessGroup | None",
    ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token cross-entropy over the WHOLE sharded sequence (all ring ranks).

    logits (batch, local_seq, vocab), shifted_labels (batch, local_seq) from shard_causal_lm_batch.
    Returns a tensor whose value is the global loss on every rank and whose gradient is this
    rank's share (local token sum / global token count): after backward, summing parameter
    gradients over the ring gives the unsharded model's gradients.
    """
    ring = resolve_ring(group)
    local_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shifted_labels.reshape(-1),
        ignore_index=ignore_index, reduction="sum",
    )
    stats = torch.stack([local_sum.detach(),
                         (shifted_labels != ignore_index).sum().to(local_sum.dtype)])
    dist.all_reduce(stats, group=ring.group)
    total, count = stats[0], stats[1].clamp_min(1.0)
    local = local_sum / count
    return local + (total / count - local).detach()
