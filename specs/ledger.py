"""The run ledger: one JSON document per run recording stages, committed checkpoints and evals.

Resume, the evaluation scheduler and the Kubernetes operator all read it, so it only ever lists
checkpoints that were committed: written completely, then marked with a COMMITTED file. Every
update is a locked read-modify-write that replaces the file atomically (write a temporary file,
fsync, rename), so a reader sees the old document or the new one, never half of one.

One writer per run (fencing). Each driver attempt takes the next `epoch` under the lock
(`Ledger.begin_attempt`) and hands it to its workers. Every write of a run's shared state (a
ledger update, a metrics or progress line, a checkpoint's move into place) happens under the
lock after checking that the ledger's epoch is still the writer's; once a newer driver has
taken over, a straggler of the old one (a worker Ray has not killed yet) gets `Fenced` and
writes nothing. Checkpoints are written into a staging directory named by their epoch and
renamed into place under the lock, so a straggler can never write into a directory the new
attempt reads or writes.

Every path stored in the ledger is relative to the run directory and must stay inside it: stage
names are simple names and stored paths are relative paths of simple names (specs/names.py,
checked when the ledger is read and before it is written), and `Ledger.resolve` refuses one that
leads out through a symlink, so an edited or corrupted ledger cannot make ringpilot read, write
or delete anything else. The file itself is read with a size cap and never through a symlink.

Layout of a run directory (``<storage.path>/<run name>/``)::

    ledger.json
    plan.json
    checkpoints/<stage>/step-000050/   a checkpoint, COMMITTED last (layout: specs/checkpoint.py)
    eval/<stage>/step-000050/          results.json, heatmap PNG, tables
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from specs.atomic import atomic_write, fsync_dir
from specs.errors import SpecError
from specs.files import read_bounded
from specs.names import check_name, check_relative, error_location
from specs.names import contained as _contained

COMMITTED = "COMMITTED"
LEDGER_FILE = "ledger.json"


class LedgerError(ValueError):
    """The ledger file cannot be trusted (unreadable, not a ledger, or a path in it leaves the
    run directory). Never repaired silently: the message says what to do."""


class Fenced(RuntimeError):
    """A newer driver attempt owns the run; this writer's epoch is over. Stop, write nothing."""

    def __init__(self, mine: int, current: int, holder: str = ""):
        super().__init__(f"driver attempt {mine} was superseded by attempt {current}"
                         + (f" ({holder})" if holder else "")
                         + "; the newer driver owns the run and this one stops without writing")
        self.mine, self.current, self.holder = mine, current, holder

    def __reduce__(self):  # crosses process boundaries (broadcast to every rank, Ray errors)
        return Fenced, (self.mine, self.current, self.holder)


def _relative_inside(value: str | None) -> str | None:
    """A stored path: relative, simple names only, no `.`/`..` (checked when the ledger is read;
    `Ledger.resolve` then follows symlinks)."""
    return None if value is None else check_relative(value, "path")


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointEntry(_Doc):
    step: int = Field(ge=0, description="Optimizer steps done in the stage when saved.")
    path: str = Field(description="Checkpoint directory, relative to the run directory.")
    committed_at: str = Field(description="UTC time the COMMITTED marker was written.")
    final: bool = Field(False, description="The stage's last checkpoint.")
    epoch: int = Field(0, ge=0, description="The driver attempt that committed it.")

    _inside = field_validator("path")(_relative_inside)


class EvalEntry(_Doc):
    status: Literal["running", "done", "failed"]
    attempts: int = Field(0, ge=0)
    scores: dict[str, float] = Field(default_factory=dict, description="Score per task, 0..1.")
    results: str | None = Field(None, description="results.json, relative to the run directory.")
    error: str | None = None

    _inside = field_validator("results")(_relative_inside)


class StartEntry(_Doc):
    epoch: int = Field(ge=0, description="The driver attempt whose workers started.")
    step: int = Field(ge=0, description="The step training (re)started from.")
    at: str = Field(description="UTC time of the start.")


MAX_FINDINGS = 100  # per stage: the newest are kept (a flapping link must not grow the ledger)
MAX_LINKS = 64
MAX_MESSAGE = 2048


class HealthFinding(_Doc):
    """What the driver's ring-health watch found (ray_jobs/train/health.py): a slow ring hop,
    or a rank that stopped. The operator turns each new one into a Kubernetes Event."""

    seq: int = Field(ge=1, description="Its number among the stage's findings, from 1.")
    kind: Literal["slow_hop", "hang"] = Field(description="slow_hop: one rank's incoming K/V "
                                              "hop is persistently slower than its ring's "
                                              "others; hang: a rank stopped making progress.")
    step: int = Field(ge=0, description="The stage's step it was found at.")
    at: str = Field(description="UTC time it was recorded.")
    rank: int | None = Field(None, ge=0, description="The rank slow to receive, or the one "
                             "that stopped (null: no single rank could be blamed).")
    node: str | None = Field(None, max_length=253, description="That rank's node.")
    gpu: str | None = Field(None, max_length=300, description="That rank's GPU vertex "
                            "(node/gpuN).")
    sender: int | None = Field(None, ge=0, description="slow_hop: the rank sending on the hop.")
    links: list[str] = Field(default_factory=list, max_length=MAX_LINKS,
                             description="slow_hop: directed links of the hop's route that no "
                             "healthy hop crosses ('A -> B'); empty without a cluster "
                             "description.")
    dump: str | None = Field(None, description="hang on NCCL: the flight recorder's dump "
                             "files (prefix, then the rank), relative to the run directory.")
    message: str = Field(max_length=MAX_MESSAGE, description="The finding in one line.")

    _inside = field_validator("dump")(_relative_inside)


class StageEntry(_Doc):
    state: Literal["pending", "running", "done", "failed"] = "pending"
    checkpoints: list[CheckpointEntry] = Field(default_factory=list)
    eval: dict[str, EvalEntry] = Field(default_factory=dict,
                                       description="Keyed by checkpoint path.")
    attempts: int = Field(0, ge=0, description="Times the stage was started.")
    starts: list[StartEntry] = Field(default_factory=list,
                                     description="Every start of its workers, restarts included.")
    findings: list[HealthFinding] = Field(default_factory=list, max_length=MAX_FINDINGS,
                                          description="Ring-health findings, oldest first (the "
                                          "newest MAX_FINDINGS).")

    @field_validator("eval")
    @classmethod
    def _eval_keys_inside(cls, value: dict[str, EvalEntry]) -> dict[str, EvalEntry]:
        for key in value:  # a checkpoint path: the evaluator opens it
            check_relative(key, f"eval key {key!r}")
        return value


class LedgerDoc(_Doc):
    run: str
    stages: dict[str, StageEntry] = Field(default_factory=dict)
    updated_at: str = ""
    epoch: int = Field(0, ge=0, description="The driver attempt that owns the run.")
    holder: str = Field("", description="Who took the current epoch: host, pid, time.")

    @field_validator("stages")
    @classmethod
    def _stage_names_simple(cls, value: dict[str, StageEntry]) -> dict[str, StageEntry]:
        for key in value:  # each becomes checkpoints/<stage>/ and eval/<stage>/
            check_name(key, f"stage name {key!r}")
        return value

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
    """A run's ledger file; safe to use from several processes on one filesystem.

    `epoch` None: an unfenced reader or tool. An int: a writer of that driver attempt, whose
    every update (and every `fenced()` block) is refused with `Fenced` once the run's epoch has
    moved on."""

    def __init__(self, run_dir: str | Path, run_name: str | None = None,
                 epoch: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_FILE
        self.run_name = run_name or self.run_dir.name
        self.epoch = epoch
        self._held = threading.local()  # lock depth in this thread: fenced() may call update()

    def read(self) -> LedgerDoc:
        if not self.path.exists() and not self.path.is_symlink():
            return LedgerDoc(run=self.run_name)
        if self.path.is_symlink():  # the ledger is the run's own file, never a link elsewhere
            raise LedgerError(f"{self.path}: the run ledger is a symlink; ringpilot only reads "
                              "the run's own ledger file: replace the link with the file")
        if not self.path.is_file():  # a FIFO or device would block or never end
            raise LedgerError(f"{self.path}: not a regular file; the run ledger is a JSON file: "
                              "move this aside and restore the ledger from a backup")
        try:
            text = read_bounded(self.path, "ledger")
        except SpecError as e:
            raise LedgerError(f"{self.path}: cannot read the run ledger "
                              f"({'; '.join(e.lines)}); restore it from a backup or point "
                              "storage.path / name at another run") from None
        try:
            return LedgerDoc.model_validate_json(text)
        except ValidationError as e:
            first = e.errors()[0]
            where = error_location(first.get("loc", ()))
            what = ("it is not complete JSON (truncated or overwritten)"
                    if first.get("type", "").startswith("json") else
                    f"{where}: {first.get('msg', 'invalid')}")
            raise LedgerError(f"{self.path}: not a valid run ledger: {what}. ringpilot does not "
                              "reset a ledger (it lists the committed checkpoints): restore it "
                              "from a backup, or move the run directory aside to start over"
                              ) from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if getattr(self._held, "depth", 0):  # this thread holds the lock already
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _open_append(self.run_dir / ".ledger.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check_epoch(self, doc: LedgerDoc) -> None:
        if self.epoch is not None and doc.epoch != self.epoch:
            raise Fenced(self.epoch, doc.epoch, doc.holder)

    @contextlib.contextmanager
    def fenced(self) -> Iterator[LedgerDoc]:
        """Hold the lock while this writer's epoch is the run's: shared files written inside
        cannot be written by a superseded attempt. Raises `Fenced` otherwise."""
        with self._locked():
            doc = self.read()
            self._check_epoch(doc)
            yield doc

    def update(self, change: Callable[[LedgerDoc], None]) -> LedgerDoc:
        """Apply `change` to the current document and replace the file atomically."""
        with self.fenced() as doc:
            change(doc)
            doc.updated_at = _now()
            atomic_write(self.path, json.dumps(doc.model_dump(mode="json"), indent=2) + "\n")
            return doc

    def begin_attempt(self) -> Ledger:
        """Take the run for a new driver attempt: the next epoch, under the lock. Returns this
        ledger as that attempt's writer; every older attempt's writes are refused from now on."""
        holder = f"{socket.gethostname()} pid {os.getpid()} at {_now()}"
        with self._locked():
            doc = self.read()
            doc.epoch, doc.holder, doc.updated_at = doc.epoch + 1, holder, _now()
            atomic_write(self.path, json.dumps(doc.model_dump(mode="json"), indent=2) + "\n")
        return Ledger(self.run_dir, self.run_name, epoch=doc.epoch)

    def resolve(self, rel: str | Path, what: str = "a path in the ledger") -> Path:
        """`run_dir / rel`, refused with LedgerError unless it stays inside the run directory
        once symlinks are followed."""
        return contained(self.run_dir, rel, what)

    def append_line(self, path: Path, record: dict) -> None:
        """Append one JSON line to a shared file of the run, fenced (metrics, progress)."""
        with self.fenced():
            path.parent.mkdir(parents=True, exist_ok=True)
            with _open_append(path) as f:
                f.write(json.dumps(record) + "\n")

    def stage(self, doc: LedgerDoc, name: str) -> StageEntry:
        check_name(name, "stage name")  # never write a name the next read would refuse
        return doc.stages.setdefault(name, StageEntry())

    def start_stage(self, name: str) -> LedgerDoc:
        def change(doc: LedgerDoc) -> None:
            entry = self.stage(doc, name)
            entry.state, entry.attempts = "running", entry.attempts + 1
        return self.update(change)

    def commit_checkpoint(self, stage: str, step: int, checkpoint_dir: str | Path,
                          *, final: bool = False, staged: str | Path | None = None
                          ) -> CheckpointEntry:
        """Record a checkpoint whose COMMITTED marker exists; refuse one without it.

        `staged`: the directory it was written in, moved to `checkpoint_dir` under the lock
        (replacing a leftover there) only if this writer still owns the run."""
        checkpoint_dir = Path(checkpoint_dir)
        written = Path(staged) if staged is not None else checkpoint_dir
        if not is_committed(written):
            raise ValueError(f"checkpoint {written} has no {COMMITTED} marker; call "
                             "mark_committed() after all of its files are written")
        rel = check_relative(Path(os.path.relpath(checkpoint_dir, self.run_dir)).as_posix(),
                             "checkpoint path")
        entry = CheckpointEntry(step=step, path=rel, committed_at=_now(), final=final,
                                epoch=self.epoch or 0)

        def change(doc: LedgerDoc) -> None:
            if staged is not None:  # under the lock, after the epoch check
                if checkpoint_dir.exists():
                    shutil.rmtree(checkpoint_dir)
                os.replace(written, checkpoint_dir)
                fsync_dir(checkpoint_dir.parent)
            st = self.stage(doc, stage)
            st.checkpoints = [c for c in st.checkpoints if c.path != rel] + [entry]
            st.checkpoints.sort(key=lambda c: c.step)
        self.update(change)
        return entry

    def record_start(self, stage: str, step: int) -> LedgerDoc:
        """Workers of this attempt (re)started `stage` from `step`."""
        def change(doc: LedgerDoc) -> None:
            self.stage(doc, stage).starts.append(
                StartEntry(epoch=self.epoch or 0, step=step, at=_now()))
        return self.update(change)

    def record_finding(self, stage: str, finding: dict) -> HealthFinding:
        """Append a ring-health finding (HealthFinding's fields less `seq` and `at`) to the
        stage, numbered after the last; the oldest beyond MAX_FINDINGS are dropped."""
        recorded: list[HealthFinding] = []

        def change(doc: LedgerDoc) -> None:
            entry = self.stage(doc, stage)
            seq = entry.findings[-1].seq + 1 if entry.findings else 1
            recorded.append(HealthFinding(seq=seq, at=_now(), **finding))
            entry.findings = (entry.findings + recorded)[-MAX_FINDINGS:]
        self.update(change)
        return recorded[0]

    def finish_stage(self, name: str, state: Literal["done", "failed"] = "done") -> LedgerDoc:
        def change(doc: LedgerDoc) -> None:
            self.stage(doc, name).state = state
        return self.update(change)

    def record_eval(self, stage: str, checkpoint: str, result: EvalEntry) -> LedgerDoc:
        check_relative(checkpoint, "eval checkpoint path")  # the next read would refuse it

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
            path = self.resolve(ckpt.path, f"stages.{stage}.checkpoints path")
            if is_committed(path):
                return path
        return None


def _open_append(path: Path):
    """`path` opened for appending text, never through a symlink (a link planted in the run
    would make every append write outside it); LedgerError if it is one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:
        if os.path.islink(path):
            raise LedgerError(f"{path}: is a symlink; a run's shared files are its own: remove "
                              "the link") from None
        raise
    return open(fd, "a", encoding="utf-8")


def contained(root: str | Path, rel: str | Path, what: str) -> Path:
    """`root / rel`; LedgerError unless, symlinks followed, it stays inside `root`
    (specs/names.py's check, with the ledger's error)."""
    return _contained(root, rel, what, error=LedgerError)
