"""Step times a run measured, read back from its run directory, to set beside the planner's.

The trainer records each stage's training seconds (optimizer steps only: no checkpointing, no
reporting), their split by phase (ray_jobs.train.loop.StepClock) and steps in its checkpoints'
trainer state (specs.checkpoint.TrainerState); the newest committed checkpoint of a stage holds
the most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from specs.checkpoint import is_trainer_checkpoint, read_state
from specs.ledger import Ledger
from specs.plan import Plan


@dataclass(frozen=True)
class Measured:
    stage: str
    steps: int
    seconds: float
    layout: str  # "ring x dp" (and Ulysses) it ran with
    parts: dict[str, float] = field(default_factory=dict)  # seconds by phase, whole stage

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps


def measured_steps(run_dir: str | Path) -> dict[str, Measured]:
    """Stage -> what its newest committed checkpoint says was measured (stages without one are
    left out). Raises FileNotFoundError when `run_dir` holds no ledger."""
    ledger = Ledger(run_dir)
    if not ledger.path.is_file():
        raise FileNotFoundError(f"{run_dir} has no ledger.json; give the run directory "
                                "(<storage.path>/<run name>) of a run that trained")
    out = {}
    for stage in ledger.read().stages:
        latest = ledger.latest_committed(stage)
        if latest is None or not is_trainer_checkpoint(latest):
            continue
        st = read_state(latest)
        bad = [f"{k} = {v}" for k, v in [("seconds", st.seconds),
                                          *(("parts_seconds." + p, v)
                                            for p, v in st.parts_seconds.items())]
               if not (math.isfinite(v) and v >= 0)]
        if bad:  # a tampered or corrupt trainer state: refuse, never print inf/nan ratios
            raise ValueError(f"{latest}: the trainer state of stage {stage!r} has {bad[0]}, not "
                             "a finite number of seconds >= 0; its state file is corrupt: "
                             "compare another run, or none")
        if st.step > 0 and st.seconds > 0:
            out[stage] = Measured(stage=stage, steps=st.step, seconds=st.seconds,
                                  parts=dict(st.parts_seconds), layout=st.dims.label())
    return out


# How the trainer's phases meet the cost model's parts: the optimizer and the step's reporting
# all-reduce are priced alone; everything else the model prices happens in forward + backward.
PHASES = {"optimizer": ("optimizer",), "other": ("loss all-reduce", "data")}


def phases_ms(parts: dict[str, float], steps: int) -> str:
    """'forward + backward 52.7, optimizer 21.9, other 0.1' (ms per step) of predicted parts
    (steps 1) or measured phases (their stage totals over `steps`)."""
    if not parts:
        return "not recorded"
    grouped = {"forward + backward": 0.0, "optimizer": 0.0, "other": 0.0}
    for name, seconds in parts.items():
        phase = next((p for p, names in PHASES.items() if name in names), "forward + backward")
        grouped[phase] += seconds / steps
    return ", ".join(f"{k} {v * 1e3:.1f}" for k, v in grouped.items())


def compare_rows(plan: Plan, measured: dict[str, Measured]) -> list[list[str]]:
    """The report's table: predicted against measured step time per stage, with the ratio and
    both split by phase (ms per step)."""
    rows = [["stage", "planned layout", "predicted s/step", "measured s/step (steps)",
             "measured layout", "predicted / measured", "predicted ms: by phase",
             "measured ms: by phase"]]
    for s in plan.stages:
        m = measured.get(s.name)
        planned = s.dims.label()
        if m is None:
            rows.append([s.name, planned, f"{s.prediction.step_seconds:.4f}", "not run", "", "",
                         phases_ms(s.prediction.parts_seconds, 1), ""])
            continue
        rows.append([s.name, planned, f"{s.prediction.step_seconds:.4f}",
                     f"{m.step_seconds:.4f} ({m.steps})", m.layout,
                     f"{s.prediction.step_seconds / m.step_seconds:.2f}x"
                     + ("" if m.layout == planned else " (other layout)"),
                     phases_ms(s.prediction.parts_seconds, 1), phases_ms(m.parts, m.steps)])
    return rows
