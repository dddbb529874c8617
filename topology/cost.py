"""Cost model: a stage's step time, its parts and memory per GPU, from the graph and the rings."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from specs.degrees import CheckpointPolicy, ParallelDims
from specs.run import RunSpec, StageSpec
from topology.documents import DocumentWork, Histogram, document_work, histogram_of
from topology.graph import Link, Router
from topology.profile import HardwareProfile
from topology.routes import route_table

GB = 1e9


class StageDoesNotFit(ValueError):
    """A stage whose per-GPU memory exceeds the GPU's."""


class LinkLoads(Mapping):
    """Transfers per directed link (only links that carry any), built from a count array."""

    def __init__(self, links: list[Link], used: np.ndarray, counts: np.ndarray):
        self._links, self._used, self._counts = links, used, counts
        self._index = None

    def _ids(self) -> dict[Link, int]:
        if self._index is None:
            self._index = {self._links[i]: c for i, c in zip(self._used.tolist(),
                                                              self._counts.tolist())}
        return self._index

    def __getitem__(self, link: Link) -> int:
        return self._ids()[link]

    def __iter__(self):
        return iter(self._ids())

    def __len__(self) -> int:
        return len(self._ids())

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(link ids in Router numbering, transfers on each): the loads as arrays."""
        return self._used, self._counts


def stage_attention(stage: StageSpec) -> str:
    """The stage's attention masking, `causal` or `document` (StageSpec.attention): the one
    place the planner reads it."""
    return stage.attention


def policy_without_memory_model(stage: StageSpec) -> CheckpointPolicy:
    """The stage's activation checkpointing policy where nothing measures memory: its own, or
    `full` for 'auto' (the policy that fits wherever any does)."""
    return "full" if stage.activation_checkpointing == "auto" else stage.activation_checkpointing


@dataclass(frozen=True)
class FlowResult:
    """Concurrent transfers of `nbytes` each: the slowest one and the link that limits it."""

    seconds: float  # time of the slowest transfer
    latency_s: float  # its latency part
    bandwidth_gb_s: float  # its fair-share bandwidth
    bottleneck: Link | None
    loads: Mapping[Link, int]  # transfers per directed link
    hop_seconds: list[float]  # per transfer, in input order


def evaluate_flows(router: Router, flows: list[tuple[str, str]], nbytes: float) -> FlowResult:
    """All `flows` (src GPU, dst GPU) run at once; each gets, on every link it crosses, an equal
    share of the link's bandwidth; its rate is its smallest share (fair sharing, no max-min
    redistribution). Complexity: O(sum of route lengths)."""
    if not flows:
        return FlowResult(0.0, 0.0, float("inf"), None, {}, [])
    index = route_table(router).index
    src = np.fromiter((index[a] for a, _ in flows), dtype=np.int64, count=len(flows))
    dst = np.fromiter((index[b] for _, b in flows), dtype=np.int64, count=len(flows))
    return evaluate_index_flows(router, src, dst, nbytes)


def evaluate_index_flows(router: Router, src: np.ndarray, dst: np.ndarray,
                         nbytes: float) -> FlowResult:
    """`evaluate_flows` for GPUs given as RouteTable indices (no string lookups)."""
    if len(src) == 0:
        return FlowResult(0.0, 0.0, float("inf"), None, {}, [])
    routes = route_table(router).routes(src, dst)
    valid = routes >= 0
    lengths = valid.sum(axis=1)
    flat = routes[valid]  # row-major: each flow's links together, flows in input order
    # transfers per link by counting, not sorting (np.unique): link ids are dense, and this
    # was most of the planner's time at 4,096 GPUs
    per_id = np.bincount(flat, minlength=len(router.links))
    used = np.flatnonzero(per_id)
    counts = per_id[used]
    per_link = router.bandwidth[flat] / per_id[flat]
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    bw = np.minimum.reduceat(per_link, starts)
    lat = np.add.reduceat(router.latency_us[flat], starts) * 1e-6
    times = lat + nbytes / (bw * GB)
    w = int(np.argmax(times))
    limit = int(flat[starts[w] + int(np.argmin(per_link[starts[w]:starts[w] + lengths[w]]))])
    return FlowResult(float(times[w]), float(lat[w]), float(bw[w]), router.links[limit],
                      LinkLoads(router.links, used, counts), times.tolist())


def ring_index_flows(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ring_flows` of rings given as a (rings, ring size) index array."""
    if idx.shape[1] < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return idx.ravel(), np.roll(idx, -1, axis=1).ravel()


def ring_flows(rings: list[list[str]]) -> list[tuple[str, str]]:
    """Each rank sends to the next rank of its ring (the last to the first)."""
    return [(r[i], r[(i + 1) % len(r)]) for r in rings if len(r) > 1 for i in range(len(r))]


def dp_flows(rings: list[list[str]]) -> list[tuple[str, str]]:
    """Data-parallel groups: the GPUs with the same ring rank, in ring-index order (a ring
    all-reduce over them)."""
    if len(rings) < 2:
        return []
    groups = [[r[k] for r in rings] for k in range(len(rings[0]))]
    return ring_flows(groups)


@dataclass(frozen=True)
class StageShape:
    """What the cost model needs of the model and the stage (numbers only)."""

    seq_len: int
    ring: int
    dp: int
    batch_size: int
    grad_accum: int
    steps: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int
    elem_bytes: int  # bytes of the compute dtype: activations, gathered weights, K/V blocks
    shard: int | None = None  # GPUs sharding the model state; None: the ring's
    state_bytes: int = 4  # bytes of the weights' storage dtype (master weights, grads, AdamW)
    loss_chunk: int = 1024  # tokens whose logits exist at once
    checkpointing: CheckpointPolicy = "full"  # activation checkpointing per decoder layer
    ulysses: int = 1  # GPUs per ring position splitting the heads (all-to-all)
    # the family's weights beyond Llama's (specs.run.ModelSpec): q/k/v biases (qwen2; llama and
    # qwen3 with attention_bias), an o_proj bias (llama, qwen3), q/k RMSNorm (qwen3), lm_head
    # tied to the embedding
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tied: bool = False
    # attention masking (stage_attention) and the packed documents' lengths (data.
    # document_lengths, normalised): `document` is priced by them, `causal` ignores them
    attention: str = "causal"
    document_lengths: Histogram | None = None

    @classmethod
    def of(cls, run: RunSpec, stage: StageSpec, dims: ParallelDims,
           policy: CheckpointPolicy | None = None) -> StageShape:
        """The stage on the layout `dims` (its degrees, not the stage's possibly 'auto' ones)
        under activation checkpointing `policy` (None: the stage's; 'full' for its 'auto')."""
        if policy is None:
            policy = policy_without_memory_model(stage)
        model = run.model
        return cls(seq_len=stage.seq_len, ring=dims.ring, dp=dims.dp, shard=dims.shard,
                   ulysses=dims.ulysses, batch_size=stage.batch_size,
                   grad_accum=stage.grad_accum_steps, steps=stage.steps,
                   layers=model.num_hidden_layers, hidden=model.hidden_size,
                   intermediate=model.intermediate_size, heads=model.num_attention_heads,
                   kv_heads=model.num_key_value_heads, head_dim=model.head_dim,
                   vocab=model.vocab_size, params=model.num_parameters,
                   elem_bytes=_bytes(run.compute_dtype), state_bytes=_bytes(model.dtype),
                   loss_chunk=run.training.loss_chunk_tokens,
                   checkpointing=policy, qkv_bias=model.qkv_bias, o_bias=model.o_bias,
                   qk_norm=model.qk_norm, tied=model.tie_word_embeddings,
                   attention=stage_attention(stage),
                   document_lengths=histogram_of(run.data.document_lengths))

    def with_attention(self, attention: str) -> StageShape:
        """The same stage under another attention masking."""
        return StageShape(**{**self.__dict__, "attention": attention})

    @property
    def documents(self) -> DocumentWork | None:
        """The sampled block work of `document` masking (topology.documents.document_work);
        None under `causal`, or without a histogram to sample (priced as `causal` then: each
        block's allowed pairs are a subset of the causal ones, so it is an upper bound)."""
        if self.attention != "document" or self.document_lengths is None:
            return None
        return document_work(self.document_lengths, self.seq_len, self.ring)

    @property
    def shard_ways(self) -> int:
        return self.shard or self.ring * self.ulysses

    @property
    def local_tokens(self) -> int:
        """Tokens per GPU: the sequence split over ring x ulysses GPUs."""
        return self.seq_len // (self.ring * self.ulysses)

    @property
    def ring_kv_heads(self) -> float:
        """K/V heads each GPU passes around its ring: all of them without Ulysses; with it a
        1/ulysses share of the K/V heads, each replicated ulysses / kv_heads times when the
        degree exceeds them (ring_attention.ulysses.kv_replication)."""
        rep = self.ulysses // self.kv_heads if self.ulysses > self.kv_heads else 1
        return self.kv_heads * rep / self.ulysses

    @property
    def kv_block_bytes(self) -> float:
        """K and V of a ring position's tokens, for this GPU's heads: what one ring step passes
        on (without Ulysses: the local tokens, all K/V heads)."""
        return (2 * (self.seq_len // self.ring) * self.ring_kv_heads * self.head_dim
                * self.elem_bytes)

    @property
    def all_to_all_bytes(self) -> float:
        """Bytes one GPU sends to EACH other member of its Ulysses group in one attention's
        all-to-alls (q, k, v out and the output back): a 1/ulysses share of its local q, k, v
        and output (K/V counted with their replicas). The backward sends as many (the
        gradients), and the recomputed forward again."""
        if self.ulysses == 1:
            return 0.0
        kv = self.ring_kv_heads * self.ulysses  # K/V heads on a GPU, replicas included
        per_token = (2 * self.heads + 2 * kv) * self.head_dim * self.elem_bytes
        return self.local_tokens * per_token / self.ulysses

    @property
    def kv_grad_bytes(self) -> float:
        """dK and dV of the visiting blocks, travelling home with their K/V in backward: fp32
        accumulators from rings of 3 on, the compute dtype on a ring of 2
        (ring_attention.ring.accumulator_dtype)."""
        return self.kv_block_bytes / self.elem_bytes * (4 if self.ring >= 3 else self.elem_bytes)

    @property
    def grad_reduce_bytes(self) -> int:
        """Bytes per gradient element in the reduce-scatter and the replicas' all-reduce: fp32
        under mixed precision (FSDP2's reduce_dtype), else the weights' own dtype."""
        return 4 if self.elem_bytes != self.state_bytes else self.elem_bytes

    @property
    def root_params(self) -> int:
        """Parameters of the FSDP root unit: embedding, lm_head (unless tied to it), final
        norm."""
        return (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden

    @property
    def seqs_per_ring(self) -> int:
        return max(1, self.batch_size // self.dp)


def layer_working_bytes(s: StageShape) -> float:
    """Bytes per token of one decoder layer recomputed and backpropagated: what its backward
    keeps (the two norms' outputs and their fp32 upcasts, q, k, v before and after RoPE, the
    attention output, the o_proj output; the MLP's gate, up, activation and product) and the
    ring's fp32 accumulators of dq, dK, dV and the log-sum-exp. Counted from Llama's forward;
    within 1% of the traced 8B working set (ray_jobs.train.memory). q, the attention output
    and dq are heads x head_dim wide (Qwen3: not the hidden size). QK-norm's outputs are not
    counted: a traced Qwen3 layer is within 2% without them (tests/train/test_memory_trace.py)."""
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    i, cb = s.intermediate, s.elem_bytes
    return (7 * h + 3 * q + 3 * kv + 4 * i) * cb + (q + 2 * kv) * 4 + s.heads * 4


def kept_attention_bytes(s: StageShape) -> float:
    """Bytes per token and layer the `attention` policy keeps from forward to backward: ring
    attention's output in the compute dtype and its fp32 log-sum-exp, for all heads (with
    Ulysses a GPU keeps 1/U of the heads for U times the tokens: the same count). Part of
    layer_working_bytes: the layer being recomputed holds its own anyway, so the peak grows by
    (layers - 1) of these (traced: ray_jobs.train.memory)."""
    return s.heads * s.head_dim * s.elem_bytes + s.heads * 4


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def memory_per_gpu(s: StageShape, profile: HardwareProfile) -> dict[str, float]:
    """Bytes per GPU by part, at the step's peak, for the layout ray_jobs.train.parallelize builds.

    Always held: the weights, their gradients and AdamW's two moments in the storage dtype,
    sharded over the shard group (FSDP2); the root's embedding and lm_head gathered in the
    compute dtype for the whole step (the FSDP root is not resharded after forward); the
    checkpointed input of every decoder layer (plus the embedding, final norm and hidden
    states). The peak then comes either in the loss, whose chunk of logits exists in the
    compute dtype, upcast to fp32 and as its fp32 gradient, or while a decoder layer is
    recomputed and backpropagated (its activations, its gathered weights and the next layer's
    prefetched ones, its unsharded gradients, the ring's K/V buffers): whichever is larger.
    Checked against FSDPMemTracker traces of the real parallelize (ray_jobs.train.memory).
    Under the `attention` policy every layer also keeps ring attention's output and
    log-sum-exp (kept_attention_bytes) until its backward: all L layers' in the loss; in the
    layer phase L - 2 layers' more than `full` where its peak is at the second layer
    backpropagated (the first one's gradients still being reduce-scattered: 8B and 70B), L - 1
    where it is at the first (a layer's gradients smaller than its input: the tiny model), as
    the traces show; the layer at work's own kept output stands in for the one its
    recomputation would make under `full`. Without activation checkpointing (`none`) every
    layer's activations are held instead, and nothing is recomputed.
    """
    n = s.seqs_per_ring * s.local_tokens  # tokens on this GPU per micro-step
    cb, sb, shard = s.elem_bytes, s.state_bytes, s.shard_ways
    root = s.root_params
    layer = (s.params - root) / s.layers
    recomputes = s.checkpointing != "none"
    if recomputes:
        held = (s.layers + 4) * n * s.hidden * cb  # each layer's input, embedding, final norm
    else:  # every layer keeps what its backward needs
        held = s.layers * n * layer_working_bytes(s)
    parts = {
        "weights (sharded)": s.params * sb / shard,
        "gradients (sharded)": s.params * sb / shard,
        "AdamW state (sharded)": 2 * s.params * sb / shard,
        "embedding + lm_head (gathered)": root * cb,
        "activations held": held,
    }
    logit_bytes = cb + (4 if cb < 4 else 0) + 8  # logits, their fp32 copy, its gradient (x2)
    loss_phase = {"loss chunk (logits)": min(n, s.loss_chunk) * s.vocab * logit_bytes,
                  "decoder layer (gathered)": layer * cb}
    layer_phase = {
        "decoder layer (gathered, and the next)": 2 * layer * cb,
        "decoder layer gradients (unsharded, reduced in fp32)": layer * (4 if cb < sb else cb),
        "lm_head gradient (unsharded until the root's reduce)": s.vocab * s.hidden * cb,
        "layer recomputed and backpropagated":
            n * layer_working_bytes(s) if recomputes else 0.0,
        "ring buffers": 4 * s.kv_block_bytes if s.ring > 1 else 0.0,
    }
    if s.checkpointing == "attention":
        kept = n * kept_attention_bytes(s)
        loss_phase["ring attention outputs kept"] = s.layers * kept
        # The layer phase peaks at the first layer backpropagated or at the second (which holds
        # the first one's gradients while they are reduce-scattered, and one layer input less):
        # the second is later by `d`. The first keeps L - 1 other layers' outputs (its own
        # stands in for the one its recomputation makes under `full`), the second L - 2.
        d = (layer_phase["decoder layer gradients (unsharded, reduced in fp32)"]
             - n * s.hidden * cb)
        layer_phase["ring attention outputs kept"] = max(
            (s.layers - 1) * kept - max(d, 0.0), max(0, s.layers - 2) * kept + min(d, 0.0))
    parts.update(max(loss_phase, layer_phase, key=lambda d: sum(d.values())))
    parts["reserve (CUDA context, NCCL, fragmentation)"] = profile.memory_reserve_bytes
    return parts


def check_fits(name: str, s: StageShape, profile: HardwareProfile) -> float:
    """Total bytes per GPU, or StageDoesNotFit naming the stage and the smallest ring that fits."""
    total = sum(memory_per_gpu(s, profile).values())
    if total <= profile.hbm_bytes:
        check_lifecycle_fits(name, s, profile)  # load, resume, save, export
        return total
    fix = None
    r = s.ring
    while r < s.seq_len // 2:
        r *= 2
        if s.seq_len % (2 * r) == 0:
            shard = None if s.shard in (None, s.ring) else s.shard  # a ring's own grows too
            t = StageShape(**{**s.__dict__, "ring": r, "shard": shard})
            if sum(memory_per_gpu(t, profile).values()) <= profile.hbm_bytes:
                fix = r
                break
    hint = (f"raise ring_degree to {fix} or more" if fix else
            "no ring degree fits; shorten seq_len or use a smaller model")
    raise StageDoesNotFit(
        f"stage {name!r} needs {total / GB:.1f} GB per GPU with ring_degree {s.ring} "
        f"({s.local_tokens} tokens per GPU), above the {profile.hbm_bytes / GB:.0f} GB of a "
        f"{profile.gpu_model}; {hint}")


@dataclass(frozen=True)
class StageCost:
    """Predicted time of one optimizer step and its parts (seconds), and what set them."""

    step_seconds: float
    parts: dict[str, float]  # per optimizer step; sums to step_seconds
    tokens_per_second: float
    wall_minutes: float
    model_flops_per_step: float
    ring_hop: FlowResult
    dp_hop: FlowResult
    memory: dict[str, float]
    ring_headroom: float  # how many times slower the slowest hop may get before it shows
    shape: StageShape | None = None  # what it was priced for (lifecycle_peaks, on demand)


def predict_stage(s: StageShape, ring: FlowResult, dp: FlowResult,
                  profile: HardwareProfile, a2a: FlowResult | None = None,
                  shard: FlowResult | None = None) -> StageCost:
    """Step time of a stage, given the ring and data-parallel hop results under contention.

    Per micro-step and GPU (the trainer feeds each ring B = batch_size / dp sequences at once,
    grad_accum times per step; n = seq_len / ring local tokens, R = ring, L layers):
    - dense: (6N + 2N') n B FLOPs (6N forward+backward, 2N' recomputing the decoder layers'
      forward under the `full` and `attention` policies: N' = N less the root's embedding and
      lm_head; 0 under `none`)
      at `dense_rate`;
    - attention: causal forward 2 S^2 (heads x head_dim) / R per layer, split evenly over R
      ring steps by zigzag; phases forward, recompute (only under the `full` policy),
      backward (x attention_bwd_over_fwd);
      in each phase R block computes, R-1 K/V transfers each overlapped with one block:
      phase = R c + (R-1) max(0, t - c), t the hop time of the bytes passed (K,V of the B
      sequences; backward also dK,dV, in fp32 from rings of 3 on): one latency per hop for
      the whole micro-batch, as the trainer passes one (B, n, ...) block;
    - sharding traffic per micro-step, one collective per FSDP unit (each decoder layer, and the
      root: embedding, final norm, lm_head) over the S shard ranks: the forward all-gathers
      every unit's weights in the compute dtype, the backward the layers' again (the root stays
      gathered), and every unit's gradients are reduce-scattered in the reduce dtype (fp32
      under mixed precision). A collective costs (S-1) hop latencies plus its bytes at the
      measured bus bandwidth of that collective and group size when the profile has one
      (`collective_gb_s`), else (S-1) hops of a 1/S share at the ring's hop bandwidth; it runs
      behind the dense compute as far as `comm_overlap` allows;
    - data-parallel gradient sync once per optimizer step (the last micro-step's, see
      parallelize.sync_gradients_in): ring all-reduce of the reduce-dtype gradient shard over
      D rings, 2(D-1) hops of a 1/D share of it, not overlapped;
    - the optimizer once per step: clipping and AdamW over the P / S parameters of the shard
      (`profile.optimizer_seconds`), and the loss all-reduce that reports the step (one element
      over the world: 2(W-1) hop latencies);
    - compute rates are the profile's at B n tokens per device (`dense_rate`, `attention_rate`:
      measured by `ringpilot calibrate` at each stage's size, or peak x utilisation); a
      communication that could hide behind compute hides `comm_overlap` of what it could
      (1 on a GPU: exposed = max(0, comm - compute)); a calibrated profile adds each decoder
      layer's measured framework time beyond all that (`layer_overhead`: FSDP2's hooks, the
      ring's merges, Python between kernels) and the FSDP root's (`root_overhead`). Not
      modelled: sampling and sharding the batch.
    - with Ulysses (U > 1): each GPU computes H / U heads of its ring position's S / R tokens
      (n = S / (R U) local tokens for the dense work), its K/V blocks carry its share of the
      K/V heads, and every attention adds two all-to-alls per phase inside the Ulysses group,
      not overlapped: each GPU sends `all_to_all_bytes` to every other member at once, timed
      by `a2a` (all those flows together under contention); the sharding collectives run
      around the whole sequence group (`shard`: its ring x ulysses GPUs in order as one ring),
      not the K/V rings.
    - attention `document` (causal inside each packed document, nothing across; s.documents):
      a block of rank r at step k computes f[r, k] c, f its allowed pairs over a causal
      block's mean (topology.documents: counted on packed sequences sampled from the
      document-length histogram, a document straddling sequence boundaries as the packed
      stream cuts it; a block of only allowed pairs and a mixed one cost alike per pair, the
      kernel's mask not priced). Each rank's phase is sum_k f[r, k] c plus, for its R-1
      steps with a transfer, t - overlap min(t, f[r, k] c): a skipped block (f = 0) still
      passes its K/V, so that transfer shows whole. The rank with the longest phase sets the
      ring's pace (the ranks meet every layer): its compute is the attention compute and its
      exposed transfers the exposed ring K/V, averaged over the sampled sequences (the B
      sequences of a micro-step share one layout, as the kernel's block table does). With
      Ulysses the ring position is the unit (its group splits heads, not tokens). The model
      FLOPs count the allowed pairs (the samples' mean). Dense compute, the other traffic and
      memory are as under `causal`.
    """
    R, D, n, U, B = s.ring, s.dp, s.local_tokens, s.ulysses, s.seqs_per_ring
    # the layers' forward again (not under `none`)
    recomputed = s.params - s.root_params if s.checkpointing != "none" else 0
    dense = (6 * s.params + 2 * recomputed) * n * B / profile.dense_rate(n * B)
    attn_fwd_layer = 2 * s.seq_len**2 * s.heads * s.head_dim / (R * U)
    block = B * attn_fwd_layer / R / profile.attention_rate(n * B)
    overlap = profile.comm_overlap

    def hop(nbytes: float, res: FlowResult) -> float:
        if res.bottleneck is None:
            return 0.0
        return res.latency_s + nbytes / (res.bandwidth_gb_s * GB)

    def exposed(comm: float, compute: float) -> float:
        return comm - overlap * min(comm, compute)

    attn_compute = exposed_ring = 0.0
    documents = s.documents
    kv = B * s.kv_block_bytes
    headroom = float("inf")
    backward = (block * profile.attention_bwd_over_fwd, kv + B * s.kv_grad_bytes)
    # the ring's phases: forward, its recomputation (only under `full`: `attention` keeps its
    # results), backward
    phases = [(block, kv)] * (2 if s.checkpointing == "full" else 1) + [backward]
    for c, nbytes in phases:
        t = hop(nbytes, ring) if R > 1 else 0.0
        if documents is None:
            compute, wait = R * c, (R - 1) * exposed(t, c)
        else:
            compute, wait = documents.phase_seconds(c, t, overlap)
        if t > 0:  # against the busiest rank's mean block under `document`
            headroom = min(headroom, (c if documents is None else compute / R) / t)
        attn_compute += compute * s.layers
        exposed_ring += wait * s.layers
    S = s.shard_ways
    reduced = s.grad_reduce_bytes * s.params / S
    shard_comm = 0.0
    if S > 1:
        around = shard if shard is not None else ring
        units = s.layers + 1
        gathered = s.elem_bytes * (2 * s.params - s.root_params) / S  # forward, then backward

        def volume(shard_bytes: float, op: str) -> float:
            bus = profile.collective_gb_s.get(f"{op}/{S}") or around.bandwidth_gb_s
            return (S - 1) * shard_bytes / (bus * GB)

        shard_comm = ((3 * units - 1) * (S - 1) * around.latency_s
                      + volume(gathered, "all_gather") + volume(reduced, "reduce_scatter"))
    exposed_shard = exposed(shard_comm, dense)
    per_micro = {"dense compute": dense, "attention compute": attn_compute,
                 "exposed ring K/V": exposed_ring, "exposed weight sharding": exposed_shard}
    if profile.layer_overhead_s_at or profile.root_overhead_s_at:
        per_micro["framework overhead (calibrated)"] = (s.layers * profile.layer_overhead(n * B)
                                                        + profile.root_overhead(n * B))
    if U > 1:
        if a2a is None:
            raise ValueError("a Ulysses stage needs the all-to-all flows' result (a2a)")
        # a round trip per phase: forward, recomputed forward (under `full` and `attention`:
        # the all-to-alls around the kept ring results are recomputed), backward
        trips = 2 if s.checkpointing == "none" else 3
        per_micro["Ulysses all-to-all"] = trips * s.layers * hop(B * s.all_to_all_bytes, a2a)
    parts = {k: v * s.grad_accum for k, v in per_micro.items()}
    parts["data-parallel sync"] = (2 * (D - 1) * hop(reduced / D, dp)) if D > 1 else 0.0
    parts["optimizer"] = profile.optimizer_seconds(s.params / S)
    world = R * U * D
    parts["loss all-reduce"] = 2 * (world - 1) * max(ring.latency_s, dp.latency_s)
    step = sum(parts.values())
    tokens = s.batch_size * s.grad_accum * s.seq_len
    attention_flops = 3 * 2 * s.seq_len * s.heads * s.head_dim * s.layers
    if documents is not None:  # the allowed pairs only
        attention_flops *= documents.mean
    model_flops = tokens * (6 * s.params + attention_flops)
    return StageCost(step_seconds=step, parts=parts, tokens_per_second=tokens / step,
                     wall_minutes=s.steps * step / 60, model_flops_per_step=model_flops,
                     ring_hop=ring, dp_hop=dp, memory=memory_per_gpu(s, profile),
                     ring_headroom=headroom, shape=s)


# What the trainer's load and export move at a time (the constants of the code they model; a
# test pins each to its source):
READ_CHUNK_BYTES = 32 << 20  # ray_jobs.train.model.READ_CHUNK_BYTES: rows read at a time
EXPORT_FILE_BYTES = 5 * 10**9  # ray_jobs.train.checkpoint.EXPORT_FILE_BYTES (a test pins both)
DCP_COPY_AHEAD_BYTES = 10_000_000  # torch FileSystemWriter's per_thread_copy_ahead
LIFECYCLE_PHASES = ("load", "resume", "step", "save", "export")


def _layer_shapes(s: StageShape) -> list[tuple[str, int, int]]:
    """A decoder layer's weights in its family's state-dict order: q, k, v, o (each with its
    bias where the family has one), the q/k norms (qwen3), the MLP, the two norms."""
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    out = []
    for name, rows, row, bias in (("q_proj", q, h, s.qkv_bias), ("k_proj", kv, h, s.qkv_bias),
                                  ("v_proj", kv, h, s.qkv_bias), ("o_proj", h, q, s.o_bias)):
        out.append((f"self_attn.{name}", rows, row))
        if bias:
            out.append((f"self_attn.{name}.bias", rows, 1))
    if s.qk_norm:
        out += [("self_attn.q_norm", s.head_dim, 1), ("self_attn.k_norm", s.head_dim, 1)]
    return out + [("mlp.gate_proj", i, h), ("mlp.up_proj", i, h), ("mlp.down_proj", h, i),
                  ("input_layernorm", h, 1), ("post_attention_layernorm", h, 1)]


def _root_tail(s: StageShape) -> list[tuple[str, int, int]]:
    """The final norm and lm_head (none of its own when tied to the embedding)."""
    return [("norm", s.hidden, 1)] + ([] if s.tied else [("lm_head", s.vocab, s.hidden)])


def parameter_shapes(s: StageShape) -> list[tuple[str, int, int]]:
    """(name, rows, elements per row) of every weight, in the Hugging Face state-dict order of
    Llama and its kin (embedding, each decoder layer's attention, MLP and norms, final norm,
    lm_head unless tied): FSDP2 shards each along its rows, and the export files group them in
    this order."""
    out = [("embed_tokens", s.vocab, s.hidden)]
    for n in range(s.layers):
        out += [(f"layers.{n}.{name}", rows, row) for name, rows, row in _layer_shapes(s)]
    return out + _root_tail(s)


def _local_rows(rows: int, shard: int) -> int:
    """Rows of a weight on the rank holding the most of them (FSDP2 gives each rank ceil)."""
    return -(-rows // shard)


@functools.lru_cache(maxsize=256)
def export_file_shares(s: StageShape, file_bytes: int = EXPORT_FILE_BYTES
                       ) -> list[tuple[float, float]]:
    """Per export file: (its bytes, the most bytes of it one rank holds). Files are filled in
    state-dict order up to `file_bytes`, a larger tensor alone (checkpoint.export_file_index)."""
    files: list[list[float]] = []
    used = file_bytes  # start a new file at the first tensor
    layer = [(rows, row) for _, rows, row in _layer_shapes(s)]
    order = ([(s.vocab, s.hidden)] + layer * s.layers
             + [(rows, row) for _, rows, row in _root_tail(s)])
    for rows, row in order:
        size = rows * row * s.state_bytes
        if not files or (used and used + size > file_bytes):
            files.append([0.0, 0.0])
            used = 0
        files[-1][0] += size
        files[-1][1] += _local_rows(rows, s.shard_ways) * row * s.state_bytes
        used += size
    return [(a, b) for a, b in files]


def lifecycle_memory(s: StageShape, profile: HardwareProfile, *,
                     chunk_bytes: int = READ_CHUNK_BYTES,
                     file_bytes: int = EXPORT_FILE_BYTES) -> dict[str, dict[str, dict[str, float]]]:
    """Bytes by part at the peak of each phase of a stage's life, per GPU ("device") and per
    rank's host process ("host"; a host holds one such process per GPU it gives the stage).
    The phases, as ray_jobs/train/loop.py runs them:

    - load: the model built on the meta device, sharded, its shards given storage, then filled
      by load_hf_weights: per weight, `chunk_bytes` of the rank's rows read at a time from the
      safetensors file into a host tensor and copied into the shard. Device: the sharded
      weights and one chunk (the trace sees the chunk beside them); host: the chunk and the
      file pages its read touched (mapped until the read ends). A new model (init_weights)
      draws blocks of about 4 MB: less.
    - resume: the DCP shards of weights and AdamW read back. Device: the sharded weights,
      gradients (DCP's optimizer-state initialisation sets zeros for one step) and AdamW's two
      moments; host: FileSystemReader's bytes of one saved item and the tensor loaded from them
      (the largest item: a rank's rows of the embedding or lm_head).
    - step: memory_per_gpu; host: nothing the model counts.
    - save (every checkpoint: DCP shards of weights and AdamW, after zero_grad(set_to_none)):
      device: the sharded weights and AdamW state; host: FileSystemWriter's staged copies, one
      item beyond its copy-ahead.
    - export (the stage's final checkpoint): device as save (get_model_state_dict returns the
      shards as they are, in the storage dtype); host: the larger of HuggingFaceStorageWriter's
      write of one file (a rank's share of its tensors staged on the host, then the serialised
      bytes safetensors builds of them: twice the share) and the consolidation of one output
      file (one full tensor as a bytearray, the piece of it one rank's shard file holds, read
      as bytes, and the copy that slicing those bytes makes before they are placed).

    The device parts are traced (ray_jobs.train.memory.trace_load_memory and
    trace_export_memory); the host parts are modelled from torch's and safetensors' code, not
    traced (fake tensors do not tell host from device on a CPU trace). Each device phase
    carries the profile's reserve, as memory_per_gpu does.
    """
    sb, shard = s.state_bytes, s.shard_ways
    weights = s.params * sb / shard
    # each distinct weight once: the largest matter
    shapes = [("embed_tokens", s.vocab, s.hidden), *_layer_shapes(s), *_root_tail(s)]
    local = [(_local_rows(rows, shard), row * sb) for _, rows, row in shapes]
    chunk = max(min(n, max(1, chunk_bytes // row_b)) * row_b for n, row_b in local)
    item = max(n * row_b for n, row_b in local)  # the largest saved item: a rank's rows
    _, big_rows, big_row = max(shapes, key=lambda t: t[1] * t[2])  # the largest weight
    full_tensor = big_rows * big_row * sb
    shares = export_file_shares(s, file_bytes)
    piece = _local_rows(big_rows, shard) * big_row * sb  # one rank's piece of that weight
    reserve = {"reserve (CUDA context, NCCL, fragmentation)": profile.memory_reserve_bytes}
    after_step = {"weights (sharded)": weights, "AdamW state (sharded)": 2 * weights}
    step = memory_per_gpu(s, profile)
    return {
        "load": {"device": {"weights (sharded)": weights, "read chunk": chunk, **reserve},
                 "host": {"read chunk": chunk, "mapped file pages of the chunk": chunk}},
        "resume": {"device": {"weights (sharded)": weights, "gradients (sharded)": weights,
                              "AdamW state (sharded)": 2 * weights, **reserve},
                   "host": {"saved item read": item, "tensor loaded from it": item}},
        "step": {"device": step, "host": {}},
        "save": {"device": {**after_step, **reserve},
                 "host": {"staged item": item, "writer copy-ahead": DCP_COPY_AHEAD_BYTES}},
        "export": {"device": {**after_step, **reserve},
                   "host": max(
                       {"file share staged": max(b for _, b in shares),
                        "file share serialised": max(b for _, b in shares)},
                       {"full tensor consolidated": full_tensor,
                        "shard piece read": piece, "its copy (a bytes slice)": piece},
                       key=lambda d: sum(d.values()))},
    }


def lifecycle_peaks(s: StageShape, profile: HardwareProfile, **kw) -> dict[str, dict[str, float]]:
    """phase -> {"device": bytes per GPU, "host": bytes per rank's host process} at its peak."""
    return {phase: {where: sum(parts.values()) for where, parts in sides.items()}
            for phase, sides in lifecycle_memory(s, profile, **kw).items()}


def check_lifecycle_fits(name: str, s: StageShape, profile: HardwareProfile, *,
                         host_bytes: float | None = None, ranks_per_host: int = 1) -> None:
    """StageDoesNotFit naming the stage, the phase and its bytes when loading, resuming, saving
    or exporting does not fit the GPU, or (when `host_bytes`, one host's memory, is known) the
    `ranks_per_host` rank processes of a host do not fit it together."""
    for phase, peak in lifecycle_peaks(s, profile).items():
        if phase == "step":
            continue  # check_fits prices the step, with its own hint
        if peak["device"] > profile.hbm_bytes:
            raise StageDoesNotFit(
                f"stage {name!r}: its {phase} needs {peak['device'] / GB:.1f} GB per GPU with "
                f"{shard_text(s)}, above the {profile.hbm_bytes / GB:.0f} GB of a "
                f"{profile.gpu_model}; shard the model over more GPUs (raise ring_degree or "
                "shard_degree)")
        if host_bytes is not None and peak["host"] * ranks_per_host > host_bytes:
            raise StageDoesNotFit(
                f"stage {name!r}: its {phase} needs {peak['host'] * ranks_per_host / GB:.1f} GB "
                f"of host memory ({ranks_per_host} ranks of {peak['host'] / GB:.1f} GB) with "
                f"{shard_text(s)}, above the host's {host_bytes / GB:.0f} GB; shard the model "
                "over more GPUs or give the stage fewer GPUs per host")


def shard_text(s: StageShape) -> str:
    return f"the model sharded over {s.shard_ways} GPUs"
