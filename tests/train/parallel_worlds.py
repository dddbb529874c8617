"""Rank bodies of the parallelize tests (spawned processes import them by module name)."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)

from ray_jobs.ring_attention import sequence_position_ids, sequence_shard
from ray_jobs.train.parallelize import (
    build_mesh,
    build_optimizer,
    clip_gradients,
    parallelize,
    ring_mean_loss,
    sync_gradients_in,
)
from specs.degrees import ParallelDims

VOCAB, SEQ, PER_RING = 128, 16, 2
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def tiny_llama(seed: int = 0, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def batches(dp: int, steps: int):
    """The global batch of each step: (input ids, next-token labels), the same on every rank."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (dp * PER_RING, SEQ), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        yield ids, labels


def _setup(ring: int, dp: int, shard: int, *, ac: str, seed: int = 0, reverse: bool = True,
           ulysses: int = 1, kv_heads: int = 2):
    """The trainer's recipe on a tiny Llama: mesh from rings (in reversed rank order, so ring
    order differs from rank order), parallelize, AdamW."""
    dims = ParallelDims.of(ring, dp, shard, ulysses)
    n = dims.sequence
    rings = [list(range(i * n, (i + 1) * n)) for i in range(dp)]
    layout = build_mesh(dims, [r[::-1] if reverse else r for r in rings], "cpu")
    model = tiny_llama(seed, kv_heads)
    model.set_attn_implementation("sdpa")  # parallelize() switches it to "ring" when n > 1
    root = parallelize(model, layout, activation_checkpointing=ac, mixed_precision=None,
                       loss_chunk_tokens=8)
    return layout, root, build_optimizer(root, 1e-2)


def _step(layout, root, ids, labels):
    """Forward and backward of this rank's share; returns the loss (mean over the dp rings)."""
    dims = layout.dims
    mine = slice(layout.dp_rank * PER_RING, (layout.dp_rank + 1) * PER_RING)
    place = (layout.ring_rank, dims.ring, layout.ulysses_rank, dims.ulysses)
    x, y = (sequence_shard(t[mine], 1, *place) for t in (ids, labels))
    pos = sequence_position_ids(SEQ, *place).unsqueeze(0).expand(PER_RING, -1)
    loss = ring_mean_loss(*root(x, pos, y), layout.sequence)
    (loss * dims.sequence).backward()  # FSDP averages over all ranks: the shares must add
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / dist.get_world_size()


WRAPPED = "_checkpoint_wrapped_module."  # the activation-checkpointing wrapper's prefix


def _full_grads(root) -> dict[str, np.ndarray]:
    return {n.replace(WRAPPED, ""): p.grad.full_tensor().numpy().copy()
            for n, p in root.model.named_parameters()}


def _full_params(root) -> dict[str, np.ndarray]:
    return {n.replace(WRAPPED, ""): p.full_tensor().detach().numpy().copy()
            for n, p in root.model.named_parameters()}


def train_layout(rank, world, ring, dp, shard, ac, steps, ulysses=1):
    """`steps` optimizer steps (AdamW, gradient clipping at 1.0) under the layout; returns the
    per-step loss and total gradient norm, the first step's gradients and the final weights."""
    layout, root, opt = _setup(ring, dp, shard, ac=ac, ulysses=ulysses)
    losses, norms, first_grads = [], [], None
    for ids, labels in batches(dp, steps):
        losses.append(_step(layout, root, ids, labels))
        if first_grads is None:
            first_grads = _full_grads(root)
        norms.append(float(clip_gradients(root, 1.0)))
        opt.step()
        opt.zero_grad()
    params = _full_params(root)
    return {"losses": losses, "norms": norms, "grads": first_grads, "params": params}


def reference(dp: int, steps: int) -> dict:
    """The same steps in one process: unsharded model, SDPA, the whole global batch."""
    model = tiny_llama(0)
    model.set_attn_implementation("sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # as the trainer
    losses, norms, first_grads = [], [], None
    for ids, labels in batches(dp, steps):
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        losses.append(loss.item())
        if first_grads is None:
            first_grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad()
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    return {"losses": losses, "norms": norms, "grads": first_grads, "params": params}


def gradients_under_each_policy(rank, world, ring, ulysses, kv_heads):
    """One step of the same batch under each activation checkpointing policy, one sequence over
    the world (ring x ulysses): {policy: (full gradients, ring exchanges by tag)}."""
    from ray_jobs.ring_attention import record_ring_timings
    from specs.degrees import CHECKPOINT_POLICIES

    out = {}
    for policy in CHECKPOINT_POLICIES:
        layout, root, _ = _setup(ring, 1, world, ac=policy, ulysses=ulysses, kv_heads=kv_heads)
        ids, labels = next(batches(1, 1))
        with record_ring_timings() as timings:
            _step(layout, root, ids, labels)
        out[policy] = (_full_grads(root), dict(timings.exchanges_by_tag))
    return out


def save_after_steps(rank, world, ring, dp, shard, path, steps):
    """Train, then save model and optimizer with torch.distributed.checkpoint; return the full
    model and optimizer state as every rank saw them."""
    layout, root, opt = _setup(ring, dp, shard, ac="full", reverse=False)
    for ids, labels in batches(dp, steps):
        _step(layout, root, ids, labels)
        opt.step()
        opt.zero_grad()
    model_sd, optim_sd = get_state_dict(root.model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    full = _full_state(root, opt)  # collective: every rank gathers, rank 0 keeps it
    return full if rank == 0 else None


def load_checkpoint(rank, world, ring, dp, shard, path):
    """A model built with other weights (seed 7) and another mesh, loaded from `path`."""
    layout, root, opt = _setup(ring, dp, shard, ac="full", seed=7, reverse=False)
    model_sd, optim_sd = get_state_dict(root.model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(root.model, opt, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    full = _full_state(root, opt)
    return full if rank == 0 else None


def _full_state(root, opt) -> dict:
    model = get_model_state_dict(root.model, options=FULL)
    optim = get_optimizer_state_dict(root.model, opt, options=FULL).get("state", {})  # rank 0
    flat = {f"model/{k}": v.numpy().copy() for k, v in model.items()}
    for name, entry in optim.items():
        for key, value in entry.items():
            flat[f"optim/{name}/{key}"] = np.asarray(value).copy()
    return flat


def gradient_all_reduces(rank, world, accum, sync_every_micro):
    """One optimizer step of `accum` micro-steps on HSDP (2 replicas of a 1-rank shard group);
    returns how many all-reduces went to the replicate group and the summed gradients."""
    layout, root, _ = _setup(1, 2, 1, ac="none")
    replicas = layout.fsdp_mesh.get_group("dp_replicate")
    calls, original = [], dist.all_reduce

    def counting(tensor, *args, group=None, **kwargs):
        calls.append(group is replicas)
        return original(tensor, *args, group=group, **kwargs)

    dist.all_reduce = counting
    try:
        for micro, (ids, labels) in enumerate(batches(2, accum)):
            sync_gradients_in(root, 0 if sync_every_micro else micro, 1 if sync_every_micro
                              else accum)
            _step(layout, root, ids, labels)
    finally:
        dist.all_reduce = original
    return {"replica_all_reduces": sum(calls), "grads": _full_grads(root)}


def step_changes(rank, world, storage: str, compute: str | None, lr: float):
    """One AdamW step at `lr` with weights stored in `storage` and layers computing in `compute`
    (None: the storage dtype), as the trainer applies them: each weight's gradient and how far
    the step moved it."""
    layout, _, _ = _setup(1, 1, 1, ac="none")
    model = tiny_llama(0).to(getattr(torch, storage))
    model.set_attn_implementation("sdpa")
    root = parallelize(model, layout, activation_checkpointing="none",
                       mixed_precision=getattr(torch, compute) if compute else None,
                       loss_chunk_tokens=8)
    opt = build_optimizer(root, lr)
    before = {n: p.full_tensor().detach().float().clone() for n, p in root.named_parameters()}
    _step(layout, root, *next(batches(1, 1)))
    grads = {n: p.grad.full_tensor().float().numpy().copy() for n, p in root.named_parameters()}
    opt.step()
    return {n: {"grad": grads[n], "moved": (p.full_tensor().detach().float() - before[n])
                .abs().numpy()} for n, p in root.named_parameters()}


class _Tokenizer:
    """What save_checkpoint needs of a tokenizer."""

    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{}")


def checkpoint_round_trip(rank, world, run_dir):
    """Train a step, save through the trainer's save_checkpoint, load through its
    load_checkpoint into a fresh mesh; return where every optimizer state tensor and every
    torch.load of the load landed."""
    from ray_jobs.train import checkpoint as ckpt
    from specs.checkpoint import TrainerState
    from specs.ledger import Ledger

    layout, root, opt = _setup(1, 1, 1, ac="none")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _step(layout, root, *next(batches(1, 1)))
    opt.step()
    sched.step()
    state = TrainerState(stage="s", stage_index=0, step=1)
    path = ckpt.save_checkpoint(Ledger(run_dir, "r"), root.model, _Tokenizer(), opt, sched,
                                state, keep_last=1, final=False)
    _, root2, opt2 = _setup(1, 1, 1, ac="none", seed=3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    loads, original = [], torch.load

    def recording(*args, **kwargs):  # the trainer's own reads (DCP's are its business)
        if sys._getframe(1).f_code.co_filename == ckpt.__file__:
            loads.append(kwargs.get("map_location"))
        return original(*args, **kwargs)

    torch.load = recording
    try:
        ckpt.load_checkpoint(path, root2.model, opt2, sched2)
    finally:
        torch.load = original
    devices = {t.to_local().device.type if hasattr(t, "to_local") else t.device.type
               for entry in opt2.state.values() for t in entry.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0}
    same = all(torch.equal(a.full_tensor(), b.full_tensor())
               for a, b in zip(root.parameters(), root2.parameters()))
    return {"loads": loads, "state_devices": sorted(devices), "weights_equal": same,
            "state_entries": len(opt2.state), "scheduler_step": sched2.last_epoch}


def stale_checkpoint_refused(rank, world, run_dir, when):
    """Two ranks of driver attempt 1 train a step; attempt 2 takes the run `when` "before" their
    checkpoint starts or "during" it (every file written, not yet committed): the checkpoint
    must be refused on every rank."""
    from ray_jobs.train import checkpoint as ckpt
    from specs.checkpoint import TrainerState
    from specs.ledger import Fenced, Ledger

    ledger = Ledger(run_dir, "r")
    if rank == 0:
        ledger = ledger.begin_attempt()
    epochs = [ledger.epoch]
    dist.broadcast_object_list(epochs)
    ledger = Ledger(run_dir, "r", epoch=epochs[0])
    layout, root, opt = _setup(2, 1, 2, ac="none")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _step(layout, root, *next(batches(1, 1)))
    opt.step()
    if rank == 0 and when == "before":
        Ledger(run_dir, "r").begin_attempt()  # a new driver takes over
    dist.barrier()
    seen = []

    def take_over(staged):
        seen.append(sorted(p.name for p in staged.iterdir()))
        Ledger(run_dir, "r").begin_attempt()

    state = TrainerState(stage="s", stage_index=0, step=1)
    try:
        ckpt.save_checkpoint(ledger, root.model, _Tokenizer(), opt, sched, state, keep_last=1,
                             final=False, before_commit=take_over if when == "during" else None)
    except Fenced as e:
        return {"fenced": str(e).split(" (")[0], "staged": seen}
    return {"fenced": None, "staged": seen}


def _no_planning(*_, **__):
    raise AssertionError("a rank other than 0 planned the stage itself")


def mesh_from_one_plan(rank, world, run, planned_json):
    """The trainer's placement step: gather every rank's (node, local device), agree on one
    stage plan (the driver's `planned_json`, or rank 0's from the slots), build the mesh. Local
    devices run against rank order, so ranks and ring positions differ."""
    from ray_jobs.train import placement
    from specs.plan import StagePlan

    if rank != 0:
        placement.plan_from_workers = _no_planning
    slots = [None] * world
    dist.all_gather_object(slots, placement.WorkerSlot(node=f"node-{rank // 2}",
                                                       local=1 - rank % 2, rank=rank))
    planned = StagePlan.model_validate_json(planned_json) if planned_json else None
    plan = placement.agree_stage_plan(run, 0, slots, planned)
    layout = build_mesh(plan.dims, placement.build_rings(slots, plan), "cpu")
    return {"plan": plan.model_dump_json(), "dims": layout.dims, "mesh": layout.mesh.mesh.tolist(),
            "fsdp": layout.fsdp_mesh.mesh.tolist(), "ring": list(layout.ring.ranks),
            "ulysses": list(layout.sequence.ulysses_ranks), "dp_rank": layout.dp_rank}


# Packed documents (attention: document): rows of DOC_SEQ tokens with their own layouts, two
# rows sharing one, so a batch runs a layout at a time and the grouping is exercised too.
DOC_SEQ = 32
DOC_LAYOUTS = [
    [0, 5, 6, 7, 20],  # tiny documents, and ones crossing every rank's chunk boundaries
    [0, 13],           # a document longer than a shard of a ring of 2 (16 tokens)
    [0, 5, 6, 7, 20],  # the first row's layout again
    [0],               # one document filling the row
]


def document_batch(rows: int):
    """(ids, labels, doc_starts per row) of a packed batch, the same on every rank; labels
    of the last token are ignored (its next token is not in the row)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (rows, DOC_SEQ), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels, [torch.tensor(DOC_LAYOUTS[i % len(DOC_LAYOUTS)]) for i in range(rows)]


def document_positions(starts: torch.Tensor, per_document: bool) -> torch.Tensor:
    """RoPE positions of a whole row: 0 .. DOC_SEQ - 1, or from 0 at each document start."""
    from ray_jobs.ring_attention.documents import document_position_ids

    pos = torch.arange(DOC_SEQ)
    return document_position_ids(pos, starts) if per_document else pos


def train_documents(rank, world, ring, dp, ulysses, ac, per_document, rows_per_ring,
                    balanced=False):
    """One forward and backward of a packed batch under `attention: document` on the layout
    (the trainer's calls: parallelize(documents=True), the rows' doc_starts to the root, RoPE
    positions of this rank's shard); returns the loss and the full gradients. `balanced`: each
    row sharded per document as the trainer does on a ring (balanced_layout, each row read at
    its own positions, its layout to the root)."""
    from ray_jobs.ring_attention.documents import balanced_layout, document_position_rows
    from ray_jobs.ring_attention.ulysses import layout_position_ids

    dims = ParallelDims.of(ring, dp, ring * ulysses * dp, ulysses)
    n = dims.sequence
    layout = build_mesh(dims, [list(range(i * n, (i + 1) * n))[::-1] for i in range(dp)], "cpu")
    model = tiny_llama(0)
    model.set_attn_implementation("sdpa")
    root = parallelize(model, layout, activation_checkpointing=ac, mixed_precision=None,
                       loss_chunk_tokens=8, documents=True)
    ids, labels, starts = document_batch(dp * rows_per_ring)
    mine = slice(layout.dp_rank * rows_per_ring, (layout.dp_rank + 1) * rows_per_ring)
    place = (layout.ring_rank, dims.ring, layout.ulysses_rank, dims.ulysses)
    x, y = (sequence_shard(t[mine], 1, *place) for t in (ids, labels))
    shard = sequence_position_ids(DOC_SEQ, *place)
    rows = starts[mine]
    shards = [shard.tolist()] * len(rows)
    documents = rows
    if balanced:
        documents = [balanced_layout(s, DOC_SEQ, dims.ring) for s in rows]
        own = torch.stack([layout_position_ids(d, *place) for d in documents])
        x, y = (torch.stack([t[r][p] for r, p in zip(range(mine.start, mine.stop), own)])
                for t in (ids, labels))
        shard, shards = own, own.tolist()
    pos = (document_position_rows(shard, rows) if per_document
           else shard if shard.dim() == 2 else shard.unsqueeze(0).expand(len(rows), -1))
    seen = []  # the positions RoPE is given (under document masking the loss alone cannot
    # tell them apart: attention inside a document sees only distances, which both keep)
    model.model.rotary_emb.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["position_ids"].tolist()), with_kwargs=True)
    loss = ring_mean_loss(*root(x, pos, y, documents), layout.sequence)
    (loss * dims.sequence).backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return {"loss": mean.item() / world, "grads": _full_grads(root), "rope_positions": seen[0],
            "shards": shards, "rows": list(range(mine.start, mine.stop)),
            "permuted": balanced and any(not d.is_plain for d in documents)}


def documents_reference(rows: int, per_document: bool) -> dict:
    """The same batch in one process with attention masked document by document: each
    document of each row runs alone through the unsharded model (SDPA, causal), at its RoPE
    positions; the loss is the mean over every scored token of the batch."""
    model = tiny_llama(0)
    model.set_attn_implementation("sdpa")
    ids, labels, starts = document_batch(rows)
    total = torch.zeros(())
    for row in range(rows):
        pos = document_positions(starts[row], per_document)
        bounds = starts[row].tolist() + [DOC_SEQ]
        for a, b in zip(bounds, bounds[1:]):
            logits = model(input_ids=ids[row:row + 1, a:b],
                           position_ids=pos[None, a:b]).logits
            total = total + torch.nn.functional.cross_entropy(
                logits[0], labels[row, a:b], ignore_index=-100, reduction="sum")
    loss = total / (labels != -100).sum()
    loss.backward()
    return {"loss": loss.item(),
            "grads": {n: p.grad.numpy().copy() for n, p in model.named_parameters()}}


def one_document_against_causal(rank, world, ring):
    """A batch whose every row is one document, once as `causal` (no doc_starts) and once as
    `document`: both results, for a bit-for-bit comparison."""
    out = {}
    for documents in (False, True):
        dims = ParallelDims.of(ring, 1, ring)
        layout = build_mesh(dims, [list(range(ring))], "cpu")
        model = tiny_llama(0)
        model.set_attn_implementation("sdpa")
        root = parallelize(model, layout, activation_checkpointing="full", mixed_precision=None,
                           loss_chunk_tokens=8, documents=documents)
        ids, labels = next(batches(1, 1))
        place = (layout.ring_rank, ring, 0, 1)
        x, y = (sequence_shard(t, 1, *place) for t in (ids, labels))
        pos = sequence_position_ids(SEQ, *place).unsqueeze(0).expand(PER_RING, -1)
        rows = [torch.tensor([0])] * PER_RING if documents else None
        loss = ring_mean_loss(*root(x, pos, y, rows), layout.sequence)
        (loss * dims.sequence).backward()
        out["document" if documents else "causal"] = (loss.item(), _full_grads(root))
    return out
