"""Checkpoints: sharded model and optimizer state (torch.distributed.checkpoint) plus a Hugging
Face export, committed through the ledger.

    checkpoints/<stage>/step-000050/
        dcp/             every rank's shards of the model and AdamW state (and DCP's metadata)
        trainer_state/   scheduler.pt, state.json (step, tokens, losses, data position)
        config.json, model.safetensors, tokenizer.json, ...   the Hugging Face export
        COMMITTED

Order of a save: every rank writes its DCP shards (collective); the full weights are gathered
to rank 0, which writes the Hugging Face files, the tokenizer and trainer_state/; then rank 0
writes the COMMITTED marker, records the checkpoint in the ledger and prunes to
storage.keep_last. A directory without its marker is never read. A resume loads the DCP state
into whatever mesh the new workers build (DCP reshards), so the world size may change; the data
position is (stage, step) in the global batch, which does not depend on it. Evaluation and the
next stage read the Hugging Face export.
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

from specs.ledger import Ledger, is_committed, mark_committed

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
    world_size: int = 1
    ring_degree: int = 1
    dp_degree: int = 1
    shard_degree: int = 1
    ulysses_degree: int = 1
    losses: list[float] = field(default_factory=list)  # per optimizer step
    init_from: str | None = None  # checkpoint the stage started from (relative to the run dir)
    init_checksum: float = 0.0  # sum of |weights| at the stage's start: shows what carried over
    attention_kernel: str = ""  # the block kernel the ring ran on, and why (select_block_kernel)


def checkpoint_dir(run_dir: Path, stage: str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / stage / f"step-{step:06d}"


def save_checkpoint(ledger: Ledger, model: torch.nn.Module, tokenizer, optimizer, scheduler,
                    state: TrainerState, *, keep_last: int, final: bool) -> Path:
    """Write, commit and record a checkpoint; prune the stage's older ones. Collective: every
    rank calls it. `model` is the Hugging Face model inside the FSDP root. Returns its dir."""
    path = checkpoint_dir(ledger.run_dir, state.stage, state.step)
    rank = dist.get_rank()
    if rank == 0:
        if path.exists():  # a half-written leftover, or this step saved before a restart
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path / DCP_DIR)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if rank == 0:
        # The ring attention implementation is a training-time choice; saved configs load
        # anywhere. save_pretrained consumes the dict it is given: hand it a copy.
        model.save_pretrained(path, state_dict=dict(full))
        tokenizer.save_pretrained(path)
        sd = path / STATE_DIR
        sd.mkdir()
        torch.save(scheduler.state_dict(), sd / "scheduler.pt")
        (sd / "state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
        mark_committed(path)
        ledger.commit_checkpoint(state.stage, state.step, path, final=final)
        prune_checkpoints(ledger, state.stage, keep_last)
    dist.barrier()  # nobody runs ahead of a checkpoint still being written
    return path


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
    if old:
        ledger.forget_checkpoints(stage, old)
        for rel in old:
            shutil.rmtree(ledger.run_dir / rel, ignore_errors=True)
    return old


def read_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((Path(path) / STATE_DIR / "state.json").read_text()))


def final_checkpoint(ledger: Ledger, stage: str) -> Path | None:
    """The stage's final committed checkpoint, the start of the next stage."""
    entry = ledger.read().stages.get(stage)
    for ckpt in reversed(entry.checkpoints if entry else []):
        if ckpt.final and is_committed(ledger.run_dir / ckpt.path):
            return ledger.run_dir / ckpt.path
    return None
