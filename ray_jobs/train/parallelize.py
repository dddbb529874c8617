"""parallelize(): the layout of one stage applied to a Llama, Mistral or Qwen, in a fixed order.

    mesh = build_mesh(dims, rings, "cpu")           # (dp_replicate, dp_shard, ring, ulysses)
    model = parallelize(llama, mesh, dims, ...)      # -> CausalLMWithLoss, FSDP2 root

Order (torchtitan's `parallelize_llama` is the model): (1) attention runs around the mesh's
"ring" dim, its heads split over the "ulysses" dim when that is > 1: every attention module is
bound to this rank's ring or sequence mesh and switched to attn_implementation="ring" (a layout
that splits no sequence keeps the model's own attention); (2) each decoder layer is wrapped for
activation checkpointing under the stage's policy: `full` keeps only its input and recomputes
its inside in backward, `attention` does the same except for ring attention, whose output and
log-sum-exp are kept (ring_attention/saving.py: the ring runs once each way), `none` keeps
everything;
(3) FSDP2 `fully_shard` per decoder layer, then on the root, over the "shard" dims (dp_shard x
ring x ulysses, flattened) and replicated over "dp_replicate" (HSDP); (4) the loss is computed
inside the root's forward, over token chunks that are recomputed in backward, so (tokens x
vocab) fp32 logits never exist at once. The planner's memory model
(topology.cost.memory_per_gpu) describes exactly this layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from ray_jobs.ring_attention import Ring, apply_ring_attention
from ray_jobs.ring_attention.families import decoder_layers
from ray_jobs.ring_attention.saving import saving_contexts
from ray_jobs.ring_attention.ulysses import SequenceMesh
from specs.degrees import CHECKPOINT_POLICIES, MESH_DIMS, CheckpointPolicy, ParallelDims
from specs.run import RunSpec

IGNORE = -100
LOSS_CHUNK_TOKENS = 1024  # logits of this many tokens exist at once (forward and backward)


@dataclass(frozen=True)
class Layout:
    """This rank's place in a stage's layout: the meshes, its ring, its data-parallel index."""

    mesh: DeviceMesh  # (dp_replicate, dp_shard, ring, ulysses), rings in plan order
    fsdp_mesh: DeviceMesh  # (shard,) or (dp_replicate, shard): what FSDP2 shards over
    dims: ParallelDims
    ring: Ring  # this rank's ring, peers in plan order
    sequence: SequenceMesh  # this rank's Ulysses group and ring
    dp_rank: int  # this rank's ring in plan order: it picks the ring's samples

    @property
    def ring_rank(self) -> int:
        return self.ring.rank

    @property
    def ulysses_rank(self) -> int:
        return self.sequence.ulysses_rank

    @property
    def attention_group(self) -> Ring | SequenceMesh | None:
        """What this layout's attention runs around: the ring alone without Ulysses (plain ring
        attention, exactly), the sequence mesh with it, None when no sequence is split."""
        if self.dims.ulysses > 1:
            return self.sequence
        return self.ring if self.dims.ring > 1 else None


def build_mesh(dims: ParallelDims, rings: list[list[int]], device_type: str) -> Layout:
    """The meshes of a stage from the plan's rings (global ranks in ring order). Collective:
    every rank calls it with the same rings and creates every group in the same order."""
    grid = torch.tensor(dims.rings_grid(rings), dtype=torch.int)
    if sorted(grid.flatten().tolist()) != list(range(dist.get_world_size())):
        raise ValueError(f"the plan's rings {rings} must hold every rank 0.."
                         f"{dist.get_world_size() - 1} exactly once")
    mesh = DeviceMesh(device_type, grid, mesh_dim_names=MESH_DIMS)
    # FSDP's mesh is its own (flattening the world mesh's dims and slicing them back out is
    # deprecated): the same ranks, the shard dims merged.
    shard_grid = grid.reshape(dims.dp_replicate, dims.shard)
    fsdp_mesh = (DeviceMesh(device_type, shard_grid, mesh_dim_names=("dp_replicate", "shard"))
                 if dims.dp_replicate > 1 else
                 DeviceMesh(device_type, shard_grid.flatten(), mesh_dim_names=("shard",)))
    replica, slot, _, _ = mesh.get_coordinate()
    ring = Ring(group=mesh.get_group("ring"), ranks=tuple(mesh["ring"].mesh.tolist()))
    ulysses = mesh.get_group("ulysses") if dims.ulysses > 1 else None
    return Layout(mesh=mesh, fsdp_mesh=fsdp_mesh, dims=dims, ring=ring,
                  sequence=SequenceMesh(ulysses=ulysses, ulysses_size=dims.ulysses, ring=ring,
                                        ulysses_ranks=tuple(mesh["ulysses"].mesh.tolist())),
                  dp_rank=replica * dims.dp_shard + slot)


def parallelize(model: nn.Module, layout: Layout, *, activation_checkpointing: CheckpointPolicy,
                mixed_precision: torch.dtype | None, loss_chunk_tokens: int = LOSS_CHUNK_TOKENS,
                documents: bool = False) -> CausalLMWithLoss:
    """Apply the stage's layout in place to a Hugging Face causal LM of a supported family
    (ray_jobs/ring_attention/families.py; its decoder layers found from the model); return the
    FSDP root that computes the loss. `mixed_precision`: the dtype layers compute in (gradients
    are reduced in fp32), or None to compute in the parameters' own dtype. `documents`: the
    stage masks attention by document (attention: document), so the attention runs the ring
    even where the layout splits no sequence (a ring of one), whose block table skips and masks
    what the documents hide; the root's forward then takes each row's doc_starts."""
    root = CausalLMWithLoss(model, loss_chunk_tokens)
    attention = layout.attention_group
    if documents and attention is None:
        attention = layout.ring  # a ring of one: its own shard, the whole sequence
    apply_layout(root, decoder_layers(model), attention=attention,
                 fsdp_mesh=layout.fsdp_mesh, activation_checkpointing=activation_checkpointing,
                 mixed_precision=mixed_precision)
    return root


def apply_layout(root: nn.Module, layers: nn.ModuleList, *,
                 attention: Ring | SequenceMesh | None, fsdp_mesh: DeviceMesh,
                 activation_checkpointing: CheckpointPolicy,
                 mixed_precision: torch.dtype | None) -> None:
    """parallelize()'s steps (1)-(3), in its order, on any `root` holding these decoder
    `layers` (calibration times a bare stack of layers this way): attention around `attention`
    (None: the layers' own attention), activation checkpointing, FSDP2."""
    if attention is not None:
        apply_ring_attention(root, attention)
    apply_activation_checkpointing(layers, activation_checkpointing)
    apply_fsdp(root, layers, fsdp_mesh, mixed_precision)


def compute_dtype_of(run: RunSpec) -> torch.dtype | None:
    """parallelize()'s mixed_precision for a run: bf16 layers, or None (the weights' dtype)."""
    return torch.bfloat16 if run.compute_dtype != run.model.dtype else None


def apply_activation_checkpointing(layers: nn.ModuleList, policy: CheckpointPolicy = "full"
                                   ) -> None:
    """Wrap each decoder layer of `layers` (in place) for the policy: `full` keeps only the
    layer's input and recomputes its inside in backward, ring attention included (the K/V
    blocks travel the ring again); `attention` recomputes all but ring attention, whose output
    and log-sum-exp the first forward keeps; `none` wraps nothing."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"activation checkpointing policy {policy!r} is not one of "
                         f"{', '.join(CHECKPOINT_POLICIES)}")
    if policy == "none":
        return
    extra = {"context_fn": saving_contexts} if policy == "attention" else {}
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False, **extra)


def apply_fsdp(root: nn.Module, layers: Iterable[nn.Module], fsdp_mesh: DeviceMesh,
               mixed_precision: torch.dtype | None) -> None:
    """fully_shard per decoder layer (of `layers`, inside `root`), then the root (embedding,
    final norm, lm_head), over the shard group; HSDP (replicate x shard) when the mesh is 2-D."""
    policy = (MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
              if mixed_precision is not None else MixedPrecisionPolicy())
    # A layer's inputs are not cast: its hidden states arrive in the compute dtype already, and
    # RoPE's cos/sin must stay fp32 so that q and k are rotated in fp32
    # (ray_jobs/ring_attention/rope.py: rotated in bf16 they carry 2x bf16's own rounding;
    # cast, each checkpointed layer would also keep its own bf16 copy of them).
    layer_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype,
                                        reduce_dtype=policy.reduce_dtype,
                                        cast_forward_inputs=False)
    for layer in layers:
        fully_shard(layer, mesh=fsdp_mesh, mp_policy=layer_policy)
    fully_shard(root, mesh=fsdp_mesh, mp_policy=policy)


class CausalLMWithLoss(nn.Module):
    """The FSDP root: the decoder and the chunked next-token loss in one forward, so the root's
    parameters are all-gathered once for both. Returns this rank's (loss sum, target count)."""

    def __init__(self, model: nn.Module, loss_chunk_tokens: int):
        super().__init__()
        self.model = model
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor, doc_starts: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # doc_starts (attention: document): each row's whole-sequence document starts, passed
        # down to every layer's ring attention (ring_attention/hf.py); None: plain causal.
        documents = {} if doc_starts is None else {"doc_starts": doc_starts}
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids,
                                       use_cache=False, **documents
                                       ).last_hidden_state  # (B, S_local, H)
        head = self.model.get_output_embeddings().weight  # the embedding's, when tied
        loss_sum = chunked_cross_entropy(hidden, head, labels, self.loss_chunk_tokens)
        return loss_sum, (labels != IGNORE).sum()


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Summed fp32 cross-entropy of lm_head(hidden) against labels, `chunk_tokens` tokens at a
    time; each chunk's logits are recomputed in backward instead of kept."""
    h, y = hidden.flatten(0, 1), labels.flatten()  # (T, H), (T,)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, y.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, h[part], weight, y[part], use_reentrant=False)
    return total


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), y, ignore_index=IGNORE, reduction="sum")


def ring_mean_loss(loss_sum: torch.Tensor, count: torch.Tensor,
                   ring: Ring | SequenceMesh) -> torch.Tensor:
    """Mean loss over the whole sequences split across a ring (or a Ulysses x ring mesh). Its
    value is that mean on every rank; its gradient is this rank's share (local sum / the
    sequences' token count), so gradients summed over the ranks are the unsharded sequence's."""
    stats = torch.stack([loss_sum.detach(), count.to(loss_sum.dtype)])
    if isinstance(ring, SequenceMesh):
        if ring.ulysses is not None:
            dist.all_reduce(stats, group=ring.ulysses)
        ring = ring.ring
    if ring.size > 1:
        dist.all_reduce(stats, group=ring.group)
    total, tokens = stats[0], stats[1].clamp_min(1.0)
    local = loss_sum / tokens
    return local + (total / tokens - local).detach()


def sync_gradients_in(root: FSDPModule, micro: int, accum: int) -> None:
    """Gradient accumulation over `accum` micro-steps: every micro-step's backward
    reduce-scatters its gradients within the shard group (which keeps them sharded: skipping it
    would hold whole unsharded gradients), but the all-reduce across HSDP replicas, the slow
    hop between shard groups, runs only in the last micro-step's backward, on the sum of them
    all. The cost model prices exactly this: sharding traffic per micro-step, the
    data-parallel sync once per optimizer step. Call before each micro-step's backward."""
    root.set_requires_all_reduce(micro == accum - 1)


def fsdp_modules(root: nn.Module) -> list[FSDPModule]:
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def build_optimizer(root: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW over the sharded parameters, stepping one parameter at a time: traced under
    FakeTensorMode (ray_jobs.train.memory), the multi-tensor (foreach) and fused steps on DTensor
    shards held about 13x the optimizer state in temporaries at 8B scale, while this keeps the
    step's extra memory to one shard."""
    return torch.optim.AdamW(root.parameters(), lr=lr, weight_decay=0.0, foreach=False)


def clip_gradients(root: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the sharded gradients to a global norm of `max_norm`; return that norm (before
    clipping). Each shard's norm is taken alone and DTensor sums their squares over the mesh;
    the multi-tensor path gathered whole gradients in the FakeTensorMode trace (about the full
    fp32 model at 8B scale), so it is not used."""
    grads = [p.grad for p in root.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=False)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    torch.nn.utils.clip_grads_with_norm_(root.parameters(), max_norm, norm, foreach=False)
    return norm
