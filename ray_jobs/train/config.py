"""The one message from the driver to every training worker of a stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specs.plan import StagePlan
from specs.run import RunSpec, StageSpec


@dataclass(frozen=True)
class StepInfo:
    """Where a worker stands just before it takes an optimizer step."""

    stage: str
    step: int  # optimizer steps already done in the stage
    rank: int
    world: int
    run_dir: Path


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to train one stage, validated once on the driver.

    `epoch` is the driver attempt's (specs.ledger fencing): the workers write to the run only
    while it owns the run. `before_step` and `before_commit` are for tests only (fault
    injection): they are set through the Python API (`ray_jobs.train.driver.main(...)`), never
    from a RunSpec or the command line.
    """

    run: RunSpec
    stage_index: int
    run_dir: Path
    spec_dir: Path  # the RunSpec file's directory: relative paths in it start here
    plan: StagePlan | None  # the driver's plan of the stage; None: plan where Ray put workers
    workers: int  # ring x dp of the stage: how many workers it starts (<= resources.workers)
    epoch: int | None = None  # None: unfenced (a test or benchmark calling the loop directly)
    before_step: Callable[[StepInfo], None] | None = None
    before_commit: Callable[[Path], None] | None = None  # rank 0, files written, no marker yet

    @property
    def stage(self) -> StageSpec:
        return self.run.stages[self.stage_index]
