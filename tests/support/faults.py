"""Faults injected into real runs: a training worker that dies once, mid-stage."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ray_jobs.worker_config import StepInfo


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
