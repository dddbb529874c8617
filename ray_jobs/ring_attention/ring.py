"""Exact ring attention, forward and backward: a torch.autograd.Function over a ring of processes.

Each rank holds a query shard and the matching key/value shard. K/V (only the K/V heads) travel
one hop per step around the ring; the next hop is posted before the current block is computed.
Partial outputs are merged through their log-sum-exp in fp32. In backward, K/V travel again; the
gradient of a rank's own K/V (step 0) stays home, and the dK/dV accumulator of the visitors
travels with the K/V it belongs to (P - 1 hops) and is added at home after the last step.

Causal load balance (zigzag): the sequence is cut into 2P chunks and ring rank r holds chunks
r and 2P-1-r, so its local rows are [first half | second half] = [chunk r | chunk 2P-1-r].
At step s rank r holds the K/V of rank src = (r - s) mod P and computes exactly the visible part:

    src == r   local q vs local k/v, causal      (the local order is increasing in position)
    src <  r   all local q vs the FIRST half of k/v, no mask
               (chunk src is before both local chunks; chunk 2P-1-src is after both)
    src >  r   the SECOND half of local q vs all k/v, no mask
               (chunk 2P-1-r is after both visiting chunks; chunk r is before both)

Each off-diagonal step is half a full block and the diagonal step is a causal full block, also
half the work: every rank does the same work at every step, so none idles. Non-causal attention
uses contiguous shards and full blocks at every step.

Document masking (doc_starts, documents.py) keeps these blocks and the lock-step exchange, and
only changes what a block computes: nothing (skip), the plain kernel (dense), or only its
documents' pairs (masked: the masked kernel, or rectangles of the plain kernel, on CUDA in
variable-length calls). Packed documents break the zigzag balance; a layout balanced per
document (documents.balanced_layout) restores it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ray_jobs.ring_attention.comm import Exchange, Ring, resolve_ring, timed_compute
from ray_jobs.ring_attention.documents import (
    MASKED,
    SKIP,
    DocumentBlock,
    DocumentLayout,
    as_layout,
    document_steps,
)
from ray_jobs.ring_attention.kernels import (
    BlockKernel,
    build_block_kernel,
    masked_block_backward,
    masked_block_forward,
    merge_block,
    rects_block_backward,
    rects_block_forward,
)
from ray_jobs.ring_attention.saving import keep_result, kept_result
from ray_jobs.ring_attention.zigzag import BlockPlan, plan_block  # noqa: F401 (its old home)

_ALL = slice(None)
# gloo tags of the three streams (their counts tell the passes apart: record_ring_timings)
KV_TAG, GRAD_TAG, BACKWARD_KV_TAG = 1, 2, 3


def _rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    return x[:, rows]


def _step_plan(blocks, rank: int, step: int, size: int, local_len: int,
               causal: bool) -> tuple[BlockPlan, DocumentBlock | None]:
    # Without documents the plain plan; with them, the step's entry of the document plan
    # (documents.py), whose plan is the same plain plan plus its kind and mask.
    if blocks is None:
        return plan_block(rank, (rank - step) % size, local_len, causal), None
    return blocks[step].plan, blocks[step]


def _ring_forward(q, k, v, ring: Ring, causal: bool, scale: float, kernel: BlockKernel,
                  blocks: Sequence[DocumentBlock] | None = None):
    size, rank, local_len = ring.size, ring.rank, q.shape[1]
    out = lse = None
    current, spare = (k, v), None
    for step in range(size):
        exchange = None
        if step + 1 < size:
            incoming = spare or (torch.empty_like(k), torch.empty_like(v))
            exchange = Exchange(ring, current, incoming, KV_TAG)
        plan, doc = _step_plan(blocks, rank, step, size, local_len, causal)
        # A skipped block (no query sees a key of it) computes nothing; step 0 never skips.
        if doc is None or doc.kind != SKIP:
            with timed_compute(q.device):
                block_q, block_k, block_v = (_rows(q, plan.q_rows),
                                             _rows(current[0], plan.kv_rows),
                                             _rows(current[1], plan.kv_rows))
                if doc is not None and doc.kind == MASKED and doc.rects is not None:
                    block_out, block_lse = rects_block_forward(block_q, block_k, block_v,
                                                               doc.rects, scale, kernel)
                elif doc is not None and doc.kind == MASKED:
                    block_out, block_lse = masked_block_forward(block_q, block_k, block_v,
                                                                doc.mask, scale)
                else:
                    block_out, block_lse = kernel.forward(block_q, block_k, block_v,
                                                          plan.causal, scale)
                if out is None:  # step 0 covers every local row (a token always sees itself)
                    out = block_out.to(accumulator_dtype(size, q.dtype))
                    lse = block_lse.contiguous()
                else:
                    merge_block(_rows(out, plan.q_rows), _rows(lse, plan.q_rows), block_out,
                                block_lse)
                del block_out, block_lse
        if exchange is not None:
            exchange.wait()
            # The buffers just sent are free again once the exchange completed: reuse them next.
            spare = None if current[0] is k else current
            current = incoming
    return out.to(q.dtype), lse


def accumulator_dtype(size: int, dtype: torch.dtype) -> torch.dtype:
    """dtype of the running out, dq and travelling dK/dV: fp32, except on a ring of two.

    On two ranks every accumulator sums exactly two block results: it holds the first one
    (already in the input dtype, so storing it loses nothing) until the second is added in fp32
    and the sum is rounded once, the rounding an fp32 accumulator gets at the end anyway. The
    results are bit-identical (tested) at half the memory and bytes on the wire. From three ranks
    on, intermediate sums would be rounded, so accumulators are fp32.
    """
    return dtype if size <= 2 else torch.float32


def _accumulate(acc: torch.Tensor, block: torch.Tensor, rows: int = 1024) -> None:
    # Sum in fp32 and round once; row chunks keep the fp32 temporary small.
    if acc.dtype == torch.float32:
        acc.add_(block)
        return
    for start in range(0, acc.shape[1], rows):
        part = slice(start, start + rows)
        acc[:, part].copy_(acc[:, part].float().add_(block[:, part]))


def _ring_backward(dout, q, k, v, out, lse, ring: Ring, causal: bool, scale: float,
                   kernel: BlockKernel, blocks: Sequence[DocumentBlock] | None = None):
    size, rank, local_len = ring.size, ring.rank, q.shape[1]
    acc_dtype = accumulator_dtype(size, q.dtype)
    current, spare = (k, v), None
    dq = own = grads = grads_spare = grads_incoming = grads_exchange = None
    for step in range(size):
        kv_exchange = None
        if step + 1 < size:
            incoming = spare or (torch.empty_like(k), torch.empty_like(v))
            kv_exchange = Exchange(ring, current, incoming, BACKWARD_KV_TAG)
        plan, doc = _step_plan(blocks, rank, step, size, local_len, causal)
        # A skipped block adds nothing, but the dK/dV accumulator still passes through.
        skip = doc is not None and doc.kind == SKIP
        bdq = bdk = bdv = None
        with timed_compute(q.device):
            if not skip:
                args = (_rows(dout, plan.q_rows), _rows(q, plan.q_rows),
                        _rows(current[0], plan.kv_rows), _rows(current[1], plan.kv_rows),
                        _rows(out, plan.q_rows), _rows(lse, plan.q_rows))
                if doc is not None and doc.kind == MASKED and doc.rects is not None:
                    bdq, bdk, bdv = rects_block_backward(*args, doc.rects, scale, kernel)
                elif doc is not None and doc.kind == MASKED:
                    bdq, bdk, bdv = masked_block_backward(*args, doc.mask, scale)
                else:
                    bdq, bdk, bdv = kernel.backward(*args, plan.causal, scale)
                del args
            if step + 1 == size:
                current = spare = None  # the K/V buffers are done with; free them before more grads
            if step == 0:
                # Step 0 covers every local row: its results start the accumulators, and the
                # gradient of our own K/V stays home in the kernel's dtype (one block result
                # loses nothing there; the visitors' sum is added in fp32 at the end).
                dq, own = bdq.to(acc_dtype), (bdk, bdv)
            elif not skip:
                _accumulate(_rows(dq, plan.q_rows), bdq)
        if step > 0:
            # Visitors' contributions travel with the K/V (P - 1 hops) and are added at home.
            if grads_exchange is None and not skip and plan.kv_rows == _ALL:
                grads = (bdk.to(acc_dtype), bdv.to(acc_dtype))
            else:
                if grads_exchange is None:
                    grads = (torch.zeros(k.shape, dtype=acc_dtype, device=k.device),
                             torch.zeros(v.shape, dtype=acc_dtype, device=v.device))
                else:
                    grads_exchange.wait()
                    grads_spare, grads = grads, grads_incoming
                if not skip:
                    with timed_compute(q.device):
                        _accumulate(_rows(grads[0], plan.kv_rows), bdk)
                        _accumulate(_rows(grads[1], plan.kv_rows), bdv)
            del bdq, bdk, bdv
            grads_incoming = grads_spare or tuple(torch.empty_like(g) for g in grads)
            grads_exchange = Exchange(ring, grads, grads_incoming, GRAD_TAG)
        else:
            del bdq, bdk, bdv
        if kv_exchange is not None:
            kv_exchange.wait()
            spare = None if current[0] is k else current
            current = incoming
    if grads_exchange is not None:
        grads_exchange.wait()
        del grads, grads_spare
        with timed_compute(q.device):
            _accumulate(own[0], grads_incoming[0])
            _accumulate(own[1], grads_incoming[1])
    return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves the local q, k, v, the output and the fp32 log-sum-exp.

    `blocks` is this rank's document plan (documents.document_steps), None without one.
    """

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, causal: bool, scale: float, blocks=None):
        kernel = build_block_kernel(q.device)
        # Recomputed under the `attention` checkpointing policy: the first forward's results,
        # no second trip around the ring (saving.py).
        kept = kept_result()
        if kept is None:
            out, lse = _ring_forward(q, k, v, ring, causal, scale, kernel, blocks)
            keep_result(out, lse)
        else:
            out, lse = kept
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.causal, ctx.scale, ctx.kernel = ring, causal, scale, kernel
        ctx.blocks = blocks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(
            dout.contiguous(), q, k, v, out, lse, ctx.ring, ctx.causal, ctx.scale, ctx.kernel,
            ctx.blocks,
        )
        return dq, dk, dv, None, None, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, local_seq, heads, head_dim), "
                f"got shape {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, local_seq "
            "and head_dim (layout (batch, local_seq, heads, head_dim))"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) for "
            "grouped-query attention"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(
            f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            "cast them to the same dtype (e.g. torch.bfloat16)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if causal and q.shape[1] % 2 != 0:
        raise ValueError(
            f"causal ring attention needs an even local_seq (two zigzag chunks), got {q.shape[1]}: "
            "the global sequence must be divisible by 2 * ring size; shard it with zigzag_shard"
        )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: "Ring | dist.ProcessGroup | None",
    causal: bool = True,
    scale: float | None = None,
    doc_starts: "torch.Tensor | DocumentLayout | None" = None,
) -> torch.Tensor:
    """Exact attention on a sequence sharded across a ring of processes; see the package docstring.

    q: (batch, local_seq, heads, head_dim); k, v: (batch, local_seq, kv_heads, head_dim).
    Causal: shards in zigzag order (zigzag_shard); non-causal: contiguous shards in ring order.
    Returns out (batch, local_seq, heads, head_dim) in q's dtype; differentiable in q, k, v.

    doc_starts: document masking (documents.py). The global start positions of the packed
    documents of the WHOLE sequence (int64, first 0, strictly increasing; the same on every
    rank and for every row of the batch): the query at position i then sees the key at j iff
    j <= i and both lie in one document. Every rank derives the documents of every shard from
    them, so nothing extra travels. Causal zigzag only. On CUDA a mixed block runs in torch's
    variable-length flash op (kernels.varlen_rects_forward). A single document [0] is exactly
    the plain causal ring. A DocumentLayout (documents.balanced_layout) in its place: the
    sequence was permuted by it before zigzag sharding (layout.shard), so the ranks' work is
    balanced per document.
    """
    _check_inputs(q, k, v, causal)
    ring = resolve_ring(group)
    blocks = None
    if doc_starts is not None:
        if not causal:
            raise ValueError("doc_starts (document masking) needs causal=True: documents are "
                             "masked causally in zigzag shards; drop doc_starts or set causal")
        layout = as_layout(doc_starts, q.shape[1] * ring.size)
        if layout.world not in (None, ring.size):
            raise ValueError(f"doc_starts: the document layout was balanced for a ring of "
                             f"{layout.world}, this ring has {ring.size}; build it with "
                             f"balanced_layout(..., world={ring.size})")
        # On CPU a mixed block runs as rectangles only where they cost less than the masked
        # kernel (documents.rects_cost); on CUDA always (a few variable-length flash calls
        # against fp32 math over the whole block).
        blocks = document_steps(ring.rank, ring.size, q.shape[1], layout,
                                q.dtype if q.device.type == "cpu" else None)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # isend/irecv need contiguous buffers; q may stay a strided view (the kernels take strides).
    k, v = k.contiguous(), v.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    return RingAttentionFunction.apply(q, k, v, ring, causal, float(scale), blocks)
