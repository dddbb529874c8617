"""The run ledger: one JSON document per run recording stages, committed checkpoints and evals.

Resume, the evaluation scheduler and the Kubernetes operator all read it, so it only ever lists
checkpoints that were committed: written completely, then marked with a COMMITTED file. Every
update is a locked read-modify-write that replaces the file atomically (write a temporary file,
fsync, rename), so a reader sees the old document or the new one, never half of one.

Layout of a run directory (``<storage.path>/<run name>/``)::

    ledger.json
    plan.json
    checkpoints/<stage>/step-000050/   HF model files + tokenizer + trainer_state/ + COMMITTED
    eval/<stage>/step-000050/          results.json, heatmap PNG, tables
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from specs.atomic import atomic_write, fsync_dir

COMMITTED = "COMMITTED"
LEDGER_FILE = "ledger.json"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointEntry(_Doc):
    step: int = Field(ge=0, description="Optimizer steps done in the stage when saved.")
    path: str = Field(description="Checkpoint directory, relative to the run directory.")
    committed_at: str = Field(description="UTC time the COMMITTED marker was written.")
    final: bool = Field(False, description="The stage's last checkpoint.")


class EvalEntry(_Doc):
    status: Literal["running", "done", "failed"]
    attempts: int = Field(0, ge=0)
    scores: dict[str, float] = Field(default_factory=dict, description="Score per task, 0..1.")
    results: str | None = Field(None, description="results.json, relative to the run directory.")
    error: str | None = None


class StageEntry(_Doc):
    state: Literal["pending", "running", "done", "failed"] = "pending"
    checkpoints: list[CheckpointEntry] = Field(default_factory=list)
    eval: dict[str, EvalEntry] = Field(default_factory=dict,
                                       description="Keyed by checkpoint path.")
    attempts: int = Field(0, ge=0, description="Times the stage was started.")


class LedgerDoc(_Doc):
    run: str
    stages: dict[str, StageEntry] = Field(default_factory=dict)
    updated_at: str = ""

    def latest_checkpoint(self, stage: str) -> CheckpointEntry | None:
        entry = self.stages.get(stage)
        return entry.checkpoints[-1] if entry and entry.checkpoints else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def is_committed(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / COMMITTED).is_file()


def mark_committed(checkpoint_dir: str | Path) -> None:
    """Write the COMMITTED marker last, after every file of the checkpoint is durable."""
    checkpoint_dir = Path(checkpoint_dir)
    for f in checkpoint_dir.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():  # the entries of its files, too
            fsync_dir(f)
    fsync_dir(checkpoint_dir)
    atomic_write(checkpoint_dir / COMMITTED, _now() + "\n")


class Ledger:
    """A run's ledger file; safe to use from several processes on one filesystem."""

    def __init__(self, run_dir: str | Path, run_name: str | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_FILE
        self.run_name = run_name or self.run_dir.name

    def read(self) -> LedgerDoc:
        if not self.path.exists():
            return LedgerDoc(run=self.run_name)
        return LedgerDoc.model_validate_json(self.path.read_text(encoding="utf-8"))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".ledger.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, change: Callable[[LedgerDoc], None]) -> LedgerDoc:
        """Apply `change` to the current document and replace the file atomically."""
        with self._locked():
            doc = self.read()
            change(doc)
            doc.updated_at = _now()
            atomic_write(self.path, json.dumps(doc.model_dump(mode="json"), indent=2) + "\n")
            return doc

    def stage(self, doc: LedgerDoc, name: str) -> StageEntry:
        return doc.stages.setdefault(name, StageEntry())

    def start_stage(self, name: str) -> LedgerDoc:
        def change(doc: LedgerDoc) -> None:
            entry = self.stage(doc, name)
            entry.state, entry.attempts = "running", entry.attempts + 1
        return self.update(change)

    def commit_checkpoint(self, stage: str, step: int, checkpoint_dir: str | Path,
                          *, final: bool = False) -> CheckpointEntry:
        """Record a checkpoint whose COMMITTED marker exists; refuse one without it."""
        checkpoint_dir = Path(checkpoint_dir)
        if not is_committed(checkpoint_dir):
            raise ValueError(f"checkpoint {checkpoint_dir} has no {COMMITTED} marker; call "
                             "mark_committed() after all of its files are written")
        rel = os.path.relpath(checkpoint_dir, self.run_dir)
        entry = CheckpointEntry(step=step, path=rel, committed_at=_now(), final=final)

        def change(doc: LedgerDoc) -> None:
            st = self.stage(doc, stage)
            st.checkpoints = [c for c in st.checkpoints if c.path != rel] + [entry]
            st.checkpoints.sort(key=lambda c: c.step)
        self.update(change)
        return entry

    def finish_stage(self, name: str, state: Literal["done", "failed"] = "done") -> LedgerDoc:
        def change(doc: LedgerDoc) -> None:
            self.stage(doc, name).state = state
        return self.update(change)

    def record_eval(self, stage: str, checkpoint: str, result: EvalEntry) -> LedgerDoc:
        def change(doc: LedgerDoc) -> None:
            self.stage(doc, stage).eval[checkpoint] = result
        return self.update(change)

    def forget_checkpoints(self, stage: str, paths: list[str]) -> LedgerDoc:
        """Drop pruned checkpoints from the ledger (before their directories are deleted)."""
        def change(doc: LedgerDoc) -> None:
            st = self.stage(doc, stage)
            st.checkpoints = [c for c in st.checkpoints if c.path not in paths]
        return self.update(change)

    def latest_committed(self, stage: str) -> Path | None:
        """Newest checkpoint of `stage` that is in the ledger AND still carries its marker."""
        doc = self.read()
        entry = doc.stages.get(stage)
        for ckpt in reversed(entry.checkpoints if entry else []):
            path = self.run_dir / ckpt.path
            if is_committed(path):
                return path
        return None
