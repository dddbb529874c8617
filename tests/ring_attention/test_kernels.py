"""The block kernels: which one a device gets and why, the CUDA adapters' calls (checked under
FakeTensorMode on a fake CUDA device: signatures, shapes, dtypes, not numbers), what preflight
refuses, the variable-length calls of document masking on CUDA, and the merge's chunking."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ray_jobs.ring_attention import kernels, ring_attention
from ray_jobs.ring_attention.kernels import (
    CpuFlashKernel,
    FlashAttnKernel,
    TorchCudaFlashKernel,
    kernel_problems,
    merge_block,
    select_block_kernel,
)
from tests.support.varlen import LoopVarlenOps


@pytest.fixture
def fresh_choice():
    select_block_kernel.cache_clear()
    yield
    select_block_kernel.cache_clear()


def _fake_flash_attn(monkeypatch, version: str) -> None:
    package = types.ModuleType("flash_attn")
    package.__version__ = version
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward = interface._flash_attn_backward = lambda *a: None
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)


def test_cpu_gets_the_cpu_flash_op_and_never_imports_flash_attn(fresh_choice):
    choice = select_block_kernel("cpu")
    assert isinstance(choice.kernel, CpuFlashKernel)
    assert choice.record() == {"kernel": "torch-cpu-flash", "reason": "the CPU device"}
    assert "flash_attn" not in sys.modules


def test_cuda_without_flash_attn_uses_torchs_own_kernel_and_says_why(fresh_choice, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ImportError
    choice = select_block_kernel("cuda")
    assert isinstance(choice.kernel, TorchCudaFlashKernel)
    assert choice.name == "torch-cuda-flash"
    assert "flash-attn not used" in choice.reason and "make flash-attn" in choice.reason


def test_cuda_with_flash_attn_27_uses_it(fresh_choice, monkeypatch):
    _fake_flash_attn(monkeypatch, "2.7.4")
    choice = select_block_kernel("cuda")
    assert isinstance(choice.kernel, FlashAttnKernel)
    assert choice.reason == "flash-attn 2.7.4 imported"


def test_cuda_with_an_old_flash_attn_falls_back(fresh_choice, monkeypatch):
    _fake_flash_attn(monkeypatch, "2.6.3")
    choice = select_block_kernel("cuda")
    assert isinstance(choice.kernel, TorchCudaFlashKernel)
    assert "2.6.3 found" in choice.reason


def test_other_devices_are_refused(fresh_choice):
    with pytest.raises(ValueError, match="no block kernel for device meta"):
        select_block_kernel("meta")


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (8, 2, 128), (32, 4, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_cuda_kernel_calls_fit_the_ops(heads, kv_heads, head_dim, causal):
    """The adapter's argument lists and layouts against the ops' own meta kernels (a wrong
    argument count, order or layout fails here; the numbers are for benchmarks/gpu_smoke.py)."""
    kernel = TorchCudaFlashKernel()
    with FakeTensorMode():
        q = torch.empty(2, 48, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.empty(2, 48, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.empty_like(k)
        out, lse = kernel.forward(q, k, v, causal, head_dim**-0.5)
        assert (out.shape, out.dtype, out.device.type) == (q.shape, q.dtype, "cuda")
        assert (lse.shape, lse.dtype) == ((2, 48, heads), torch.float32)
        dq, dk, dv = kernel.backward(torch.empty_like(out), q, k, v, out, lse, causal,
                                     head_dim**-0.5)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


CUDA_KERNELS = [TorchCudaFlashKernel(), FlashAttnKernel.__new__(FlashAttnKernel)]  # no import


@pytest.mark.parametrize("kernel", CUDA_KERNELS, ids=["torch", "flash-attn"])
def test_cuda_kernels_refuse_fp32_and_odd_head_dims(kernel):
    with FakeTensorMode():
        for dtype, d in ((torch.float32, 64), (torch.bfloat16, 60), (torch.bfloat16, 320)):
            q = torch.empty(1, 8, 2, d, device="cuda", dtype=dtype)
            with pytest.raises(ValueError, match="fp16/bf16 and head_dim a multiple of 8"):
                kernel.forward(q, q, q, True, 1.0)


def test_the_variable_length_op_refuses_fp32_and_odd_head_dims():
    with FakeTensorMode():
        cu = torch.tensor([0, 8], dtype=torch.int32, device="cuda")
        for dtype, d in ((torch.float32, 64), (torch.bfloat16, 60), (torch.bfloat16, 320)):
            q = torch.empty(8, 2, d, device="cuda", dtype=dtype)
            with pytest.raises(ValueError, match="fp16/bf16 and head_dim a multiple of 8"):
                kernels.TorchVarlenOps.forward(q, q, q, cu, cu, 8, 8, True, 1.0)


def test_kernel_problems_name_the_field_and_the_fix():
    assert kernel_problems("cpu", "float32", 60) == []
    assert kernel_problems("gpu", "bfloat16", 128) == []
    (dtype,) = kernel_problems("gpu", "float32", 128)
    assert dtype.startswith("training.mixed_precision:") and "bf16" in dtype
    (dim,) = kernel_problems("gpu", "bfloat16", 60)
    assert dim.startswith("model: head_dim 60")


def test_merge_in_chunks_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    b, s, h, d = 2, 37, 3, 8
    out, block = torch.randn(b, s, h, d), torch.randn(b, s, h, d).bfloat16()
    lse, block_lse = torch.randn(b, s, h), torch.randn(b, s, h)
    whole_out, whole_lse = out.clone(), lse.clone()
    merge_block(whole_out, whole_lse, block, block_lse)
    monkeypatch.setattr(kernels, "_MERGE_CHUNK_BYTES", 4 * b * h * d * 5)  # 5 rows a chunk
    merge_block(out, lse, block, block_lse)
    # Equal up to an ulp: vectorised bodies and scalar tails of a chunk round differently.
    torch.testing.assert_close(out, whole_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, whole_lse, atol=1e-6, rtol=1e-6)


class RecordingVarlenOps:
    """Runs the variable-length op's contract on CPU one sequence at a time (the layouts test's
    LoopVarlenOps) and keeps every call's arguments, to replay them on a fake CUDA device."""

    def __init__(self):
        self.inner, self.calls = LoopVarlenOps, []

    def forward(self, *args):
        self.calls.append(("forward", args))
        return self.inner.forward(*args)

    def backward(self, *args):
        self.calls.append(("backward", args))
        return self.inner.backward(*args)


def _on_fake_cuda(x):
    """A fake CUDA tensor of x's shape, dtype and strides (a plain value stays as it is)."""
    if not isinstance(x, torch.Tensor):
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (32, 8, 128)])
def test_cuda_document_blocks_hand_the_variable_length_op_what_it_takes(heads, kv_heads,
                                                                        head_dim):
    """On CUDA a mixed block's rectangles go to torch's variable-length flash op: every call
    the packing makes (two documents, the second also seeing the first's earlier stretch:
    one call per causal flag, forward and backward) is replayed on a fake CUDA device against
    the op's own meta kernels, which check the argument lists, layouts and dtypes and give
    the shapes the packing reads back. The numbers: benchmarks/gpu_smoke.py, on a GPU."""
    rects = ((slice(0, 16), slice(0, 16), True), (slice(16, 48), slice(0, 16), False),
             (slice(16, 48), slice(16, 48), True))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 48, heads, head_dim, generator=gen).bfloat16()
    k, v = (torch.randn(2, 48, kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2))
    ops = RecordingVarlenOps()
    out, lse = kernels.varlen_rects_forward(q, k, v, rects, 0.1, ops)
    kernels.varlen_rects_backward(torch.ones_like(out), q, k, v, out, lse, rects, 0.1, ops)
    assert [(kind, args[-2]) for kind, args in ops.calls] == [
        ("forward", False), ("forward", True), ("backward", False), ("backward", True)]
    for kind, args in ops.calls:
        with FakeTensorMode():
            fake = [_on_fake_cuda(a) for a in args]
            got = getattr(kernels.TorchVarlenOps, kind)(*fake)
        if kind == "forward":  # (q, k, v, ...), q (tokens, heads, head_dim)
            tokens = args[0].shape[0]
            assert [(t.shape, t.dtype) for t in got] == [
                (args[0].shape, torch.bfloat16), ((heads, tokens), torch.float32)]
        else:
            assert [t.shape for t in got] == [a.shape for a in args[1:4]]


def test_cuda_masked_blocks_take_the_variable_length_path(monkeypatch):
    """rects_block_forward/backward on CUDA tensors hand the block to the variable-length
    path (its calls: the test above); on CPU they keep one kernel call per rectangle."""
    taken = []
    monkeypatch.setattr(kernels, "varlen_rects_forward", lambda *a: taken.append("fwd"))
    monkeypatch.setattr(kernels, "varlen_rects_backward", lambda *a: taken.append("bwd"))
    rects = ((slice(0, 8), slice(0, 8), True),)
    with FakeTensorMode():
        x = torch.empty(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
        kernels.rects_block_forward(x, x, x, rects, 0.1, TorchCudaFlashKernel())
        kernels.rects_block_backward(x, x, x, x, x, x, rects, 0.1, TorchCudaFlashKernel())
    assert taken == ["fwd", "bwd"]


def test_ring_attention_plans_cuda_document_blocks_as_rectangles(world_of_one, monkeypatch):
    """ring_attention takes CUDA tensors with doc_starts and plans their mixed blocks as
    rectangles whatever their cost (dtype None: the CPU cost model does not apply there)."""
    from ray_jobs.ring_attention import ring as ring_module
    from ray_jobs.ring_attention.documents import as_layout

    asked = []

    class Planned(Exception):
        pass

    def plan(rank, world, local_len, layout, dtype):
        asked.append(dtype)
        raise Planned  # enough: a fake CUDA device in a CPU-only torch cannot slice

    monkeypatch.setattr(ring_module, "document_steps", plan)
    layout = as_layout(torch.tensor([0, 5, 30]), 64)  # real: the fake mode has no values
    with FakeTensorMode():
        q = torch.empty(1, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(Planned):
            ring_attention(q, q, q, group=None, doc_starts=layout)
    cpu = torch.zeros(1, 64, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(Planned):
        ring_attention(cpu, cpu, cpu, group=None, doc_starts=layout)
    assert asked == [None, torch.bfloat16]
