"""transformers integration: the "ring" attention implementation and the active ring (or the
active Ulysses x ring sequence mesh: the same registered function runs either)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist

from ray_jobs.ring_attention.comm import Ring, resolve_ring
from ray_jobs.ring_attention.ring import ring_attention
from ray_jobs.ring_attention.ulysses import SequenceMesh, sequence_parallel_attention

ATTENTION_NAME = "ring"
_ACTIVE_RING: Ring | SequenceMesh | None = None


def set_ring_group(group: "Ring | SequenceMesh | dist.ProcessGroup | None") -> None:
    """Set the ring (or sequence mesh) used by attn_implementation="ring" in this process
    (None: the whole world as one ring)."""
    global _ACTIVE_RING
    _ACTIVE_RING = group if isinstance(group, SequenceMesh) else resolve_ring(group)


@contextmanager
def use_ring_group(group: "Ring | SequenceMesh | dist.ProcessGroup | None"
                   ) -> Iterator[Ring | SequenceMesh]:
    """Run model forward AND backward inside this block so "ring" attention finds its ring.

    group: a Ring (build_mesh(...).ring), a SequenceMesh (Ulysses x ring), a process group, or
    None for the world. The previous one (or none) is restored on exit.
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
    # RoPE may hand back q and k upcast (fp32 cos/sin under autocast): the ring's kernels and
    # its K/V exchange run in the compute dtype, which is value's.
    dtype = value.dtype
    q, k, v = (query.transpose(1, 2).to(dtype), key.transpose(1, 2).to(dtype),
               value.transpose(1, 2))
    causal = getattr(module, "is_causal", True)
    if isinstance(_ACTIVE_RING, SequenceMesh):
        out = sequence_parallel_attention(q, k, v, mesh=_ACTIVE_RING, causal=causal,
                                          scale=scaling)
    else:
        out = ring_attention(q, k, v, group=_ACTIVE_RING, causal=causal, scale=scaling)
    return out, None


def register_ring_attention() -> str:
    """Register ring attention with transformers; select it with attn_implementation="ring"."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, ring_attention_forward)
    return ATTENTION_NAME
