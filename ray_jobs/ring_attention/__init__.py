"""Exact ring attention (forward and backward) for Hugging Face Llama over gloo (CPU) or NCCL (GPU).

Public API
----------
ring_attention(q, k, v, *, group, causal=True, scale=None, doc_starts=None) -> out
    Local shards, layout (batch, local_seq, heads, head_dim) for q and out,
    (batch, local_seq, kv_heads, head_dim) for k and v (heads % kv_heads == 0; only the K/V
    heads travel). Causal: shards in zigzag order (`zigzag_shard`), local_seq even.
    Non-causal: contiguous shards in ring order (`contiguous_shard`). `group` is a `Ring`
    (`ray_jobs.train.parallelize.build_mesh(...).ring`), a process group (ring order = its rank
    order) or None (the world).
    Any strides are accepted: k and v are copied once into contiguous send buffers if needed.
    Exact: same math as single-device attention; log-sum-exp merge in fp32; out/dq/dK/dV
    accumulate in fp32 (in the input dtype on 2-rank rings, where that is bit-identical).
    dK/dV travel home with their K/V. CPU tensors use PyTorch's CPU flash kernel; CUDA
    tensors flash-attn >= 2.7 when it imports (optional, imported lazily), else torch's own
    CUDA flash op (select_block_kernel says which, and why).
    No dropout. doc_starts (int64 global start positions of the packed documents of the whole
    sequence, the same on every rank) masks attention to causal within each document
    (`documents.py`: each ring block is skipped, run by the plain kernel, or run masked; nothing
    extra travels; sequence_parallel_attention passes it to its ring). Causal zigzag on CPU only
    so far. Or a DocumentLayout (documents.balanced_layout: the sequence permuted per document
    before sharding, layout.shard, so every rank does about the same work). Through the HF
    hook: model(..., doc_starts=[one tensor or layout per row]) (hf.py attention_by_layout runs
    the rows a document layout at a time).
zigzag_shard(x, dim, rank, world) / zigzag_unshard(x, dim, world, group=None)
    Ring rank r holds chunks r and 2*world-1-r of 2*world; unshard takes the list of all shards
    in ring order, or this rank's shard and all-gathers over `group`.
zigzag_position_ids, contiguous_shard, contiguous_unshard: helpers of the same kind.
sequence_parallel_attention(q, k, v, *, mesh, causal=True, scale=None, doc_starts=None) -> out
    Layered sequence parallelism (Ulysses x ring, `ulysses.py`): `mesh` a SequenceMesh
    (build_sequence_mesh(ulysses, ring), or ray_jobs.train.parallelize.build_mesh(...).sequence);
    shards from sequence_shard / sequence_position_ids. ulysses 1 is ring_attention exactly.
Hugging Face (transformers >= 5):
    apply_ring_attention(model, ring)   # a Ring, or a SequenceMesh for Ulysses x ring
    # every attention module of the model now runs attn_implementation="ring" around `ring`;
    # another model in the same process may be bound to another ring
The training recipe around it (device mesh from a plan's rings, FSDP2, activation
checkpointing, the chunked ring-mean loss) is ray_jobs.train.parallelize.
record_ring_timings(): context manager collecting compute and communication-wait seconds.
"""

from ray_jobs.ring_attention.comm import Ring, RingTimings, record_ring_timings, resolve_ring
from ray_jobs.ring_attention.hf import apply_ring_attention, ring_attention_forward
from ray_jobs.ring_attention.kernels import KernelChoice, merge_block, select_block_kernel
from ray_jobs.ring_attention.ring import ring_attention
from ray_jobs.ring_attention.ulysses import (
    SequenceMesh,
    build_sequence_mesh,
    sequence_parallel_attention,
    sequence_position_ids,
    sequence_shard,
)
from ray_jobs.ring_attention.zigzag import (
    contiguous_shard,
    contiguous_unshard,
    zigzag_position_ids,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = [
    "KernelChoice", "Ring", "RingTimings", "SequenceMesh", "apply_ring_attention",
    "build_sequence_mesh", "contiguous_shard", "contiguous_unshard", "merge_block",
    "record_ring_timings", "resolve_ring", "ring_attention", "ring_attention_forward",
    "select_block_kernel", "sequence_parallel_attention", "sequence_position_ids",
    "sequence_shard", "zigzag_position_ids", "zigzag_shard", "zigzag_unshard",
]
