"""Block attention kernels with log-sum-exp, and the choice among them.

    cpu   torch's CPU flash op (`_scaled_dot_product_flash_attention_for_cpu`): fp32, bf16, fp16
    cuda  flash-attn 2 (>= 2.7) when it is installed and imports, else torch's own CUDA flash op
          (`_scaled_dot_product_flash_attention`, no extra package): bf16 and fp16 only;
          document masking's mixed blocks in torch's variable-length flash op
          (`_flash_attention_forward` with cumulative lengths: TorchVarlenOps)

`select_block_kernel` makes the choice (and says why); `kernel_problems` says, without a GPU,
what a run's device, compute dtype and head dim make impossible, so preflight can refuse it
before any worker starts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
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


def _to_bhsd(q, k, v):
    """(B, S, H, D) q and (B, S, Hk, D) k, v as the torch ops take them: (B, H, S, D) views,
    K/V heads repeated to the query heads (the ops' GQA is not relied on). Returns them and the
    repeat factor."""
    groups = q.shape[2] // k.shape[2]
    return (q.transpose(1, 2), _repeat_kv(k, groups).transpose(1, 2),
            _repeat_kv(v, groups).transpose(1, 2), groups)


def _from_bhsd_grads(dq, dk, dv, groups):
    """The ops' (B, H, S, D) gradients back in (B, S, H, D), dk/dv summed to the K/V heads."""
    dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    return dq, _reduce_kv(dk, groups), _reduce_kv(dv, groups)


class CpuFlashKernel:
    """`aten._scaled_dot_product_flash_attention_for_cpu` and its backward
    (layout (B, H, S, D) views).

    The CPU op has no GQA support, so K/V heads are repeated locally for the call and the
    key/value gradients are summed back to the K/V heads; the ring itself only moves K/V heads.
    """

    name = "torch-cpu-flash"

    def forward(self, q, k, v, causal, scale):
        qt, kt, vt, _ = _to_bhsd(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse.transpose(1, 2)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        qt, kt, vt, groups = _to_bhsd(q, k, v)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse.transpose(1, 2), 0.0,
            causal, scale=scale)
        return _from_bhsd_grads(*grads, groups)


_MASKED_CHUNK_BYTES = 64 * 2**20  # fp32 scores of one row chunk of a masked block


def _masked_row_chunks(q: torch.Tensor, keys: int) -> list[slice]:
    # Query rows per chunk so that one chunk's (B, H, rows, Sk) fp32 scores fit the budget.
    per_row = 4 * q.shape[0] * q.shape[2] * max(keys, 1)
    rows = max(1, _MASKED_CHUNK_BYTES // per_row)
    return [slice(start, start + rows) for start in range(0, q.shape[1], rows)]


def _masked_scores(q, k, mask, scale):
    """fp32 scores (B, H, Sq, Sk) with the pairs outside `mask` at -inf."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return scores.masked_fill_(~mask.to(q.device), float("-inf"))


def masked_block_forward(q, k, v, mask, scale):
    """Attention of a block under a (Sq, Sk) boolean mask (True = attend), shared by the batch
    and heads: (out in q's dtype, lse (B, Sq, H) fp32), the layout of the flash kernels.

    Document masking's mixed blocks (documents.py). Plain torch math in fp32 rather than
    per-document sub-blocks through the flash kernel: one exact code path whatever the
    documents look like (a block may cut thousands of tiny documents, one kernel call each).
    Query rows go in chunks so the fp32 scores stay within _MASKED_CHUNK_BYTES; `mask` is
    anything whose [rows] gives those rows' (rows, Sk) bool mask (a tensor, or
    documents.DocumentMask, which builds them on demand). A row that sees no key gets out 0
    and lse -inf, which merge_block folds in as nothing. Device-agnostic ops; on CUDA only
    for a block the rectangles cannot cover (never in a zigzag ring: documents.block_rects).
    """
    groups = q.shape[2] // k.shape[2]
    kf, vf = _repeat_kv(k, groups).float(), _repeat_kv(v, groups).float()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for rows in _masked_row_chunks(q, k.shape[1]):
        scores = _masked_scores(q[:, rows], kf, mask[rows], scale)
        chunk_lse = torch.logsumexp(scores, dim=-1)  # (B, H, rows); -inf: a row sees nothing
        probs = scores.sub_(chunk_lse.nan_to_num(neginf=0.0).unsqueeze(-1)).exp_()
        out[:, rows] = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
        lse[:, rows] = chunk_lse.transpose(1, 2)
    return out, lse


def masked_block_backward(dout, q, k, v, out, lse, mask, scale):
    """(dq, dk, dv) of a masked block given the GLOBAL out and lse (B, Sq, H) fp32, which are
    finite on every row (each token sees itself); dk/dv summed to the K/V heads, input dtypes.

    The flash backward's math in fp32, in the forward's row chunks: P = exp(S - lse) (0
    outside the mask), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K,
    dK = scale dS^T Q; dK and dV sum over the chunks in fp32.
    """
    groups = q.shape[2] // k.shape[2]
    kf, vf = _repeat_kv(k, groups).float(), _repeat_kv(v, groups).float()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # (B, Sk, H, D) in query heads, contiguous: the ring may send dk/dv as they are
    dk = torch.zeros(kf.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(vf.shape, dtype=torch.float32, device=q.device)
    for rows in _masked_row_chunks(q, k.shape[1]):
        qc, do = q[:, rows].float(), dout[:, rows].float()
        scores = _masked_scores(qc, kf, mask[rows], scale)
        probs = scores.sub_(lse[:, rows].transpose(1, 2).unsqueeze(-1)).exp_()
        dv += torch.einsum("bhqk,bqhd->bkhd", probs, do)
        delta = (do * out[:, rows].float()).sum(-1).transpose(1, 2).unsqueeze(-1)
        dscores = probs.mul_(torch.einsum("bqhd,bkhd->bhqk", do, vf).sub_(delta)).mul_(scale)
        dq[:, rows] = torch.einsum("bhqk,bkhd->bqhd", dscores, kf)
        dk += torch.einsum("bhqk,bqhd->bkhd", dscores, qc)
    return dq, _reduce_kv(dk, groups).to(k.dtype), _reduce_kv(dv, groups).to(v.dtype)


def rects_block_forward(q, k, v, rects, scale, kernel: BlockKernel):
    """Attention of a block whose allowed pairs are the rectangles `rects` ((query rows, key
    rows, causal), documents.block_rects): the plain kernel on each, merged by log-sum-exp in
    fp32. (out in q's dtype, lse (B, Sq, H) fp32); a row no rectangle covers gets out 0 and
    lse -inf, as masked_block_forward gives it. On CUDA: varlen_rects_forward, a few
    variable-length calls instead of one call per rectangle."""
    if q.is_cuda:
        return varlen_rects_forward(q, k, v, rects, scale)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    for rows, keys, causal in rects:
        block_out, block_lse = kernel.forward(q[:, rows], k[:, keys], v[:, keys], causal, scale)
        merge_block(out[:, rows], lse[:, rows], block_out, block_lse, empty_rows=True)
    return out.to(q.dtype), lse


def rects_block_backward(dout, q, k, v, out, lse, rects, scale, kernel: BlockKernel):
    """(dq, dk, dv) of rects_block_forward's block given the GLOBAL out and lse: each
    rectangle's plain backward (its probabilities are exp(S - lse) with the global lse, so the
    rectangles' gradients add), summed in fp32; input dtypes. On CUDA: varlen_rects_backward."""
    if q.is_cuda:
        return varlen_rects_backward(dout, q, k, v, out, lse, rects, scale)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for rows, keys, causal in rects:
        bdq, bdk, bdv = kernel.backward(dout[:, rows], q[:, rows], k[:, keys], v[:, keys],
                                        out[:, rows], lse[:, rows], causal, scale)
        dq[:, rows] += bdq
        dk[:, keys] += bdk
        dv[:, keys] += bdv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- A masked block's rectangles on CUDA: a few variable-length flash calls -----------------
#
# Per-rectangle kernel calls (rects_block_forward) cost a launch each, and a block may cut
# hundreds of documents. torch's variable-length flash op takes many (query, key) sequences of
# a packed (tokens, heads, head_dim) tensor in one call, each with its own length
# (cumulative lengths cu_q / cu_kv, int32), and returns the log-sum-exp per packed query row
# ((heads, tokens) fp32), so partial results still merge exactly. One causal flag per call and
# each query row at most once per call: a document's query stretch that meets its earlier key
# stretches and itself goes into successive calls (at most 2-3 in a zigzag ring), merged by
# log-sum-exp. Each row of the batch is one more sequence of the same call.


@dataclass(frozen=True)
class VarlenCall:
    """One variable-length call of a masked block: the packed rows of the block's flattened
    (B * Sq) queries and (B * Sk) keys, the sequences' cumulative lengths (int32), and whether
    no earlier call of the block wrote its query rows (`fresh`: its results need no merge)."""

    causal: bool
    q_index: torch.Tensor
    kv_index: torch.Tensor
    cu_q: torch.Tensor
    cu_kv: torch.Tensor
    max_q: int
    max_kv: int
    fresh: bool


# Packed query and key rows per call, at most (a longer single sequence is one call): bounds
# what a call copies (its rows of q, dout and out, its K/V rows repeated to the query heads, and
# its results) to about 1.2 GB on the 8B's 32 heads of 128, in the backward.
VARLEN_CALL_ROWS = 1 << 15


def varlen_calls(rects, batch: int, q_len: int, kv_len: int,
                 device: torch.device) -> tuple[VarlenCall, ...]:
    """The calls covering `rects` (documents.block_rects) for a batch of `batch` rows."""
    key = tuple((r.start, r.stop, c.start, c.stop, causal) for r, c, causal in rects)
    return _varlen_calls(key, batch, q_len, kv_len, torch.device(device))


# A sample's masked blocks, asked again by every layer, forward and backward. Their index
# tensors live on the GPU: 8 bytes per packed row, about 2 MB a block at 64K tokens a rank.
@functools.lru_cache(maxsize=32)
def _varlen_calls(key, batch, q_len, kv_len, device) -> tuple[VarlenCall, ...]:
    # Query stretches are equal or disjoint (documents' runs): the n-th rectangle of a stretch
    # (per causal flag) goes to round n, and a round to as many calls as VARLEN_CALL_ROWS asks.
    rounds: dict[tuple[bool, int], list[tuple[int, int, int, int]]] = {}
    seen: dict[tuple[bool, int], int] = {}
    for r0, r1, c0, c1, causal in key:
        n = seen.get((causal, r0), 0)
        seen[(causal, r0)] = n + 1
        rounds.setdefault((causal, n), []).append((r0, r1, c0, c1))
    built, written = [], set()
    for (causal, _), members in sorted(rounds.items()):
        sequences = [(b * q_len + r0, b * q_len + r1, b * kv_len + c0, b * kv_len + c1)
                     for b in range(batch) for r0, r1, c0, c1 in members]
        while sequences:
            rows, take = 0, 0
            for r0, r1, c0, c1 in sequences:
                if take and rows + (r1 - r0) + (c1 - c0) > VARLEN_CALL_ROWS:
                    break
                rows += (r1 - r0) + (c1 - c0)
                take += 1
            part, sequences = sequences[:take], sequences[take:]
            q_index, kv_index, cu_q, cu_kv = [], [], [0], [0]
            for r0, r1, c0, c1 in part:
                q_index.extend(range(r0, r1))
                kv_index.extend(range(c0, c1))
                cu_q.append(cu_q[-1] + r1 - r0)
                cu_kv.append(cu_kv[-1] + c1 - c0)
            starts = {r0 for r0, _, _, _ in part}
            # torch.tensor from lists: the one way to build them on a fake CUDA device (tests)
            built.append(VarlenCall(
                causal, torch.tensor(q_index, dtype=torch.int64, device=device),
                torch.tensor(kv_index, dtype=torch.int64, device=device),
                torch.tensor(cu_q, dtype=torch.int32, device=device),
                torch.tensor(cu_kv, dtype=torch.int32, device=device),
                max(r1 - r0 for r0, r1, _, _ in part), max(c1 - c0 for _, _, c0, c1 in part),
                fresh=not starts & written))
            written |= starts
    return tuple(built)


class TorchVarlenOps:
    """torch's variable-length CUDA flash op, `aten._flash_attention_forward/_backward` with
    cumulative lengths: the op under torch.nn.attention.varlen, called directly for its
    backward, which takes the GLOBAL out and log-sum-exp as the ring needs. Layout: q, k, v,
    out (tokens, heads, head_dim), K/V heads repeated to the query heads (as for the dense
    kernels); lse (heads, tokens) fp32. Causal rectangles are square, where the op's
    bottom-right causal alignment is the ring's. Dropout 0: the RNG state is a placeholder.
    Checked here only under FakeTensorMode (signatures, shapes, dtypes); benchmarks/gpu_smoke.py
    checks its numbers on a GPU."""

    name = "torch-cuda-varlen-flash"

    @staticmethod
    def forward(q, k, v, cu_q, cu_kv, max_q, max_kv, causal, scale):
        _check_cuda_shapes(q, "torch's variable-length flash")
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_kv, max_q, max_kv, 0.0, causal, False, scale=scale)
        return out, lse

    @staticmethod
    def backward(dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv, causal, scale):
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty(0, device=q.device)
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv, 0.0, causal, rng_state,
            unused, scale=scale)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """(B, S, h, D) as (B * S, h, D): the flattened rows the calls index."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _gather_heads(x: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows `index` of packed K or V, their heads repeated to the query heads (after the
    gather: only the call's rows are copied `groups` times)."""
    rows = x.index_select(0, index)
    return rows if groups == 1 else rows.repeat_interleave(groups, dim=1)


def varlen_rects_forward(q, k, v, rects, scale, ops=TorchVarlenOps):
    """rects_block_forward in variable-length calls (`ops`: TorchVarlenOps on CUDA; any
    object with its two methods, e.g. a per-sequence loop on CPU in the tests): the same
    (out in q's dtype, lse (B, Sq, H) fp32), a row no rectangle covers at 0 and -inf."""
    b, sq, h, d = q.shape
    groups = h // k.shape[2]
    qf, kf, vf = _packed(q), _packed(k), _packed(v)
    out = torch.zeros(b * sq, h, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b * sq, h), float("-inf"), dtype=torch.float32, device=q.device)
    for call in varlen_calls(rects, b, sq, k.shape[1], q.device):
        qi, ki = call.q_index, call.kv_index
        block_out, block_lse = ops.forward(
            qf.index_select(0, qi), _gather_heads(kf, ki, groups), _gather_heads(vf, ki, groups),
            call.cu_q, call.cu_kv, call.max_q, call.max_kv, call.causal, scale)
        if call.fresh:  # nothing to merge with (each packed row sees at least one key)
            out.index_copy_(0, qi, block_out.float())
            lse.index_copy_(0, qi, block_lse.t().float())
            continue
        rows_out, rows_lse = out.index_select(0, qi), lse.index_select(0, qi)
        merge_block(rows_out[None], rows_lse[None], block_out[None], block_lse.t()[None],
                    empty_rows=True)
        out.index_copy_(0, qi, rows_out)
        lse.index_copy_(0, qi, rows_lse)
    return out.view(b, sq, h, d).to(q.dtype), lse.view(b, sq, h)


def varlen_rects_backward(dout, q, k, v, out, lse, rects, scale, ops=TorchVarlenOps):
    """rects_block_backward in variable-length calls: each call's backward with the GLOBAL out
    and lse of its rows, the gradients added at their rows in fp32 (dk, dv summed to the K/V
    heads per call); input dtypes."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    groups = h // hk
    qf, kf, vf = _packed(q), _packed(k), _packed(v)
    doutf, outf, lsef = _packed(dout), _packed(out), lse.reshape(b * sq, h)
    dq = torch.zeros(b * sq, h, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(b * sk, hk, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    for call in varlen_calls(rects, b, sq, sk, q.device):
        qi, ki = call.q_index, call.kv_index
        bdq, bdk, bdv = ops.backward(
            doutf.index_select(0, qi), qf.index_select(0, qi), _gather_heads(kf, ki, groups),
            _gather_heads(vf, ki, groups), outf.index_select(0, qi),
            lsef.index_select(0, qi).t().contiguous(), call.cu_q, call.cu_kv, call.max_q,
            call.max_kv, call.causal, scale)
        dq.index_add_(0, qi, bdq.float())
        dk.index_add_(0, ki, _reduce_kv(bdk.float()[None], groups)[0])
        dv.index_add_(0, ki, _reduce_kv(bdv.float()[None], groups)[0])
    return (dq.view(b, sq, h, d).to(q.dtype), dk.view(b, sk, hk, d).to(k.dtype),
            dv.view(b, sk, hk, d).to(v.dtype))

HALF = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # both CUDA flash kernels: head_dim a multiple of 8, at most 256


def _check_cuda_shapes(q: torch.Tensor, kernel: str) -> None:
    # The CUDA flash kernels have no fp32 path and pad head dims that are not multiples of 8
    # (returning padded outputs): refuse both here rather than deep inside CUDA code.
    d = q.shape[-1]
    if q.dtype not in HALF or d % 8 or d > MAX_HEAD_DIM:
        raise ValueError(
            f"{kernel} ring attention needs fp16/bf16 and head_dim a multiple of 8 up to "
            f"{MAX_HEAD_DIM}, got {q.dtype} and head_dim {d}; compute in torch.bfloat16 "
            "(training.mixed_precision: bf16)"
        )


class TorchCudaFlashKernel:
    """torch's own CUDA flash op, `aten._scaled_dot_product_flash_attention` (it returns the
    (B, H, S) fp32 log-sum-exp), and its backward: the CUDA kernel that needs no extra package.

    Layout (B, H, S, D) views, as on CPU. K/V heads are repeated for the call and their
    gradients summed back, as on CPU: the op's GQA support is not part of its documented
    contract. The backward takes the GLOBAL out and lse; dropout is 0, so the philox seed and
    offset are placeholders of the forward's shapes (the op reads them only with dropout).
    Checked here only under FakeTensorMode (signatures, shapes, dtypes); benchmarks/gpu_smoke.py
    checks its numbers on a GPU.
    """

    name = "torch-cuda-flash"

    def forward(self, q, k, v, causal, scale):
        _check_cuda_shapes(q, "torch's CUDA flash")
        qt, kt, vt, _ = _to_bhsd(q, k, v)
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
            qt, kt, vt, 0.0, causal, False, scale=scale)
        return out.transpose(1, 2), lse.transpose(1, 2)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        qt, kt, vt, groups = _to_bhsd(q, k, v)
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        # (grad_out, q, k, v, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
        #  is_causal, philox_seed, philox_offset)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2),
            lse.transpose(1, 2).contiguous(), None, None, q.shape[1], k.shape[1], 0.0, causal,
            seed, offset, scale=scale)
        return _from_bhsd_grads(*grads, groups)


class FlashAttnKernel:
    """flash-attn 2 (>= 2.7) `_flash_attn_forward/_flash_attn_backward` on CUDA, native GQA.

    Imported lazily so CPU code paths never import flash-attn. UNEXERCISED here (no GPU): written
    against flash-attn 2.7's `flash_attn/flash_attn_interface.py`, whose forward returns
    (out, softmax_lse (B, H, S) fp32, S_dmask, rng_state) and whose backward writes dq, dk, dv
    in place. Causal masks of unequal lengths are bottom-right aligned there, but the ring only
    asks for causal on square diagonal blocks, where both conventions agree.
    """

    name = "flash-attn"

    def __init__(self) -> None:
        try:
            from flash_attn import __version__ as version
            from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward
        except ImportError as err:  # absent, or built against another torch (undefined symbol)
            raise ImportError(
                f"flash-attn does not import ({err}); it is optional: `make flash-attn` builds it "
                "(pip install --no-build-isolation 'flash-attn>=2.7', needs nvcc and CUDA_HOME)"
            ) from err
        major, minor = (int(x) for x in version.split(".")[:2])
        if (major, minor) < (2, 7):
            raise ImportError(
                f"flash-attn {version} found, ring attention needs >= 2.7 (window_size_left/right "
                "arguments): pip install --no-build-isolation -U 'flash-attn>=2.7'"
            )
        self._fwd = _flash_attn_forward
        self._bwd = _flash_attn_backward
        self.version = version

    def forward(self, q, k, v, causal, scale):
        _check_cuda_shapes(q, "flash-attn")
        out, lse, _, _ = self._fwd(q, k, v, 0.0, scale, causal, -1, -1, 0.0, None, False)
        return out, lse.transpose(1, 2)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._bwd(
            dout, q, k, v, out, lse.transpose(1, 2).contiguous(),
            dq, dk, dv, 0.0, scale, causal, -1, -1, 0.0, None, False, None,
        )
        return dq, dk, dv


@dataclass(frozen=True)
class KernelChoice:
    """The block kernel a device uses, and why (logged and recorded in the run directory)."""

    name: str
    reason: str
    kernel: BlockKernel

    def record(self) -> dict:
        return {"kernel": self.name, "reason": self.reason}


@functools.cache
def select_block_kernel(device_type: str) -> KernelChoice:
    """The block kernel for a device type: on CUDA flash-attn when it imports (>= 2.7), else
    torch's own CUDA flash op; on CPU torch's CPU flash op."""
    if device_type == "cpu":
        return KernelChoice(CpuFlashKernel.name, "the CPU device", CpuFlashKernel())
    if device_type == "cuda":
        try:
            kernel = FlashAttnKernel()
        except ImportError as err:
            reason = str(err).splitlines()[0]
            return KernelChoice(TorchCudaFlashKernel.name, f"flash-attn not used: {reason}",
                                TorchCudaFlashKernel())
        return KernelChoice(kernel.name, f"flash-attn {kernel.version} imported", kernel)
    raise ValueError(f"ring attention has no block kernel for device {device_type}; "
                     "use cpu or cuda tensors")


def build_block_kernel(device: torch.device) -> BlockKernel:
    """The block kernel for a device (select_block_kernel's choice)."""
    return select_block_kernel(device.type).kernel


def kernel_problems(device: str, dtype: str, head_dim: int) -> list[str]:
    """What the block kernels cannot do for a run computing in `dtype` ("float32", "bfloat16")
    on `device` ("cpu", "gpu"), one line each with its fix; empty when it can run."""
    if device != "gpu":
        return []
    problems = []
    if dtype not in ("bfloat16", "float16"):
        problems.append(
            f"training.mixed_precision: attention would compute in {dtype} on GPUs, which "
            "torch's CUDA flash kernel and flash-attn do not support; use mixed_precision: bf16 "
            "(or auto), keeping model.dtype float32 for the master weights")
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        problems.append(
            f"model: head_dim {head_dim} (hidden_size / num_attention_heads) must be a multiple "
            f"of 8 up to {MAX_HEAD_DIM} for the CUDA flash kernels; change hidden_size or "
            "num_attention_heads")
    return problems


_MERGE_CHUNK_BYTES = 64 * 2**20  # fp32 temporaries of one merge chunk


def merge_block(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                block_lse: torch.Tensor, empty_rows: bool = False) -> None:
    """Fold one block's partial attention into the running (out, lse), in place, in fp32.

    out: (B, S, H, D) fp32 (or the input dtype on 2-rank rings, see ring.accumulator_dtype);
    lse: (B, S, H) fp32; block_*: the same rows from a block kernel. The arithmetic is fp32.
    The block's weight is
    w = exp(block_lse) / (exp(lse) + exp(block_lse)) = sigmoid(block_lse - lse),
    computed from the DIFFERENCE of the two lse so large magnitudes lose no precision; then
    out = lerp(out, block_out, w), one fused elementwise pass, and lse = logaddexp(lse,
    block_lse). A row that saw no key yet (lse = -inf) takes the block's values (w = 1); a block
    row that sees no key (block_lse = -inf, a masked block's row) changes nothing (w = 0).
    Both at once (-inf - -inf: NaN) needs `empty_rows`, which zeroes those weights: one more
    pass, 2-9 % of a merge, that the ring never needs (its running lse is finite from step 0 on,
    where every token sees itself, document masking or not).
    """
    # Chunks of rows bound the fp32 temporaries (the block's upcast) to _MERGE_CHUNK_BYTES
    # instead of a copy of the whole shard; a tiny or short shard is one chunk.
    row_bytes = 4 * out.shape[0] * out.shape[2] * out.shape[3]
    rows_per_chunk = max(1, _MERGE_CHUNK_BYTES // row_bytes)
    for start in range(0, out.shape[1], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        o, m, bo, bm = out[:, rows], lse[:, rows], block_out[:, rows], block_lse[:, rows]
        w = torch.sigmoid(bm - m)
        if empty_rows:  # a row that saw no key on either side (both -inf: NaN) keeps out
            w.nan_to_num_(0.0)
        w = w.unsqueeze(-1)
        if o.dtype == torch.float32:
            o.lerp_(bo.float(), w)
        else:  # a bf16 accumulator: the same fp32 arithmetic, rounded once
            o.copy_(o.float().lerp_(bo.float(), w))
        m.copy_(torch.logaddexp(m, bm))
