"""The per-worker training loop of one stage (what every Ray Train worker runs).

Story of a worker: (1) find its place in the plan from its node and local device and build the
stage's device mesh; (2) find where the stage starts, from the ledger; (3) build the model and
parallelize it (ring attention, activation checkpointing, FSDP2, chunked loss); (4) build the
optimizer and restore the sharded state when resuming; (5) train: shard each sample zigzag over
the ring, step, report on a cadence, checkpoint.

Every write to the run (metrics, progress, checkpoints, the ledger) is fenced by the driver
attempt's epoch (specs/ledger.py): once a newer driver owns the run, every rank of this one
learns it at the same collective and the worker returns without writing anything more.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from ray_jobs.data.samples import SampleStream, read_documents
from ray_jobs.data.tokenizer import build_tokenizer
from ray_jobs.ray_setup import quiet_worker_logs
from ray_jobs.ring_attention import record_ring_timings, select_block_kernel
from ray_jobs.ring_attention.documents import balanced_layout, document_position_rows
from ray_jobs.ring_attention.ulysses import layout_position_ids, sequence_position_ids
from ray_jobs.train.checkpoint import load_checkpoint, on_rank0, save_checkpoint
from ray_jobs.train.config import StepInfo, WorkerConfig
from ray_jobs.train.heartbeat import Heartbeat, beat_interval, health_dir
from ray_jobs.train.model import (
    build_meta_model,
    init_weights,
    load_hf_weights,
    materialize,
    model_config,
    model_source,
    stage_rope,
    weights_checksum,
)
from ray_jobs.train.parallelize import (
    build_mesh,
    build_optimizer,
    clip_gradients,
    compute_dtype_of,
    parallelize,
    ring_mean_loss,
    sync_gradients_in,
)
from ray_jobs.train.placement import (
    NODE_LABEL,
    WorkerSlot,
    agree_stage_plan,
    build_rings,
    record_stage_plan,
)
from specs.checkpoint import TrainerState, final_checkpoint, locate, read_pointer, read_state
from specs.ledger import Fenced, Ledger, contained, is_committed
from specs.run import RunSpec


def train_stage_worker(config: WorkerConfig) -> None:
    """Train one stage; returns early, writing nothing more, once a newer driver owns the run.
    A heartbeat thread tells the driver's health watch where this rank is meanwhile."""
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    heartbeat = Heartbeat(health_dir(config.run_dir, config.stage.name, config.epoch),
                          rank=rank, world=ctx.get_world_size(), node=_node_name(),
                          gpu=ctx.get_local_rank(),
                          node_id=ray.get_runtime_context().get_node_id(),
                          interval=beat_interval(config.run.failure.hang_timeout_s)).start()
    try:
        _train(config, heartbeat)
    except Fenced as e:
        if rank == 0:
            print(f"[{config.stage.name}] stopped: {e}", flush=True)
    finally:
        heartbeat.stop()


def _node_name() -> str:
    """This worker's node as the plan names it: its ringpilot node label, else Ray's node id."""
    runtime = ray.get_runtime_context()
    return runtime.get_node_labels().get(NODE_LABEL) or runtime.get_node_id()


def _train(config: WorkerConfig, heartbeat: Heartbeat) -> None:
    run, index, run_dir, spec_dir = config.run, config.stage_index, config.run_dir, config.spec_dir
    stage = config.stage
    torch.set_num_threads(run.resources.cpus_per_worker)
    quiet_worker_logs()
    ledger = Ledger(run_dir, run.name, epoch=config.epoch)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    gpu = run.resources.device == "gpu"
    device = ray.train.torch.get_device() if gpu else torch.device("cpu")

    # 1. Place: one plan for all ranks (the driver's, or rank 0's from the gathered places);
    #    it maps (node, local device) -> (ring, position). Ray's world rank only names the
    #    process to torch.distributed, it does not decide the ring order.
    slots = [None] * world
    dist.all_gather_object(slots, WorkerSlot(node=_node_name(), local=ctx.get_local_rank(),
                                             rank=rank))
    stage_plan = agree_stage_plan(run, index, slots, config.plan)
    dims = stage_plan.dims
    layout = build_mesh(dims, build_rings(slots, stage_plan), device.type)
    ring_prev = layout.ring.prev_peer if dims.ring > 1 else None  # the one hop it receives on
    heartbeat.ring_prev = ring_prev
    heartbeat.mark("load")
    if rank == 0 and config.plan is None:  # the driver saved a ClusterSpec plan already
        record_stage_plan(run_dir, run.name, stage_plan)

    # 2. Start: this stage's newest committed checkpoint (ledger first: Ray may not have
    #    registered one reported just before a crash), else the previous stage's final one.
    start = [plan_start(run, index, ledger, _from_ray_pointer(run_dir))] if rank == 0 else [None]
    dist.broadcast_object_list(start)
    resume, init_from = start[0]

    # 3. Model: built on the meta device (shapes only), parallelize() splits its attention
    #    over the ring (SDPA until then) and shards it, and only then does each rank give its
    #    shards storage and fill them: from the checkpoint's DCP shards when resuming (step 4),
    #    else the slices it owns of the Hugging Face checkpoint (model.path, or the previous
    #    stage's export), else a new model drawn the same in every layout. No rank ever holds
    #    the whole model (docs/training.md, "Loading at scale").
    tok = build_tokenizer(run, run_dir, spec_dir)
    source = model_source(run, index, Path(init_from) if init_from else None, spec_dir)
    hf_model = build_meta_model(model_config(run, index, source, attn_implementation="sdpa"),
                                getattr(torch, run.model.dtype))
    documents = stage.attention == "document"
    model = parallelize(hf_model, layout, mixed_precision=compute_dtype_of(run),
                        activation_checkpointing=stage_plan.activation_checkpointing,
                        loss_chunk_tokens=run.training.loss_chunk_tokens, documents=documents)
    rope = stage_rope(run, index, spec_dir)
    materialize(hf_model, device, rope, stage.seq_len, run.model.pretrain_seq_len)
    init_checksum = 0.0  # a resumed stage keeps the one its checkpoint recorded (step 4)
    if not resume:
        if source is not None:
            load_hf_weights(hf_model, source)
        else:
            init_weights(hf_model, run.data.seed)
        init_checksum = weights_checksum(hf_model)  # of the whole model, summed over shards

    # 4. Optimizer and schedule (linear warm-up, then cosine decay), restored when resuming.
    opt = build_optimizer(model, stage.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, stage.warmup_steps, stage.steps))
    state = TrainerState(stage=stage.name, stage_index=index, step=0,
                         rope_theta=rope["rope_theta"], rope=rope, seq_len=stage.seq_len,
                         world_size=world, dims=dims, attention=stage.attention,
                         position_ids=stage.position_ids)
    state.init_from = os.path.relpath(init_from, run_dir) if init_from else None
    state.init_checksum = init_checksum
    if dims.sequence > 1 or documents:  # documents: the ring runs, if only a ring of one
        kernel = select_block_kernel(device.type)
        state.attention_kernel = f"{kernel.name} ({kernel.reason})"
    else:
        state.attention_kernel = "sdpa (a ring of one: no ring attention)"
    if resume:
        load_checkpoint(Path(init_from), hf_model, opt, sched)
        old = read_state(Path(init_from))
        state.step, state.tokens, state.seconds, state.losses = (old.step, old.tokens, old.seconds,
                                                                 old.losses)
        state.parts_seconds = dict(old.parts_seconds)
        state.init_from, state.init_checksum = old.init_from, old.init_checksum
    on_rank0(rank, lambda: ledger.record_start(stage.name, state.step))

    # 5. Train.
    # data.prepared is read by memory map per sample; data.documents (small corpora) whole
    stream = SampleStream(run, index, tok,
                          read_documents(run, spec_dir) if run.data.mix.documents else None,
                          spec_dir=spec_dir)
    per_ring = stage.batch_size // dims.dp
    my_samples = range(layout.dp_rank * per_ring, (layout.dp_rank + 1) * per_ring)
    # this rank's token positions: its zigzag shard of the ring, then its Ulysses piece
    my_positions = sequence_position_ids(stage.seq_len, layout.ring_rank, dims.ring,
                                         layout.ulysses_rank, dims.ulysses)
    positions = my_positions.to(device).unsqueeze(0).expand(per_ring, -1)
    place = (layout.ring_rank, dims.ring, layout.ulysses_rank, dims.ulysses)

    def shard_of(starts: torch.Tensor):
        # attention: document on a ring: each row sharded per document (its documents cut or
        # placed so every rank of the ring attends about as many pairs; zigzag alone left the
        # busiest 1.15-1.9x the mean), read and attended in that layout
        row_layout = balanced_layout(starts, stage.seq_len, dims.ring)
        return layout_position_ids(row_layout, *place), row_layout

    shard_rows = shard_of if documents and dims.ring > 1 else None
    every = run.failure.report_every
    t_report, steps_since, pending = time.perf_counter(), 0, []
    clock = StepClock(device, state.parts_seconds)
    while state.step < stage.steps:
        step = state.step
        if config.before_step is not None:
            config.before_step(StepInfo(stage=stage.name, step=step, rank=rank, world=world,
                                        run_dir=run_dir))
        heartbeat.mark("step", step + 1)
        clock.start()
        phases0 = dict(clock.parts)
        lr = sched.get_last_lr()[0]  # the rate this step's update uses
        loss_sum, ids = torch.zeros((), device=device), []
        with record_ring_timings() as hops:  # this step's K/V hop waits, a fresh tally
            for micro in range(stage.grad_accum_steps):
                # (B, S / (ring x ulysses)): only this rank's positions (prepared documents are
                # read only there)
                batch = stream.batch(step, micro, my_samples, my_positions, shard_rows)
                ids += batch.sample_ids
                x, y = batch.inputs.to(device), batch.labels.to(device)
                rows = batch.positions if batch.positions is not None else my_positions
                rope_positions = (
                    (positions if batch.positions is None else rows.to(device))
                    if stage.position_ids == "continuous"
                    else document_position_rows(rows, batch.doc_starts).to(device))
                clock.lap("data")
                sync_gradients_in(model, micro, stage.grad_accum_steps)
                loss = ring_mean_loss(*model(x, rope_positions, y,
                                             (batch.layouts or batch.doc_starts) if documents
                                             else None),
                                      layout.sequence)
                # FSDP averages gradients over all ranks; a sequence's ranks hold shares that add.
                (loss * dims.sequence / stage.grad_accum_steps).backward()
                loss_sum += loss.detach() / stage.grad_accum_steps
                clock.lap("forward + backward")
        grad_norm = clip_gradients(model, run.training.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        dist.all_reduce(loss_sum)  # every rank of a ring holds its ring's loss: mean over dp
        loss_value = loss_sum.item() / world
        clock.lap("loss all-reduce")
        state.step, state.tokens = step + 1, state.tokens + stage.tokens_per_step
        state.seconds += clock.total
        state.losses.append(loss_value)
        steps_since += 1
        pending.append({"step": state.step, "loss": loss_value, "time": time.time(),
                        "pid": os.getpid(), "epoch": config.epoch, "samples": ids,
                        "lr": lr, "grad_norm": float(grad_norm), "step_s": clock.total,
                        "tokens": stage.tokens_per_step,
                        "phases": {k: v - phases0.get(k, 0.0) for k, v in clock.parts.items()},
                        "memory_peak_bytes": _memory_peak(device), "kv_wait_s": hops.wait_s,
                        "attn_compute_s": hops.compute_s, "ring_prev": ring_prev})

        final = state.step == stage.steps
        checkpoint_now = final or state.step % run.storage.checkpoint_every == 0
        if checkpoint_now or state.step % every == 0:
            records = _gather_metrics(pending, rank, world)
            on_rank0(rank, lambda: _append_all(ledger, run_dir / "metrics" / f"{stage.name}.jsonl",
                                               records))
            pending = []
            elapsed = time.perf_counter() - t_report
            metrics = {"stage": stage.name, "step": state.step, "steps": stage.steps,
                       "loss": loss_value, "tokens": state.tokens,
                       "tokens_per_s": steps_since * stage.tokens_per_step / elapsed,
                       "eta_s": (stage.steps - state.step) * elapsed / steps_since}
            t_report, steps_since = time.perf_counter(), 0
            checkpoint = None
            if checkpoint_now:
                metrics["checkpoint"] = True
                heartbeat.mark("checkpoint")
                path = save_checkpoint(ledger, hf_model, tok, opt, sched, state,
                                       keep_last=run.storage.keep_last, final=final,
                                       before_commit=config.before_commit)
                heartbeat.mark("step")
                if rank == 0:
                    checkpoint = _ray_pointer(path, ledger.run_dir, state.step)
            on_rank0(rank, lambda: ledger.append_line(
                run_dir / "progress" / f"{stage.name}.jsonl", {**metrics, "time": time.time()}))
            # Ray Train hears only of checkpoints: each report waits for its controller's next
            # poll of the workers (~2 s here), so progress goes to the files the driver tails.
            if checkpoint_now:
                ray.train.report(metrics, checkpoint=checkpoint)
            if checkpoint is not None:  # Ray has copied the pointer into its storage
                shutil.rmtree(checkpoint.path, ignore_errors=True)


class StepClock:
    """Wall time of a step's phases, added into `parts` (a TrainerState's parts_seconds).

    Phases: data (sampling and sharding), forward + backward (with the communication they
    wait for: K/V hops, weight all-gathers, gradient reduce-scatters, the data-parallel
    all-reduce), optimizer (clipping, AdamW, the schedule), loss all-reduce (the step's one
    reporting collective). On a GPU each lap first waits for the device, so a phase is charged
    with its own kernels (one synchronisation per phase: noise against a step of seconds)."""

    def __init__(self, device: torch.device, parts: dict[str, float]):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.parts = parts
        self.total = 0.0
        self._t = 0.0

    def start(self) -> None:
        self._sync()
        self._t = time.perf_counter()
        self.total = 0.0

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.parts[phase] = self.parts.get(phase, 0.0) + (now - self._t)
        self.total += now - self._t
        self._t = now


LR_FLOOR = 0.1  # the cosine decay ends at this fraction of the peak learning rate


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Learning rate over its peak after `step` optimizer steps: linear warm-up over `warmup`
    steps, then cosine decay to LR_FLOOR at the stage's last step (a pure function of the step,
    so a resumed stage follows the same curve)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(steps - warmup, 1)
    return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def plan_start(run: RunSpec, index: int, ledger: Ledger,
               pointer: Path | None = None) -> tuple[bool, str | None]:
    """(resume this stage?, checkpoint to load) from the ledger, or Ray's checkpoint if newer."""
    stage = run.stages[index]
    latest = ledger.latest_committed(stage.name)
    at = locate(pointer) if pointer is not None else None
    if at is not None and at.stage == stage.name and (
            latest is None or at.step > locate(latest).step):
        latest = pointer
    if latest is not None:
        return True, str(latest)
    if index == 0:
        return False, None
    prev = run.stages[index - 1].name
    final = final_checkpoint(ledger, prev)
    if final is None:
        raise RuntimeError(f"stage {stage.name} starts from stage {prev}'s final checkpoint, "
                           f"but the ledger {ledger.path} has none; train stage {prev} first")
    return False, str(final)


def _ray_pointer(path: Path, run_dir: Path, step: int):
    """A tiny Ray checkpoint naming the committed one (Ray then copies a few bytes, not weights)."""
    tmp = Path(tempfile.mkdtemp(prefix="ringpilot-ckpt-"))
    (tmp / "pointer.json").write_text(json.dumps({"path": os.path.relpath(path, run_dir),
                                                  "step": step}))
    return ray.train.Checkpoint.from_directory(str(tmp))


def _from_ray_pointer(run_dir: Path) -> Path | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        rel = read_pointer(Path(d) / "pointer.json")
    path = contained(run_dir, rel, "the path in Ray Train's checkpoint pointer.json")
    return path if is_committed(path) else None


# figures that differ per rank, kept as lists: memory peak, the wait on the one incoming K/V hop
# (ring_prev -> this rank) and the attention compute it overlaps (ray_jobs/train/health.py)
PER_RANK = ("memory_peak_bytes", "kv_wait_s", "attn_compute_s", "ring_prev")


def _gather_metrics(records: list[dict], rank: int, world: int) -> list[dict]:
    """Per-step loss, the sample ids every rank actually trained on and the per-rank figures
    (PER_RANK), gathered per report (not per step: a collective per step would
    cost more than a tiny model's step). Rank 0 gets the records to write; the others an empty
    list."""
    gathered = [None] * world
    dist.all_gather_object(gathered, [(r["samples"], [r[k] for k in PER_RANK]) for r in records])
    if rank != 0:
        return []
    return [{**rec, "samples": sorted({s for per_rank in gathered for s in per_rank[i][0]}),
             **{k: [per_rank[i][1][j] for per_rank in gathered] for j, k in enumerate(PER_RANK)}}
            for i, rec in enumerate(records)]


def _memory_peak(device: torch.device) -> int:
    """Bytes: the device's allocation peak since the last call (GPU), else the process's peak
    resident set (CPU: the kernel keeps only the lifetime peak)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _append_all(ledger: Ledger, path: Path, records: list[dict]) -> None:
    with ledger.fenced():  # one lock for the report's lines
        for rec in records:
            ledger.append_line(path, rec)
