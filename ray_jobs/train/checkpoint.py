"""Checkpoints: sharded model and optimizer state (torch.distributed.checkpoint) plus a Hugging
Face export, committed through the ledger.

    checkpoints/<stage>/step-000050/
        dcp/             every rank's shards of the model and AdamW state (and DCP's metadata)
        trainer_state/   scheduler.pt, state.json (step, tokens, losses, data position)
        config.json, model.safetensors, tokenizer.json, ...   the Hugging Face export
        COMMITTED

Order of a save: everything is written into a staging directory named by the driver attempt's
epoch (`.step-000050.epoch-3`): every rank writes its DCP shards (collective); the full weights
are gathered to rank 0, which writes the Hugging Face files, the tokenizer and trainer_state/;
then rank 0 writes the COMMITTED marker and, under the ledger's lock and only while its epoch
still owns the run, renames the directory into place and records it (`Ledger.commit_checkpoint`),
then prunes to storage.keep_last. A directory without its marker is never read; a superseded
attempt's straggler never writes where the current attempt reads (specs/ledger.py, fencing).

A resume loads the DCP state into whatever mesh the new workers build (DCP reshards), so the
world size may change; the data position is (stage, step) in the global batch, which does not
depend on it. Evaluation and the next stage read the Hugging Face export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from specs.degrees import ParallelDims
from specs.ledger import Fenced, Ledger, is_committed, mark_committed
from specs.plan import DEGREE_KEYS

STATE_DIR = "trainer_state"
DCP_DIR = "dcp"


@dataclass
class TrainerState:
    """Where training stands: enough to continue exactly as if nothing had stopped."""

    stage: str
    stage_index: int
    step: int  # optimizer steps done in this stage
    tokens: int = 0  # tokens trained on in this stage
    rope_theta: float = 0.0
    seq_len: int = 0
    seconds: float = 0.0  # training time in this stage so far
    parts_seconds: dict[str, float] = field(default_factory=dict)  # `seconds` by phase (StepClock)
    world_size: int = 1
    dims: ParallelDims = field(default_factory=ParallelDims)  # the layout the plan gave
    losses: list[float] = field(default_factory=list)  # per optimizer step
    init_from: str | None = None  # checkpoint the stage started from (relative to the run dir)
    init_checksum: float = 0.0  # sum of |weights| at the stage's start: shows what carried over
    attention_kernel: str = ""  # the block kernel the ring ran on, and why (select_block_kernel)

    def to_json(self) -> str:
        """state.json, the layout under plan.json's degree keys (topology.measured reads them)."""
        doc = asdict(self)
        doc.update(doc.pop("dims").degree_keys())
        return json.dumps(doc, indent=1) + "\n"


def checkpoint_dir(run_dir: Path, stage: str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / stage / f"step-{step:06d}"


def staging_dir(path: Path, epoch: int | None) -> Path:
    """Where the attempt of `epoch` writes the checkpoint `path` before it is moved into place."""
    return path.parent / f".{path.name}.epoch-{epoch or 0}"


def clear_stale_staging(stage_dir: Path, epoch: int | None, name: str | None = None) -> None:
    """Remove staging directories of older attempts (never a newer one's), and this attempt's
    own leftover for the checkpoint `name` (a worker group that died while writing it)."""
    for d in stage_dir.glob(".step-*.epoch-*") if stage_dir.is_dir() else ():
        step_name, _, e = d.name[1:].rpartition(".epoch-")
        if not e.isdigit():
            continue
        if int(e) < (epoch or 0) or (int(e) == (epoch or 0) and step_name == name):
            shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(ledger: Ledger, model: torch.nn.Module, tokenizer, optimizer, scheduler,
                    state: TrainerState, *, keep_last: int, final: bool,
                    before_commit=None) -> Path:
    """Write, commit and record a checkpoint; prune the stage's older ones. Collective: every
    rank calls it, and every rank raises `Fenced` if a newer driver attempt owns the run (the
    staged files are then removed; nothing was committed). `model` is the Hugging Face model
    inside the FSDP root. `before_commit(staged_dir)` is a fault-injection hook for tests, run
    on rank 0 after every file is written and before the COMMITTED marker. Returns the dir."""
    path = checkpoint_dir(ledger.run_dir, state.stage, state.step)
    staged = staging_dir(path, ledger.epoch)
    rank = dist.get_rank()

    def start() -> None:
        with ledger.fenced():  # a superseded attempt does not even start writing
            clear_stale_staging(path.parent, ledger.epoch, path.name)
            staged.mkdir(parents=True)

    on_rank0(rank, start)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=staged / DCP_DIR)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))

    def commit() -> None:
        # The ring attention implementation is a training-time choice; saved configs load
        # anywhere. save_pretrained consumes the dict it is given: hand it a copy.
        model.save_pretrained(staged, state_dict=dict(full))
        tokenizer.save_pretrained(staged)
        sd = staged / STATE_DIR
        sd.mkdir()
        torch.save(scheduler.state_dict(), sd / "scheduler.pt")
        (sd / "state.json").write_text(state.to_json())
        if before_commit is not None:
            before_commit(staged)
        mark_committed(staged)
        try:
            ledger.commit_checkpoint(state.stage, state.step, path, final=final, staged=staged)
        except Fenced:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        prune_checkpoints(ledger, state.stage, keep_last)

    # nobody runs ahead of a checkpoint still being written, and all learn if it was refused
    on_rank0(rank, commit)
    return path


def on_rank0(rank: int, write) -> None:
    """Rank 0 calls `write` (a fenced write to the run); every rank learns, at one broadcast,
    whether it was refused and then raises the same `Fenced`. Collective."""
    fenced: list[Fenced | None] = [None]
    if rank == 0:
        try:
            write()
        except Fenced as e:
            fenced = [e]
    dist.broadcast_object_list(fenced)
    if fenced[0] is not None:
        raise fenced[0]


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> None:
    """Load a checkpoint's model and optimizer shards into this mesh, and its scheduler.
    Collective: every rank calls it."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=Path(path) / DCP_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    # DCP reads every tensor into the tensors of `state`, on this rank's device, shard by shard
    # (never a whole optimizer state on the device it was saved from); the scheduler's state is
    # plain numbers, read onto the CPU.
    scheduler.load_state_dict(torch.load(Path(path) / STATE_DIR / "scheduler.pt",
                                         map_location="cpu", weights_only=True))


def prune_checkpoints(ledger: Ledger, stage: str, keep_last: int) -> list[str]:
    """Forget all but the newest `keep_last` committed checkpoints in the ledger, then delete
    them."""
    entry = ledger.read().stages.get(stage)
    old = [c.path for c in (entry.checkpoints if entry else [])][:-keep_last]
    doomed = [ledger.resolve(rel, f"stages.{stage}.checkpoints path") for rel in old]
    if old:
        ledger.forget_checkpoints(stage, old)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
    return old


def read_state(path: Path) -> TrainerState:
    doc = json.loads((Path(path) / STATE_DIR / "state.json").read_text())
    degrees = {k: doc.pop(k) for k in DEGREE_KEYS if k in doc}
    return TrainerState(**doc, dims=ParallelDims.from_degree_keys(degrees))


def final_checkpoint(ledger: Ledger, stage: str) -> Path | None:
    """The stage's final committed checkpoint, the start of the next stage."""
    entry = ledger.read().stages.get(stage)
    for ckpt in reversed(entry.checkpoints if entry else []):
        path = ledger.resolve(ckpt.path, f"stages.{stage}.checkpoints path")
        if ckpt.final and is_committed(path):
            return path
    return None
