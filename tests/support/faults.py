"""Faults injected into real runs: a worker that dies mid-stage or mid-checkpoint, a straggler
of a superseded driver, a filesystem that fills up, a rank whose ring sends come late or that
stops inside a step."""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ray_jobs.train.config import StepInfo


def crash_marker(run_dir: Path, stage: str, step: int) -> Path:
    """Written just before the worker dies: proof that it did, and when (its mtime)."""
    return Path(run_dir) / f".crash-injected-{stage}-{step}"


@dataclass(frozen=True)
class CrashOnce:
    """A `before_step` hook: the last worker exits (as a killed process would) at `stage`'s
    `step`, once per run directory, so the restarted group trains on."""

    stage: str
    step: int

    def __call__(self, info: StepInfo) -> None:
        if (info.stage, info.step) != (self.stage, self.step) or info.rank != info.world - 1:
            return
        marker = crash_marker(info.run_dir, info.stage, info.step)
        if marker.exists():
            return
        marker.touch()
        print(f"[test] worker {info.rank} exits at {info.stage} step {info.step}", flush=True)
        os._exit(1)


def process_started_at() -> float:
    """This process's start as a Unix time, from the kernel's record (/proc/self/stat: clock
    ticks since boot), to the tick (10 ms): when Ray spawned the worker, not when it first ran
    Python code."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    since = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - since


def worker_starts(run_dir: Path, stage: str) -> list[dict]:
    """What `CrashOnceTimed` recorded: per worker process of `stage`, its rank, when it was
    spawned (`spawned`) and when it first reached a step (`first_step`), oldest first."""
    folder = Path(run_dir) / f".worker-starts-{stage}"
    starts = [json.loads(f.read_text()) for f in folder.glob("*.json")] if folder.is_dir() else []
    return sorted(starts, key=lambda s: s["spawned"])


@dataclass(frozen=True)
class CrashOnceTimed(CrashOnce):
    """`CrashOnce`, and each worker process records when it was spawned and when it first
    reached a step: a restart's seconds split into Ray spawning new workers and the workers'
    own start-up (imports, process group, model, checkpoint load) up to their first step."""

    def __call__(self, info: StepInfo) -> None:
        record = Path(info.run_dir) / f".worker-starts-{info.stage}" / f"{os.getpid()}.json"
        if not record.exists():
            record.parent.mkdir(exist_ok=True)
            record.write_text(json.dumps({"rank": info.rank, "step": info.step,
                                          "spawned": process_started_at(),
                                          "first_step": time.time()}))
        super().__call__(info)


@dataclass(frozen=True)
class StaleWriteOnce:
    """A `before_step` hook: rank 0 writes a metrics line as driver attempt `epoch` would (a
    straggler of a superseded driver), once, at `stage`'s `step`, and records in
    `<run>/.stale-write-<epoch>` whether the write was refused."""

    stage: str
    step: int
    epoch: int

    def __call__(self, info: StepInfo) -> None:
        from specs.ledger import Fenced, Ledger

        outcome = Path(info.run_dir) / f".stale-write-{self.epoch}"
        if (info.stage, info.step) != (self.stage, self.step) or info.rank or outcome.exists():
            return
        stale = Ledger(info.run_dir, epoch=self.epoch)
        try:
            stale.append_line(Path(info.run_dir) / "metrics" / f"{info.stage}.jsonl",
                              {"step": info.step + 1, "stale": True, "epoch": self.epoch})
            outcome.write_text("written")
        except Fenced as e:
            outcome.write_text(f"refused: {e}")


@dataclass(frozen=True)
class DieBeforeCommit:
    """A `before_commit` hook: rank 0 exits (as a killed process would) once, after writing every
    file of `stage`'s checkpoint at `step` and before its COMMITTED marker."""

    stage: str
    step: int

    def __call__(self, staged: Path) -> None:
        if staged.parent.name != self.stage or not staged.name.startswith(
                f".step-{self.step:06d}."):
            return
        marker = Path(staged).parents[2] / f".commit-interrupted-{self.stage}-{self.step}"
        if marker.exists():
            return
        marker.touch()
        print(f"[test] rank 0 exits with {staged.name} written, not committed", flush=True)
        os._exit(1)


@dataclass(frozen=True)
class FillDiskOnce:
    """A `before_step` hook: rank 0 fills the filesystem of the run directory (one preallocated
    file, `filler`) at `stage`'s `step`, once, so the next write fails with ENOSPC."""

    stage: str
    step: int
    filler: str

    def __call__(self, info: StepInfo) -> None:
        if (info.stage, info.step) != (self.stage, self.step) or info.rank:
            return
        filler = Path(self.filler)
        if filler.exists():
            return
        with open(filler, "wb", buffering=0) as f:
            for chunk in (1 << 20, 4096, 1):  # until even a byte does not fit
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
        print(f"[test] filled {filler.parent} at {info.stage} step {info.step}", flush=True)


@dataclass(frozen=True)
class TakeOverOnce:
    """A `before_step` hook: at `stage`'s `step` rank 0 takes the run for a new driver attempt
    (as a second driver started on the same run would), once, leaving this attempt superseded."""

    stage: str
    step: int

    def __call__(self, info: StepInfo) -> None:
        from specs.ledger import Ledger

        marker = Path(info.run_dir) / f".taken-over-{self.stage}-{self.step}"
        if (info.stage, info.step) != (self.stage, self.step) or info.rank or marker.exists():
            return
        marker.touch()
        Ledger(info.run_dir).begin_attempt()


@dataclass(frozen=True)
class Each:
    """A `before_step` hook that runs several, in order."""

    hooks: tuple

    def __call__(self, info: StepInfo) -> None:
        for hook in self.hooks:
            hook(info)


def _late(seconds: float):
    def hook(ring, tag: int) -> None:
        time.sleep(seconds)
    return hook


def _stop_forever(ring, tag: int) -> None:
    """Never posts the exchange: the rank stays alive, inside its step, until it is killed."""
    while True:
        time.sleep(3600)


@dataclass(frozen=True)
class DelaySends:
    """A `before_step` hook: in `stage`, rank `rank` posts every ring exchange `seconds` late,
    as a slow link out of it would deliver its K/V (ray_jobs.ring_attention.comm's test hook)."""

    stage: str
    rank: int
    seconds: float

    def __call__(self, info: StepInfo) -> None:
        from ray_jobs.ring_attention.comm import set_exchange_hook

        if (info.stage, info.rank) == (self.stage, self.rank):
            set_exchange_hook(_late(self.seconds))


@dataclass(frozen=True)
class StopInStepOnce:
    """A `before_step` hook: at `stage`'s `step`, rank `rank` stops at its next ring exchange
    and never goes on (alive, sleeping inside the step), once per run directory, so the group
    Ray Train restarts trains on."""

    stage: str
    step: int
    rank: int

    def __call__(self, info: StepInfo) -> None:
        from ray_jobs.ring_attention.comm import set_exchange_hook

        if (info.stage, info.step, info.rank) != (self.stage, self.step, self.rank):
            return
        marker = Path(info.run_dir) / f".stopped-{self.stage}-{self.step}"
        if marker.exists():
            return
        marker.write_text(str(os.getpid()))
        print(f"[test] rank {info.rank} stops inside {info.stage} step {info.step + 1}",
              flush=True)
        set_exchange_hook(_stop_forever)
