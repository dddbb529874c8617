"""Block attention kernels with log-sum-exp: PyTorch's CPU flash kernel and flash-attn 2 on CUDA."""

from __future__ import annotations

from typing import Protocol

import torch

# Layout used by every kernel here (and by the whole ring):
#   q, out, dq:        (batch, seq, heads, head_dim)
#   k, v, dk, dv:      (batch, seq, kv_heads, head_dim), heads % kv_heads == 0
#   lse:               (batch, seq, heads), float32, natural log, already scaled
# Tensors may be strided views (slices along seq); the last dim must have stride 1.


class BlockKernel(Protocol):
    """Attention of one (query block, key/value block) pair, forward and backward."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (out in q's dtype, lse in fp32)."""
        ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (dq, dk, dv) for this block given the GLOBAL out and lse; dk/dv have kv_heads."""
        ...


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # Query head h uses kv head h // groups (the convention of HF's repeat_kv and SDPA's
    # enable_gqa).
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _reduce_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.reshape(b, s, h // groups, groups, d).sum(dim=3)


class CpuFlashKernel:
    """`aten._scaled_dot_product_flash_attention_for_cpu` and its backward
    (layout (B, H, S, D) views).

    The CPU op has no GQA support, so K/V heads are repeated locally for the call and the
    key/value gradients are summed back to the K/V heads; the ring itself only moves K/V heads.
    """

    def forward(self, q, k, v, causal, scale):
        groups = q.shape[2] // k.shape[2]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2),
            _repeat_kv(k, groups).transpose(1, 2),
            _repeat_kv(v, groups).transpose(1, 2),
            0.0,
            causal,
            scale=scale,
        )
        return out.transpose(1, 2), lse.transpose(1, 2)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        groups = q.shape[2] // k.shape[2]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2),
            q.transpose(1, 2),
            _repeat_kv(k, groups).transpose(1, 2),
            _repeat_kv(v, groups).transpose(1, 2),
            out.transpose(1, 2),
            lse.transpose(1, 2),
            0.0,
            causal,
            scale=scale,
        )
        dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
        return dq, _reduce_kv(dk, groups), _reduce_kv(dv, groups)


class FlashAttnKernel:
    """flash-attn 2 (>= 2.7) `_flash_attn_forward/_flash_attn_backward` on CUDA, native GQA.

    Imported lazily so CPU code paths never import flash-attn. UNEXERCISED here (no GPU): written
    against flash-attn 2.7's `flash_attn/flash_attn_interface.py`, whose forward returns
    (out, softmax_lse (B, H, S) fp32, S_dmask, rng_state) and whose backward writes dq, dk, dv
    in place. Causal masks of unequal lengths are bottom-right aligned there, but the ring only
    asks for causal on square diagonal blocks, where both conventions agree.
    """

    def __init__(self) -> None:
        try:
            from flash_attn import __version__ as version
            from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward
        except ImportError as err:
            raise ImportError(
                "ring attention on CUDA needs flash-attn: pip install 'ringpilot[gpu]' "
                "(flash-attn>=2.7, built with nvcc and CUDA_HOME)"
            ) from err
        major, minor = (int(x) for x in version.split(".")[:2])
        if (major, minor) < (2, 7):
            raise ImportError(
                f"flash-attn {version} found, ring attention needs >= 2.7 (window_size_left/right "
                "arguments): pip install -U 'flash-attn>=2.7'"
            )
        self._fwd = _flash_attn_forward
        self._bwd = _flash_attn_backward

    @staticmethod
    def _check(q):
        # flash-attn pads head dims that are not multiples of 8 and returns padded outputs;
        # it has no fp32 kernels. Refuse both here rather than deep inside CUDA code.
        if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] % 8 or q.shape[-1] > 256:
            raise ValueError(
                f"flash-attn ring attention needs fp16/bf16 and head_dim a multiple of 8 "
                f"up to 256, got {q.dtype} and head_dim {q.shape[-1]}; cast to torch.bfloat16"
            )

    def forward(self, q, k, v, causal, scale):
        self._check(q)
        out, lse, _, _ = self._fwd(q, k, v, 0.0, scale, causal, -1, -1, 0.0, None, False)
        return out, lse.transpose(1, 2)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._bwd(
            dout, q, k, v, out, lse.transpose(1, 2).contiguous(),
            dq, dk, dv, 0.0, scale, causal, -1, -1, 0.0, None, False, None,
        )
        return dq, dk, dv


_CPU_KERNEL = CpuFlashKernel()
_MERGE_ROWS = 1024


def build_block_kernel(device: torch.device) -> BlockKernel:
    """The block kernel for a device: CPU flash op on CPU, flash-attn on CUDA."""
    if device.type == "cpu":
        return _CPU_KERNEL
    if device.type == "cuda":
        return FlashAttnKernel()
    raise ValueError(f"ring attention has no block kernel for device {device}; "
                     "use cpu or cuda tensors")


def merge_block(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                block_lse: torch.Tensor) -> None:
    """Fold one block's partial attention into the running (out, lse), in place, in fp32.

    out: (B, S, H, D) fp32 (or the input dtype on 2-rank rings, see ring.accumulator_dtype);
    lse: (B, S, H) fp32; block_*: the same rows from a block kernel. The arithmetic is fp32.
    The block's weight is
    w = exp(block_lse) / (exp(lse) + exp(block_lse)) = sigmoid(block_lse - lse),
    computed from the DIFFERENCE of the two lse so large magnitudes lose no precision:
    out += w * (block_out - out), lse = logaddexp(lse, block_lse). A row that saw no key yet
    (lse = -inf) takes the block's values (w = 1).
    """
    # Row chunks bound the fp32 temporaries to a few MiB instead of a copy of the whole shard.
    for start in range(0, out.shape[1], _MERGE_ROWS):
        rows = slice(start, start + _MERGE_ROWS)
        o, m, bo, bm = out[:, rows], lse[:, rows], block_out[:, rows], block_lse[:, rows]
        delta = bo.float().sub_(o).mul_(torch.sigmoid(bm - m).unsqueeze(-1))
        o.add_(delta)
        m.copy_(torch.logaddexp(m, bm))
