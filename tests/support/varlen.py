"""A CPU stand-in for torch's variable-length CUDA flash op, to check the packing around it."""

from __future__ import annotations

import torch

from ray_jobs.ring_attention.kernels import CpuFlashKernel


class LoopVarlenOps:
    """torch's variable-length flash op's contract (kernels.TorchVarlenOps) on CPU: packed
    (tokens, heads, head_dim) rows, int32 cumulative lengths, lse (heads, tokens); one sequence
    at a time through the CPU flash kernel. The packing around the CUDA op is checked against
    it; the CUDA op itself only on a GPU (benchmarks/gpu_smoke.py)."""

    kernel = CpuFlashKernel()

    @staticmethod
    def _sequences(cu_q, cu_kv, max_q, max_kv, causal):
        assert cu_q.dtype == cu_kv.dtype == torch.int32 and len(cu_q) == len(cu_kv)
        bounds = list(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_kv.tolist(), cu_kv.tolist()[1:]))
        assert max(b - a for a, b, _, _ in bounds) == max_q
        assert max(e - c for _, _, c, e in bounds) == max_kv
        assert not causal or all(b - a == e - c for a, b, c, e in bounds), "causal not square"
        return bounds

    @classmethod
    def forward(cls, q, k, v, cu_q, cu_kv, max_q, max_kv, causal, scale):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0])
        for a, b, c, e in cls._sequences(cu_q, cu_kv, max_q, max_kv, causal):
            o, m = cls.kernel.forward(q[None, a:b], k[None, c:e], v[None, c:e], causal, scale)
            out[a:b], lse[:, a:b] = o[0], m[0].t()
        return out, lse

    @classmethod
    def backward(cls, dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv, causal, scale):
        assert lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for a, b, c, e in cls._sequences(cu_q, cu_kv, max_q, max_kv, causal):
            dq[a:b], dk[c:e], dv[c:e] = (g[0] for g in cls.kernel.backward(
                dout[None, a:b], q[None, a:b], k[None, c:e], v[None, c:e], out[None, a:b],
                lse[:, a:b].t()[None], causal, scale))
        return dq, dk, dv
