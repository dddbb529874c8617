"""transformers integration: the "ring" attention implementation, bound to a model's attention
modules with the ring (or the Ulysses x ring sequence mesh) each of them runs around."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ray_jobs.ring_attention.comm import Ring, resolve_ring
from ray_jobs.ring_attention.documents import DocumentLayout
from ray_jobs.ring_attention.ring import ring_attention
from ray_jobs.ring_attention.ulysses import SequenceMesh, sequence_parallel_attention

ATTENTION_NAME = "ring"
# The attribute of an attention module holding its Ring or SequenceMesh: transformers hands
# the module to the attention function, so each model carries its own split (two models with
# different rings can run in one process, and nothing has to be switched on around a step).
RING_ATTRIBUTE = "ring_attention_group"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules: every decoder layer's `self_attn` (wrapped or not; the
    name in Llama, Mistral, Qwen2 and Qwen3)."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "self_attn"]


def apply_ring_attention(model: nn.Module,
                         group: "Ring | SequenceMesh | dist.ProcessGroup | None") -> None:
    """Make every attention module of `model` (a Hugging Face Llama, or any module holding
    decoder layers) run "ring" attention around `group`, in place: a Ring (build_mesh(...).ring),
    a SequenceMesh (Ulysses x ring), a process group, or None for the whole world as one ring.
    Registers the "ring" implementation with transformers and sets it on the modules' configs."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules named 'self_attn' to "
                         "bind a ring to; pass a Llama (or a module holding its decoder layers)")
    bound = group if isinstance(group, SequenceMesh) else resolve_ring(group)
    _register()
    for module in modules:
        module.config._attn_implementation = ATTENTION_NAME
        setattr(module, RING_ATTRIBUTE, bound)


def ring_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers attention function: (B, H, S_local, D) after RoPE in,
    ((B, S_local, H, D), None) out, around the ring bound to `module`.

    Causality comes from the module (`is_causal`, True for Llama); transformers passes no mask
    to custom functions, and any other mask (padding) cannot be honoured and is refused.
    Document masking: `doc_starts`, a keyword the model's forward passes down to its attention
    (`model(..., doc_starts=rows)`), holds one int64 tensor per row of the batch, the WHOLE
    sequence's document starts (ring_attention's doc_starts); see `attention_by_layout`.
    """
    group = getattr(module, RING_ATTRIBUTE, None)
    if group is None:
        raise RuntimeError(
            f'attn_implementation="{ATTENTION_NAME}" needs a ring bound to each attention '
            f"module ({type(module).__name__} has none): call apply_ring_attention(model, "
            "group) (the trainer's parallelize() does)"
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
    window = kwargs.get("sliding_window")  # Mistral's and Qwen's sliding-window layers
    if window is not None and window < query.shape[2] * group.size:
        raise ValueError(
            f"ring attention has no sliding window, and this layer's ({window} tokens) is "
            f"shorter than the sequence ({query.shape[2] * group.size} tokens); use a model "
            "whose sliding_window is null or at least the sequence's length"
        )
    # RoPE may hand back q and k upcast (fp32 cos/sin under autocast): the ring's kernels and
    # its K/V exchange run in the compute dtype, which is value's.
    dtype = value.dtype
    q, k, v = (query.transpose(1, 2).to(dtype), key.transpose(1, 2).to(dtype),
               value.transpose(1, 2))
    causal = getattr(module, "is_causal", True)
    doc_starts = kwargs.get("doc_starts")
    if doc_starts is None:
        return _attend(q, k, v, group, causal, scaling), None
    return attention_by_layout(q, k, v, group, causal, scaling, doc_starts), None


def _attend(q, k, v, group: "Ring | SequenceMesh", causal: bool, scale: float | None,
            doc_starts: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(group, SequenceMesh):
        return sequence_parallel_attention(q, k, v, mesh=group, causal=causal, scale=scale,
                                           doc_starts=doc_starts)
    return ring_attention(q, k, v, group=group, causal=causal, scale=scale,
                          doc_starts=doc_starts)


def attention_by_layout(q, k, v, group: "Ring | SequenceMesh", causal: bool,
                        scale: float | None, doc_starts: Sequence[torch.Tensor]
                        ) -> torch.Tensor:
    """Document-masked attention of a batch whose rows may pack different documents.

    q, k, v: (B, S_local, heads, D), this rank's shards; doc_starts: B int64 tensors, row b's
    whole-sequence document starts, or B DocumentLayouts (rows sharded per document: each
    row's tokens in its layout's order). One doc_starts serves all rows of a ring_attention call,
    so rows are run a document layout at a time: the rows sharing a layout together, layouts
    in the order of their first row. Every rank of the ring holds the same rows with the same
    layouts, so all take the same calls in the same order and the ring stays in lock-step
    (backward too: autograd orders the calls' backward by their creation). A batch of one
    layout is a single call, exactly the unbatched one.
    """
    if len(doc_starts) != q.shape[0]:
        raise ValueError(f"doc_starts holds {len(doc_starts)} rows' document starts for a "
                         f"batch of {q.shape[0]} rows; give one int64 tensor per row")
    layouts: dict[object, list[int]] = {}
    for row, starts in enumerate(doc_starts):
        key = starts if isinstance(starts, DocumentLayout) else tuple(starts.tolist())
        layouts.setdefault(key, []).append(row)
    if len(layouts) == 1:
        return _attend(q, k, v, group, causal, scale, doc_starts[0])
    outs, order = [], []
    for rows in layouts.values():
        index = torch.tensor(rows, device=q.device)
        outs.append(_attend(q.index_select(0, index), k.index_select(0, index),
                            v.index_select(0, index), group, causal, scale,
                            doc_starts[rows[0]]))
        order += rows
    # the rows back in batch order: position of row b among the concatenated groups
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(outs).index_select(0, back.to(q.device))


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, ring_attention_forward)
