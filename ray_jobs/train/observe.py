"""The driver's metric feed: tails the workers' per-step records and the ledger's evaluations and
hands them to the sinks the RunSpec's `observability:` block asks for (ray_jobs.train.sinks).

It runs on a driver thread, so no optimizer step ever waits for a sink. The run's step axis is one
for the whole curriculum: a stage's step n is the earlier stages' steps plus n. A restarted stage
replays steps from its checkpoint; only steps beyond the last one emitted are sent (the cursor is
kept in RUN_DIR/observability/state.json, so a rerun driver continues the same curves rather than
repeating them). A sink that raises is reported once and dropped; the ledger stays the run's
source of truth.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from specs.atomic import atomic_write
from specs.checkpoint import locate
from specs.ledger import Ledger
from specs.plan import Plan
from specs.run import RunSpec

log = logging.getLogger("ringpilot.observe")
STATE_FILE = Path("observability") / "state.json"
PHASE_KEYS = {"data": "data", "forward + backward": "forward_backward",
              "optimizer": "optimizer", "loss all-reduce": "loss_all_reduce"}
# The evaluation's RULER effective length (ray_jobs/eval/lm_eval/effective_length.py), which it
# files among the scores: a length in tokens, not a 0..1 score.
EFFECTIVE_LENGTH = "ruler_effective_length"


def flatten(value, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> strings (MLflow params; W&B config): lists stay one JSON value."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value if isinstance(value, str) else json.dumps(value)}


def step_metrics(rec: dict, predicted_s: float | None) -> dict[str, float]:
    """A worker's per-step record (ray_jobs.train.loop) as metric name -> value."""
    out = {"train/loss": rec["loss"]}
    for key in ("lr", "grad_norm", "step_s"):
        if rec.get(key) is not None:
            out[f"train/{key}"] = rec[key]
    if rec.get("step_s") and rec.get("tokens"):
        out["train/tokens_per_s"] = rec["tokens"] / rec["step_s"]
    for phase, seconds in (rec.get("phases") or {}).items():
        out[f"phase/{PHASE_KEYS.get(phase, phase.replace(' ', '_'))}"] = seconds
    for key in ("memory_peak_bytes", "kv_wait_s"):
        per_rank = rec.get(key)
        if isinstance(per_rank, list) and per_rank:
            out[f"train/{key}"] = max(per_rank)  # the worst rank
            out.update({f"rank{i}/{key}": v for i, v in enumerate(per_rank)})
    if predicted_s:
        out["train/predicted_step_s"] = predicted_s
        if rec.get("step_s"):
            out["train/step_time_ratio"] = rec["step_s"] / predicted_s
    return out


def eval_metrics(entry, run_dir: Path) -> dict[str, float]:
    """A checkpoint's evaluation: each task's score, the NIAH grid (per length, and per length
    and depth), RULER per length and its effective length (when the evaluation found one)."""
    from ray_jobs.eval.results import load_results

    out = {f"eval/{task}": score for task, score in entry.scores.items()
           if task != EFFECTIVE_LENGTH}
    if entry.scores.get(EFFECTIVE_LENGTH) is not None:
        out["eval/effective_length"] = entry.scores[EFFECTIVE_LENGTH]
    try:
        results = load_results(run_dir / entry.results) if entry.results else None
    except (OSError, ValueError):
        results = None
    if results is None:
        return out
    by_length: dict[tuple[str, int], list[float]] = {}
    for cell in results.cells:
        by_length.setdefault((cell.task, cell.length), []).append(cell.score)
        if cell.depth is not None:
            out[f"eval/{cell.task}/len{cell.length}/depth{cell.depth:g}"] = cell.score
    for (task, length), scores in by_length.items():
        out[f"eval/{task}/len{length}"] = sum(scores) / len(scores)
    rows = sorted((results.ruler or {}).get("rows") or [], key=lambda r: r["length"])
    for row in rows:
        out[f"eval/ruler/len{row['length']}"] = row["score"]
    return out


def lower_this_thread_priority() -> bool:
    """Run the calling thread at the lowest CPU priority (nice 19), so the sinks' work (and
    W&B's service process, started from this thread) never takes a core from a worker that
    shares the machine: on Linux a thread's nice value is its own (setpriority(2) on its thread
    id); elsewhere, or where it is refused, nothing changes. True when lowered."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        return False
    return True


class Observer:
    """Feeds the sinks from the run directory, on a thread: `start()`, `finish_stage(name,
    state)` after each stage, `stop(state)` at the end (after evaluation has finished)."""

    def __init__(self, run: RunSpec, run_dir: Path, predicted: Plan | None = None,
                 interval: float = 2.0, warn: Callable[[str], None] | None = None):
        self.run, self.run_dir, self.predicted = run, Path(run_dir), predicted
        self.interval = interval
        self._warn = warn or log.warning
        self.offsets = {s.name: sum(x.steps for x in run.stages[:i])
                        for i, s in enumerate(run.stages)}
        self.state_path = self.run_dir / STATE_FILE
        try:
            self.state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            self.state = {}
        self.state.setdefault("emitted", {})
        self.state.setdefault("evals", [])
        self.state.setdefault("started", [])
        self.sinks: list = []
        self._built = False
        self._feed_warned = False
        self._state_warned = False
        self._read: dict[str, int] = {}  # bytes of each metrics file read by this driver
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ringpilot-observe", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Observer:
        self._thread.start()
        return self

    def finish_stage(self, stage: str, state: str) -> None:
        with self._lock:
            self._guarded_poll()
            self._each("end_stage", stage, state, [self.run_dir / "plan.json"])
            self._save()

    def stop(self, state: str, timeout: float = 60) -> None:
        """Last records and evaluations, the reports as artifacts, then close every sink;
        a sink still busy after `timeout` seconds is left behind (the thread is a daemon)."""
        self._stop.set()
        self._thread.join(timeout=timeout)
        if not self._lock.acquire(timeout=timeout):
            self._warn("observability: a sink is still busy; its last records are not sent")
            return
        try:
            self._guarded_poll()
            for stage in self.run.stages:
                reports = self.run_dir / "eval" / stage.name
                if stage.name in self.state["started"] and reports.is_dir():
                    self._each("end_stage", stage.name, "reports", [reports])
            self._each("close", state)
            self._save()
        finally:
            self._lock.release()

    def _loop(self) -> None:
        lower_this_thread_priority()
        while True:
            with self._lock:
                self._guarded_poll()
            if self._stop.wait(self.interval):
                return

    def _guarded_poll(self) -> None:
        """A poll whose own failure (a record or file it cannot read) is reported once: the
        feed must never take the driver down, and the next poll tries again."""
        try:
            self._poll()
        except Exception as e:  # noqa: BLE001 - never let the feed reach training
            if not self._feed_warned:
                self._feed_warned = True
                self._warn(f"observability: reading the run directory failed "
                           f"({e.__class__.__name__}: {e}); the sinks may miss records")

    # -- sinks -----------------------------------------------------------------------------
    def _build(self) -> None:
        """Made on the thread: a tracking server that does not answer costs it, not training."""
        from ray_jobs.train import sinks

        self._built = True
        obs = self.run.observability
        sinks.quiet_library_loggers()
        params = flatten(self.run.model_dump(mode="json"))
        makers = []
        if obs.tensorboard:
            makers.append(("tensorboard", lambda: sinks.TensorBoardSink(self.run_dir)))
        if obs.mlflow is not None:
            makers.append(("mlflow", lambda: sinks.MlflowSink(obs.mlflow, self.run_dir,
                                                              self.run, params, self.state)))
        if obs.wandb is not None:
            makers.append(("wandb", lambda: sinks.WandbSink(obs.wandb, self.run_dir, self.run,
                                                            params, self.state)))
        if obs.prometheus:
            makers.append(("prometheus", lambda: sinks.PrometheusSink(self.run)))
        for name, make in makers:
            try:
                self.sinks.append(make())
            except Exception as e:  # a library missing, a server down: report and go on
                self._drop(name, e)

    def _drop(self, name: str, error: BaseException) -> None:
        self.sinks = [s for s in self.sinks if s.name != name]
        first = (str(error).splitlines() or [""])[0][:300]
        self._warn(f"observability: the {name} sink failed and is off for the rest of this "
                   f"run ({error.__class__.__name__}: {first}); training goes on and the run "
                   "directory keeps every metric")

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            call = getattr(sink, method, None)  # e.g. only Prometheus has set_stage_health
            if call is None:
                continue
            try:
                call(*args)
            except Exception as e:  # noqa: BLE001 - any sink failure must not reach training
                self._drop(sink.name, e)

    # -- reading the run directory ---------------------------------------------------------
    def _poll(self) -> None:
        if not self._built:
            self._build()
        for stage in self.run.stages:
            self._read_steps(stage.name)
        self._read_evals()
        self._each("flush")
        self._save()

    def _stage_params(self, name: str) -> dict[str, str]:
        index = next(i for i, s in enumerate(self.run.stages) if s.name == name)
        stage = self.run.stages[index]
        params = {"seq_len": str(stage.seq_len), "rope_theta": str(self.run.stage_theta(index)),
                  "attention": stage.attention, "position_ids": stage.position_ids}
        try:
            plan = Plan.model_validate_json((self.run_dir / "plan.json").read_text())
            sp = plan.stage(name)
        except (OSError, ValueError, KeyError):
            sp = None
        if sp is not None:
            params["layout"] = sp.dims.label()
            params["rings"] = json.dumps([[f"{w.node}:{w.gpu}" for w in r] for r in sp.rings])
            params["activation_checkpointing"] = sp.activation_checkpointing
            if sp.prediction is not None:
                params["predicted_step_s"] = f"{sp.prediction.step_seconds:.6g}"
        return params

    def _predicted(self, name: str) -> float | None:
        try:
            sp = self.predicted.stage(name) if self.predicted is not None else None
        except KeyError:
            sp = None
        return sp.prediction.step_seconds if sp is not None and sp.prediction else None

    def _read_steps(self, name: str) -> None:
        path = self.run_dir / "metrics" / f"{name}.jsonl"
        if not path.is_file():
            return
        with open(path, encoding="utf-8") as fh:
            fh.seek(self._read.get(name, 0))
            data = fh.read()
        complete = data[: data.rfind("\n") + 1]
        self._read[name] = self._read.get(name, 0) + len(complete.encode())
        emitted = self.state["emitted"]
        predicted = self._predicted(name)
        for line in complete.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" not in rec or rec["step"] <= emitted.get(name, 0):
                continue  # a straggler's line, or a step a restart replayed: sent already
            if name not in self.state["started"]:
                self.state["started"].append(name)
                self._each("start_stage", name, self.offsets[name], self._stage_params(name))
            self._each("log_step", name, self.offsets[name] + rec["step"],
                       step_metrics(rec, predicted), rec["time"])
            emitted[name] = rec["step"]

    def _read_evals(self) -> None:
        try:
            doc = Ledger(self.run_dir, self.run.name).read()
        except (OSError, ValueError):
            return
        for stage in self.run.stages:
            entry = doc.stages.get(stage.name)
            if entry is None:
                continue
            failures = 0
            for path, ev in sorted(entry.eval.items()):
                failures += ev.status == "failed"
                if ev.status != "done" or path in self.state["evals"]:
                    continue
                place = locate(self.run_dir / path)
                step = place.step if place is not None else 0
                if stage.name not in self.state["started"]:
                    self.state["started"].append(stage.name)
                    self._each("start_stage", stage.name, self.offsets[stage.name],
                               self._stage_params(stage.name))
                self._each("log_eval", stage.name, self.offsets[stage.name] + step,
                           eval_metrics(ev, self.run_dir), time.time())
                self.state["evals"].append(path)
            self._each("set_stage_health", stage.name, max(len(entry.starts) - 1, 0), failures,
                       entry.state == "failed")

    def _save(self) -> None:
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.state_path, json.dumps(self.state, indent=1))
        except OSError as e:
            if not self._state_warned:
                self._state_warned = True
                self._warn(f"observability: cannot save {self.state_path}: {e}; a rerun may "
                           "send some steps again")
