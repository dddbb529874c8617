"""Metric sinks the driver writes to (TensorBoard, MLflow, W&B, Prometheus through Ray's metrics).

Each sink takes the same calls from ray_jobs.train.observe.Observer: `log_step` (a stage's step on
the run's one step axis: the steps of earlier stages plus this stage's), `log_eval` (a
checkpoint's scores), `end_stage`, `close`. The Observer catches what a sink raises, warns once and
drops it; a sink only has to keep its library off the console and its waits bounded.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from specs.run import MlflowSinkSpec, RunSpec, WandbSinkSpec

# Prometheus series (each exported by Ray as ray_<name>): name -> (kind, tag keys, description).
# The Grafana dashboard and the alert rules in manifests/monitoring/ may name only these
# (tests/manifests/test_monitoring.py).
RUN_TAGS = ("run", "stage", "rank")
PROMETHEUS_METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "ringpilot_train_loss": ("gauge", RUN_TAGS, "Training loss of the last step (mean over "
                             "data-parallel replicas)."),
    "ringpilot_train_learning_rate": ("gauge", RUN_TAGS, "Learning rate of the last step."),
    "ringpilot_train_grad_norm": ("gauge", RUN_TAGS, "Global gradient norm before clipping."),
    "ringpilot_train_tokens_per_second": ("gauge", RUN_TAGS, "Tokens trained per second."),
    "ringpilot_train_step_seconds": ("gauge", RUN_TAGS, "Seconds of the last optimizer step."),
    "ringpilot_train_phase_seconds": ("gauge", RUN_TAGS + ("phase",),
                                      "Seconds of the last step spent in each phase."),
    "ringpilot_train_predicted_step_seconds": ("gauge", RUN_TAGS,
                                               "The plan's predicted seconds per step."),
    "ringpilot_train_step_time_ratio": ("gauge", RUN_TAGS,
                                        "Measured over predicted seconds per step."),
    "ringpilot_train_step": ("gauge", RUN_TAGS, "Optimizer steps done on the run's step axis."),
    "ringpilot_train_last_step_timestamp_seconds": ("gauge", RUN_TAGS,
                                                    "Unix time of the last step seen."),
    "ringpilot_train_memory_peak_bytes": ("gauge", RUN_TAGS, "Peak memory of a rank (GPU "
                                          "allocations, or the process's resident set on CPU)."),
    "ringpilot_train_kv_wait_seconds": ("gauge", RUN_TAGS, "Seconds a rank waited for ring "
                                        "attention's K/V hops in the last step."),
    "ringpilot_train_restarts": ("gauge", RUN_TAGS, "Worker-group restarts of the stage "
                                 "(starts in the ledger beyond the first)."),
    "ringpilot_stage_failed": ("gauge", RUN_TAGS, "1 once the stage failed for good."),
    "ringpilot_run_active": ("gauge", RUN_TAGS, "1 while a driver trains the run, 0 after."),
    "ringpilot_eval_score": ("gauge", RUN_TAGS + ("task", "length"),
                             "Evaluation score (0..1; RULER rows 0..100) of the newest "
                             "evaluated checkpoint; length 'all' is the task's mean."),
    "ringpilot_eval_effective_length_tokens": ("gauge", RUN_TAGS, "RULER's effective length "
                                               "of the newest evaluated checkpoint."),
    "ringpilot_eval_failures": ("gauge", RUN_TAGS, "Checkpoints of the stage whose evaluation "
                                "failed."),
}
# Step metrics (the Observer's names) -> their Prometheus series.
STEP_GAUGES = {"train/loss": "ringpilot_train_loss", "train/lr": "ringpilot_train_learning_rate",
               "train/grad_norm": "ringpilot_train_grad_norm",
               "train/tokens_per_s": "ringpilot_train_tokens_per_second",
               "train/step_s": "ringpilot_train_step_seconds",
               "train/predicted_step_s": "ringpilot_train_predicted_step_seconds",
               "train/step_time_ratio": "ringpilot_train_step_time_ratio"}


def quiet_library_loggers() -> None:
    """Keep the sink libraries' own INFO lines (MLflow's 'View run ...', W&B's banner) off the
    console (`make demo` prints only ringpilot's lines)."""
    for name in ("mlflow", "wandb", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
    warnings.filterwarnings("ignore", module=r"wandb(\.|$)")


class TensorBoardSink:
    """Event files under RUN_DIR/tensorboard/<stage>: one TensorBoard run per stage on the run's
    step axis, so `tensorboard --logdir RUN_DIR/tensorboard` shows the whole curriculum.

    A step is one event holding all its scalars (tensorboard's own EventFileWriter; torch's
    SummaryWriter writes an event per scalar): 17 events a step cost the driver 1.2 ms of CPU,
    one costs a tenth of that (benchmarks/train.py `sink_cpu_ms_per_step`)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from torch.utils.tensorboard.summary import text

        self.root = Path(run_dir) / "tensorboard"
        self._event, self._summary, self._text = Event, Summary, text
        self._open = lambda logdir: EventFileWriter(logdir, flush_secs=30)
        self._writers: dict[str, Any] = {}

    def _writer(self, stage: str):
        if stage not in self._writers:
            self._writers[stage] = self._open(str(self.root / stage))
        return self._writers[stage]

    def _write(self, stage: str, summary, step: int, at: float) -> None:
        self._writer(stage).add_event(self._event(wall_time=at, step=step, summary=summary))

    def start_stage(self, stage: str, offset: int, params: dict[str, str]) -> None:
        # RoPE theta and the sequence length: TensorBoard has no params, so a text card
        self._write(stage, self._text("params", "\n".join(
            f"    {k}: {v}" for k, v in sorted(params.items()))), offset, time.time())

    def log_step(self, stage: str, step: int, metrics: dict[str, float], at: float) -> None:
        values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
        self._write(stage, self._summary(value=values), step, at)

    def log_eval(self, stage: str, step: int, scores: dict[str, float], at: float) -> None:
        self.log_step(stage, step, scores, at)

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def end_stage(self, stage: str, state: str, artifacts: list[Path]) -> None:
        if stage in self._writers:
            self._writers.pop(stage).close()

    def close(self, state: str) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


# Bounded waits for a tracking server that does not answer: one try, a few seconds each.
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def mlflow_uri(spec: MlflowSinkSpec, run_dir: Path) -> str:
    """The tracking URI: a server's as given; a plain path is a file store in the run dir."""
    if "://" in spec.tracking_uri:
        return spec.tracking_uri
    return (Path(run_dir) / spec.tracking_uri).resolve().as_uri()


class MlflowSink:
    """One parent MLflow run per training run, one nested run per stage (their ids kept in the
    Observer's state, so a resumed run continues them); params: the RunSpec and the plan's
    layout; artifacts: plan.json and the reports, when a stage ends."""

    name = "mlflow"

    def __init__(self, spec: MlflowSinkSpec, run_dir: Path, run: RunSpec, params: dict[str, str],
                 state: dict):
        for key, value in MLFLOW_HTTP_ENV.items():
            os.environ.setdefault(key, value)
        uri = mlflow_uri(spec, run_dir)
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked; it is what a laptop and the tests
            # have (mlflow-skinny carries no database backend)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.state = state.setdefault("mlflow", {})
        self.state.setdefault("stages", {})
        if self.state.get("uri") != uri or "parent" not in self.state:
            exp = self.client.get_experiment_by_name(spec.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(spec.experiment)
            parent = self.client.create_run(exp_id, run_name=run.name,
                                            tags={"ringpilot.run": run.name})
            self.state.update(uri=uri, experiment=exp_id, parent=parent.info.run_id, stages={})
            self._log_params(parent.info.run_id, params)
        self._pending: dict[str, list] = {}  # run id -> metrics not sent yet

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def start_stage(self, stage: str, offset: int, params: dict[str, str]) -> None:
        self._stage_run(stage, params)

    def _stage_run(self, stage: str, params: dict[str, str] | None = None) -> str:
        runs = self.state["stages"]
        if stage not in runs:
            child = self.client.create_run(
                self.state["experiment"], run_name=stage,
                tags={"mlflow.parentRunId": self.state["parent"], "ringpilot.stage": stage})
            runs[stage] = child.info.run_id
            self._log_params(child.info.run_id, {"stage": stage, **(params or {})})
        return runs[stage]

    def log_step(self, stage: str, step: int, metrics: dict[str, float], at: float) -> None:
        """Kept until `flush` (the Observer's every poll, ~6 steps here): one request per poll,
        not per step, to a tracking server (and one read of the run's meta.yaml on a file
        store)."""
        from mlflow.entities import Metric

        ms = int(at * 1000)
        self._pending.setdefault(self._stage_run(stage), []).extend(
            Metric(k, float(v), ms, step) for k, v in metrics.items())

    def log_eval(self, stage: str, step: int, scores: dict[str, float], at: float) -> None:
        self.log_step(stage, step, scores, at)

    def flush(self) -> None:
        while self._pending:
            run_id, batch = next(iter(self._pending.items()))
            for i in range(0, len(batch), 1000):  # MLflow takes at most 1,000 per batch
                self.client.log_batch(run_id, metrics=batch[i:i + 1000])
            del self._pending[run_id]

    def end_stage(self, stage: str, state: str, artifacts: list[Path]) -> None:
        self.flush()
        run_id = self._stage_run(stage)
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(run_id, str(path))
            elif path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path=path.name)
        self.client.set_terminated(run_id, "FINISHED" if state == "done" else "FAILED")

    def close(self, state: str) -> None:
        self.flush()
        self.client.set_terminated(self.state["parent"],
                                   "FINISHED" if state == "done" else "KILLED")


class WandbSink:
    """One W&B run per training run (its id kept in the Observer's state: a resumed run continues
    it); offline files under RUN_DIR/wandb unless the spec says online."""

    name = "wandb"

    def __init__(self, spec: WandbSinkSpec, run_dir: Path, run: RunSpec, params: dict[str, str],
                 state: dict):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        root = Path(run_dir)
        state.setdefault("wandb", {}).setdefault("id", uuid.uuid4().hex[:12])
        self.run = wandb.init(project=spec.project, name=run.name, id=state["wandb"]["id"],
                              resume="allow", mode=spec.mode, dir=str(root), config=params,
                              settings=wandb.Settings(silent=True, console="off",
                                                      x_disable_stats=True))

    def start_stage(self, stage: str, offset: int, params: dict[str, str]) -> None:
        self.run.config.update({f"{stage}/{k}": v for k, v in params.items()},
                               allow_val_change=True)

    def log_step(self, stage: str, step: int, metrics: dict[str, float], at: float) -> None:
        self.run.log(dict(metrics), step=step)

    def log_eval(self, stage: str, step: int, scores: dict[str, float], at: float) -> None:
        self.log_step(stage, step, scores, at)

    def flush(self) -> None:
        pass

    def end_stage(self, stage: str, state: str, artifacts: list[Path]) -> None:
        pass

    def close(self, state: str) -> None:
        self.run.finish(exit_code=0 if state == "done" else 1)


class PrometheusSink:
    """Gauges through Ray's metrics API, set by the driver: each Ray node's metrics exporter serves
    them (as ray_<name>) beside Ray's own, so a KubeRay cluster's scrape picks them up."""

    name = "prometheus"

    def __init__(self, run: RunSpec):
        from ray.util.metrics import Gauge

        self.run = run.name
        self.gauges = {name: Gauge(name, description=desc, tag_keys=tags)
                       for name, (kind, tags, desc) in PROMETHEUS_METRICS.items()}

    def set(self, name: str, value: float, stage: str, rank: str = "all", **tags: str) -> None:
        self.gauges[name].set(float(value), tags={"run": self.run, "stage": stage,
                                                  "rank": rank, **tags})

    def log_step(self, stage: str, step: int, metrics: dict[str, float], at: float) -> None:
        for key, value in metrics.items():
            if key in STEP_GAUGES:
                self.set(STEP_GAUGES[key], value, stage)
            elif key.startswith("phase/"):
                self.set("ringpilot_train_phase_seconds", value, stage, phase=key[6:])
            elif key.startswith("rank"):  # rank<i>/memory_peak_bytes, rank<i>/kv_wait_s
                rank, what = key[4:].split("/")
                self.set("ringpilot_train_memory_peak_bytes" if what == "memory_peak_bytes"
                         else "ringpilot_train_kv_wait_seconds", value, stage, rank=rank)
        self.set("ringpilot_train_step", step, stage)
        self.set("ringpilot_train_last_step_timestamp_seconds", at, stage)
        self.set("ringpilot_run_active", 1, stage)

    def log_eval(self, stage: str, step: int, scores: dict[str, float], at: float) -> None:
        for key, value in scores.items():
            parts = key.split("/")  # eval/<task>[/len<L>], eval/effective_length
            if key == "eval/effective_length":
                self.set("ringpilot_eval_effective_length_tokens", value, stage)
            elif len(parts) == 2:
                self.set("ringpilot_eval_score", value, stage, task=parts[1], length="all")
            elif len(parts) == 3 and parts[2].startswith("len"):
                self.set("ringpilot_eval_score", value, stage, task=parts[1],
                         length=parts[2][3:])

    def set_stage_health(self, stage: str, restarts: int, eval_failures: int,
                         failed: bool) -> None:
        self.set("ringpilot_train_restarts", restarts, stage)
        self.set("ringpilot_eval_failures", eval_failures, stage)
        self.set("ringpilot_stage_failed", 1 if failed else 0, stage)

    def flush(self) -> None:
        pass

    def end_stage(self, stage: str, state: str, artifacts: list[Path]) -> None:
        self.set("ringpilot_run_active", 0, stage)

    def close(self, state: str) -> None:
        pass
