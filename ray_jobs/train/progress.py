"""Progress on the driver's output: per-stage lines while training, a summary table at the end.

Rank 0 appends a JSON line to ``<run dir>/progress/<stage>.jsonl`` at every report; a driver
thread tails those files, so `ray job logs -f` shows one clean line per report.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

from rich.console import Console

from ray_jobs.train.sheet import Sheet
from specs.checkpoint import read_state
from specs.ledger import Ledger
from specs.plan import Plan
from specs.run import RunSpec, describe_attention, describe_rope


def _eta(seconds: float) -> str:
    return str(dt.timedelta(seconds=int(max(seconds, 0))))


def render_progress_line(rec: dict) -> str:
    if "health" in rec:  # a ring-health finding (ray_jobs/train/watch.py): its own line
        return f"[{rec['stage']}] step {rec['step']}: {rec['message']}"
    ckpt = "  checkpoint" if rec.get("checkpoint") else ""
    return (f"[{rec['stage']}] step {rec['step']:>5}/{rec['steps']}  loss {rec['loss']:.4f}  "
            f"{rec['tokens_per_s']:>9,.0f} tok/s  ETA {_eta(rec['eta_s'])}{ckpt}")


class ProgressPrinter:
    """Tails the progress files of a run directory in a thread and prints new records."""

    def __init__(self, run_dir: Path, console: Console | None = None, interval: float = 0.5):
        self.dir = Path(run_dir) / "progress"
        self.console = console or Console(highlight=False)
        self.interval = interval
        self._offsets: dict[Path, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ringpilot-progress", daemon=True)

    def start(self) -> ProgressPrinter:
        # Lines from earlier drivers were printed by them; start at the end of each file.
        for f in self.dir.glob("*.jsonl"):
            self._offsets[f] = f.stat().st_size
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        for f in sorted(self.dir.glob("*.jsonl")):
            with open(f, encoding="utf-8") as fh:
                fh.seek(self._offsets.get(f, 0))
                data = fh.read()
            complete = data[: data.rfind("\n") + 1]
            self._offsets[f] = self._offsets.get(f, 0) + len(complete.encode())
            for line in complete.splitlines():
                if line.strip():
                    self.console.print(render_progress_line(json.loads(line)), markup=False)


SUMMARY_COLUMNS = ("stage", "state", "seq_len", "rope", "steps", "tokens", "train time",
                   "this driver", "final loss", "checkpoints", "eval")
RULER_COLUMNS = ("stage", "checkpoint", "length", "RULER", "95% CI", "samples", "tasks",
                 "not run", "effective length")
STEP_TIME_COLUMNS = ("stage", "layout", "predicted s/step", "measured s/step",
                     "predicted / measured")


def render_summary(run: RunSpec, run_dir: Path, wall: dict[str, float],
                   console: Console | None = None, predicted: Plan | None = None,
                   base_rope: dict | None = None) -> Sheet:
    """A table per stage: state, steps, tokens, train time, final loss, committed checkpoints;
    with a plan that predicts step times (`predicted`: the cluster's, or a calibrated one), the
    predicted and measured seconds per step and their ratio. `base_rope`: the base model's RoPE
    rule (RunSpec.base_rope), for the rope of stages without a checkpoint yet."""
    ledger = Ledger(run_dir, run.name)
    doc = ledger.read()
    table = Sheet(f"run {run.name}  ({run_dir})", [
        (col, "left" if col in ("stage", "state", "checkpoints", "eval") else "right")
        for col in SUMMARY_COLUMNS])
    for i, stage in enumerate(run.stages):
        entry = doc.stages.get(stage.name)
        latest = ledger.latest_committed(stage.name)
        st = read_state(latest) if latest else None
        ckpts = ", ".join(Path(c.path).name for c in entry.checkpoints) if entry else ""
        evals = ""
        if entry and entry.eval:
            last = entry.eval[sorted(entry.eval)[-1]]
            evals = _eval_label(run_dir, last) or last.status
        table.add_row(
            stage.name, entry.state if entry else "pending", f"{stage.seq_len:,}",
            describe_rope(st.rope if st and st.rope else run.stage_rope(i, base_rope)),
            f"{st.step if st else 0}/{stage.steps}",
            f"{st.tokens if st else 0:,}", _eta(st.seconds) if st else "-",
            _eta(wall[stage.name]) if stage.name in wall else "-",
            f"{st.losses[-1]:.4f}" if st and st.losses else "-", ckpts or "-", evals or "-",
        )
    table.caption = (f"eval: the stage's last evaluated checkpoint, each task's mean score over "
                     f"the context lengths shown and {len(run.eval.depths)} needle depths "
                     "(niah_lite: first number exact; the others: share of the expected answers "
                     "found, as RULER's string_match_all)")
    states = {s.name: read_state(c) for s in run.stages
              if (c := ledger.latest_committed(s.name)) is not None}
    kernels = sorted({st.attention_kernel for st in states.values()} - {""})
    if kernels:
        table.caption += "\nattention kernel: " + "; ".join(kernels)
    masked = attention_words(run, states)
    if masked:
        table.caption += "\nattention over packed documents: " + masked
    # The terminal's width where the launcher passed it (COLUMNS), else rich's default.
    console = console or Console(highlight=False)
    console.print(table)
    ruler = ruler_table(run, doc, run_dir)
    if ruler is not None:
        console.print(ruler)
    if predicted is not None:
        console.print(step_time_table(run, ledger, predicted))
    health = health_table(run, doc)
    if health is not None:
        console.print(health)
    return table


def attention_words(run: RunSpec, states: dict) -> str:
    """Each stage's attention over packed documents as it trained (its checkpoint's state),
    else as the RunSpec sets it: 's64 causal; s256 document, positions per document'. Empty
    when every stage is causal (the default goes unsaid)."""
    choices = [(s.name, states[s.name].attention, states[s.name].position_ids)
               if s.name in states else (s.name, s.attention, s.position_ids)
               for s in run.stages]
    if all(attention == "causal" for _, attention, _ in choices):
        return ""
    return "; ".join(f"{name} {describe_attention(attention, positions)}"
                     for name, attention, positions in choices)


def health_table(run: RunSpec, doc) -> Sheet | None:
    """Every stage's ring-health findings (slow hops, stopped ranks) from the ledger; None when
    there are none."""
    table = Sheet("ring health: what the driver's watch found",
                  [("stage", "left"), ("step", "right"), ("finding", "left")])
    for stage in run.stages:
        entry = doc.stages.get(stage.name)
        for finding in entry.findings if entry else []:
            table.add_row(stage.name, str(finding.step), finding.message)
    table.caption = ("slow hop: one rank's K/V wait against its ring's other hops; hang: a rank "
                     "the others waited for (docs/observability.md, Ring health)")
    return table if table.row_count else None


# Below this size a model trained here (the tiny default: 0.5M) has learned no language, so
# RULER's natural-language prompts score near 0 whatever its context length: the summary says
# what the numbers are for.
PLUMBING_ONLY_PARAMS = 100_000_000


def ruler_table(run: RunSpec, doc, run_dir: Path) -> Sheet | None:
    """RULER as published, per stage's evaluated checkpoints that ran it: per length, the mean
    over lm-eval's RULER tasks x 100 with its 95% interval and samples; None without eval.ruler."""
    from ray_jobs.eval.results import load_results

    if run.eval.ruler is None:
        return None
    table = Sheet("RULER (lm-eval's tasks, ringpilot backend): per length, mean over tasks x 100",
                  [(col, "right" if col in ("length", "RULER", "samples") else "left")
                   for col in RULER_COLUMNS])
    for stage in run.stages:
        entry = doc.stages.get(stage.name)
        for path, ev in sorted(entry.eval.items()) if entry else []:
            try:
                ruler = load_results(run_dir / ev.results).ruler if ev.results else None
            except (OSError, ValueError):
                ruler = None
            if not ruler:
                continue
            skipped = sorted(ruler.get("unavailable", {})) + (["(error)"] if ruler.get("error")
                                                              else [])
            for row in ruler["rows"] or [{}]:
                table.add_row(stage.name, Path(path).name,
                              f"{row['length']:,}" if row else "-",
                              f"{row['score']:.1f}" if row else "-",
                              f"+/- {row['ci95']:.1f}" if row else "-",
                              str(row.get("samples", "-")), ", ".join(row.get("tasks", {})),
                              ", ".join(skipped) or "-", ruler.get("label", "-"))
    table.caption = ("each checkpoint's tables.md has the per-task scores and the reasons; "
                     "lm-eval's own results are beside it (ruler/lm_eval_results.json)")
    if run.model.num_parameters < PLUMBING_ONLY_PARAMS:
        table.caption = (f"a {run.model.num_parameters / 1e6:.1f}M-parameter model has never "
                         "read RULER's instructions: its scores test the pipeline, not the "
                         "model; " + table.caption)
    return table if table.row_count else None


def step_time_table(run: RunSpec, ledger: Ledger, predicted: Plan) -> Sheet:
    """Per stage: the plan's predicted seconds per step (on a calibrated profile, when it is
    one) beside the measured ones and their ratio."""
    calibrated = any(a.startswith("calibrated profile") for a in predicted.assumptions)
    table = Sheet("step time: predicted" + (" on the calibrated profile" if calibrated else "")
                  + " against measured",
                  [(col, "left" if col in ("stage", "layout") else "right")
                   for col in STEP_TIME_COLUMNS])
    planned = {s.name: s for s in predicted.stages}
    for stage in run.stages:
        latest = ledger.latest_committed(stage.name)
        table.add_row(stage.name, *_step_times(planned.get(stage.name),
                                               read_state(latest) if latest else None))
    table.caption = ("measured: the stage's training seconds over its steps, newest committed "
                     "checkpoint; `ringpilot plan --compare RUN_DIR` splits both by phase")
    return table


def _step_times(planned, st) -> tuple[str, str, str, str]:
    """(planned layout, predicted s/step, measured s/step, predicted over measured); '-' where
    one is missing, '(other layout)' when the run's degrees were not the plan's."""
    if planned is None:
        return "-", "-", "-", "-"
    layout = planned.dims.label()
    pred = planned.prediction.step_seconds if planned.prediction else None
    meas = st.seconds / st.step if st is not None and st.step else None
    ratio = f"{pred / meas:.2f}x" if pred and meas else "-"
    if pred and meas and st.dims != planned.dims:
        ratio += " (other layout)"
    return layout, f"{pred:.4f}" if pred else "-", f"{meas:.4f}" if meas else "-", ratio


def _eval_label(run_dir: Path, entry) -> str:
    """`task score @lengths` per task, the lengths those scores average over (from the
    evaluation's results.json; the scores alone when it is gone)."""
    from ray_jobs.eval.results import load_results

    lengths: dict[str, list[int]] = {}
    try:
        if entry.results:
            for cell in load_results(run_dir / entry.results).cells:
                lengths.setdefault(cell.task, []).append(cell.length)
    except (OSError, ValueError):
        pass
    parts = []
    for task, value in entry.scores.items():
        seen = sorted(set(lengths.get(task, [])))
        at = (f" @{seen[0]:,}" + (f"-{seen[-1]:,}" if len(seen) > 1 else "") + " tok"
              if seen else "")
        parts.append(f"{task} {value:.2f}{at}")
    return "; ".join(parts)
