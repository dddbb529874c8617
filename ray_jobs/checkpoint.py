"""Checkpoints: a self-contained HF Llama directory plus trainer_state/, committed via the ledger.

Order of a save (rank 0 only): model (save_pretrained) and tokenizer (tokenizer.json), then
trainer_state/ (optimizer, scheduler, data position, stage), then the COMMITTED marker, then the
ledger entry, then pruning to storage.keep_last. A directory without its marker is never read.
Model and optimizer are saved whole (every rank holds a replica), so a checkpoint resumes on any
world size; the data position is (stage, step) in the global batch, which does not depend on it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from specs.ledger import Ledger, is_committed, mark_committed

STATE_DIR = "trainer_state"


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
    losses: list[float] = field(default_factory=list)  # per optimizer step
    init_from: str | None = None  # checkpoint the stage started from (relative to the run dir)
    init_checksum: float = 0.0  # sum of |weights| at the stage's start: shows what carried over


def checkpoint_dir(run_dir: Path, stage: str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / stage / f"step-{step:06d}"


def save_checkpoint(ledger: Ledger, model, tokenizer, optimizer, scheduler, state: TrainerState,
                    *, keep_last: int, final: bool) -> Path:
    """Write, commit and record a checkpoint; prune the stage's older ones. Returns its dir."""
    path = checkpoint_dir(ledger.run_dir, state.stage, state.step)
    if path.exists():  # a half-written leftover, or this step saved before a restart
        shutil.rmtree(path)
    path.mkdir(parents=True)
    # The ring attention implementation is a training-time choice; saved configs load anywhere.
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    sd = path / STATE_DIR
    sd.mkdir()
    torch.save(optimizer.state_dict(), sd / "optimizer.pt")
    torch.save(scheduler.state_dict(), sd / "scheduler.pt")
    (sd / "state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
    mark_committed(path)
    ledger.commit_checkpoint(state.stage, state.step, path, final=final)
    prune_checkpoints(ledger, state.stage, keep_last)
    return path


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


def load_optimizer(path: Path, optimizer, scheduler) -> None:
    sd = Path(path) / STATE_DIR
    optimizer.load_state_dict(torch.load(sd / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(sd / "scheduler.pt", weights_only=True))


def final_checkpoint(ledger: Ledger, stage: str) -> Path | None:
    """The stage's final committed checkpoint, the start of the next stage."""
    entry = ledger.read().stages.get(stage)
    for ckpt in reversed(entry.checkpoints if entry else []):
        if ckpt.final and is_committed(ledger.run_dir / ckpt.path):
            return ledger.run_dir / ckpt.path
    return None
