"""The driver's side of evaluation: hand each committed checkpoint to an actor as it lands.

A thread of the training driver watches the run ledger, queues the checkpoints, starts and stops
the evaluation actor and retries; what the actor does with a checkpoint is
ray_jobs.eval.pipeline.

The trigger is the run ledger, not Ray Train's checkpoint registration: the trainer's rank-0
worker writes a checkpoint, marks it COMMITTED and then calls `Ledger.commit_checkpoint`, all
before training goes on, so a checkpoint in the ledger exists and is complete even if a worker
crashes right after. Ray Train's controller registers a reported checkpoint only at its next poll
of the workers (~2 s), and one reported just before a crash was seen to be lost (FACTS.md), so a
`UserCallback.after_report` trigger would miss exactly those checkpoints.

Policy: one evaluation at a time (this machine has 2 cores); when checkpoints pile up the newest
is evaluated first (LIFO), older ones after it if they still exist (pruned ones are dropped). An
actor that dies or raises is replaced and the checkpoint retried up to `eval.max_retries` times,
then recorded as failed; nothing here ever touches the training workers.

GPUs: an actor is created for one checkpoint and killed once its evaluation is recorded, so
evaluation holds GPUs only while it runs, never for the whole run. Where it runs is the plan's
(plan.json, eval.stages; topology.eval_plan): "beside training" pins the actor and its gang to
the nodes the plan reserved (a Ray label selector on ringpilot.io/node), never a training
node; "at the stage boundary" holds the stage's checkpoints until the ledger says the stage
ended; before starting a stage the driver waits (`make_room`) for every evaluation that could
hold a GPU of its training nodes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ray_jobs.eval import tasks as task_lib
from ray_jobs.eval.gang import node_selector
from ray_jobs.eval.pipeline import EvalActor, EvalRequest, EvalSummary, EvaluateFn
from ray_jobs.eval.runner import plan_lengths
from specs.checkpoint import CheckpointError
from specs.ledger import EvalEntry, Fenced, Ledger, is_committed
from specs.plan import EvalPlan, EvalStagePlan, Plan
from specs.run import RunSpec

log = logging.getLogger("ringpilot.eval")
POLL_SECONDS = 0.5


@dataclass
class Finished:
    """One checkpoint's evaluation as the scheduler saw it (its `history`)."""

    path: str
    status: Literal["done", "failed"]
    attempts: int
    submitted_unix: float
    started_unix: float | None
    finished_unix: float


@dataclass
class _Running:
    request: EvalRequest
    ref: object  # the actor call's ObjectRef
    actor: object = None  # created for this checkpoint, killed when it is recorded
    submitted_unix: float = field(default_factory=time.time)


PLAN_FILE = "plan.json"  # ray_jobs.train.placement.PLAN_FILE, written by the driver


def read_eval_plan(run_dir: Path) -> tuple[EvalPlan | None, dict[str, set[str]]]:
    """The evaluation section of the run's plan.json and each stage's training nodes (None and
    {} without one: no cluster plan)."""
    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        return None, {}
    try:
        plan = Plan.model_validate_json(path.read_text())
    except ValueError as e:  # pydantic's ValidationError included
        raise ValueError(f"{path}: not a plan ringpilot can read ({str(e).splitlines()[0]}); "
                         "delete it and restart the driver, which plans again") from None
    return plan.eval, {s.name: {w.node for w in s.workers} for s in plan.stages}


def actor_options(run: RunSpec, placement: EvalStagePlan | None) -> dict:
    """Ray options of the actor that evaluates one checkpoint: eval.cpus and eval.gpus, and for
    a stage evaluated beside training, a label selector for the plan's evaluation nodes (never
    a node of the stage's training workers)."""
    e = run.eval
    # tqdm's bars (lm-eval's sample generation, datasets') off from the actor's start: the
    # variable is read when tqdm is imported. Their other output goes to the run's log file
    # (pipeline.library_output_to).
    options = {"num_cpus": e.cpus, "num_gpus": e.gpus, "max_restarts": 0, "max_concurrency": 1,
               "runtime_env": {"env_vars": {"TQDM_DISABLE": "1"}}}
    if placement is not None and placement.when == "beside training" and placement.nodes:
        options["label_selector"] = node_selector(placement.nodes)
    return options


class RayActors:
    """How the scheduler creates, calls, polls and kills actors (tests pass a fake)."""

    def create(self, options: dict, threads: int, offline: bool):
        import ray

        return ray.remote(EvalActor).options(**options).remote(threads, offline=offline)

    def submit(self, actor, request: EvalRequest, fn: EvaluateFn | None):
        return actor.evaluate.remote(request, fn)

    def ready(self, ref) -> bool:
        import ray

        return bool(ray.wait([ref], timeout=0)[0])

    def get(self, ref) -> EvalSummary:
        import ray

        return ray.get(ref)

    def kill(self, actor) -> None:
        import ray

        ray.kill(actor)


def _checked_data_dir(run: RunSpec, spec_dir: Path | None) -> str | None:
    """eval.data_dir, resolved against the run file's folder and checked for what eval.ruler and
    eval.babilong need (one error naming each missing or malformed file), before any checkpoint
    is evaluated."""
    e = run.eval
    if e.data_dir is None:
        return None
    from ray_jobs.eval.lm_eval.offline_data import babilong_config, check_data_dir

    root = (spec_dir or Path.cwd()) / Path(e.data_dir).expanduser()
    lengths = e.context_lengths or [s.seq_len for s in run.stages]
    configs = sorted({babilong_config(n) for n in lengths}) if e.babilong else []
    return str(check_data_dir(root, e.ruler.tasks if e.ruler else (), configs).root)


class EvalScheduler:
    """Driver-side thread: watch the ledger, evaluate new committed checkpoints in actors."""

    def __init__(self, run: RunSpec, run_dir: str | Path, *,
                 max_length: int | None = None,
                 evaluate_fn: EvaluateFn | None = None, ledger: Ledger | None = None,
                 spec_dir: Path | None = None, plan: EvalPlan | None = None,
                 training_nodes: dict[str, set[str]] | None = None,
                 actors: RayActors | None = None):
        self.run, self.run_dir = run, Path(run_dir)
        # eval.kamradt.haystack, resolved now (relative to the run file): one error up front
        self.haystack = (tuple(str(p) for p in task_lib.haystack_files(
            run.eval.kamradt.haystack, spec_dir or Path.cwd())) if run.eval.kamradt else ())
        self.data_dir = _checked_data_dir(run, spec_dir)
        self.max_length = max_length or run.eval.max_tokens_per_evaluator
        self.base_rope = run.base_rope(spec_dir)  # what each stage's RoPE is resolved against
        # the driver's fenced ledger: a superseded driver's scheduler records nothing more
        self.ledger = ledger or Ledger(self.run_dir, run.name)
        self._evaluate_fn = evaluate_fn  # tests inject faults here; None: pipeline.evaluate_request
        # where each stage's checkpoints are evaluated: the plan's (plan.json's, read at start)
        self.plan = plan
        self.training_nodes = training_nodes or {}  # per stage, the nodes its workers use
        self._actors = actors or RayActors()
        self._handled: set[str] = set()
        self._current: _Running | None = None
        self._idle = threading.Condition()
        self._draining, self._halt = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.history: list[Finished] = []

    # -- public -----------------------------------------------------------------------------
    def start(self) -> EvalScheduler:
        if not self.run.eval.enabled:
            log.info("eval.enabled is false: checkpoints will not be evaluated")
            return self
        if type(self._actors) is RayActors:
            import ray

            if not ray.is_initialized():
                raise RuntimeError("EvalScheduler.start(): Ray is not initialised; call "
                                   "ray.init() (the training driver does) before starting the "
                                   "scheduler")
        if self.plan is None:
            self.plan, self.training_nodes = read_eval_plan(self.run_dir)
        # No actor yet: one is created per checkpoint, so no GPU is held until one lands.
        self._thread = threading.Thread(target=self._loop, name="ringpilot-eval", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """wait=True: evaluate what is committed and pending (bounded by `timeout`), then stop;
        wait=False, or when the timeout passes: cancel the running evaluation (recorded failed)."""
        if self._thread is None:
            return
        if wait:
            self._draining.set()
            self._thread.join(timeout)
        self._halt.set()
        self._thread.join()
        self._thread = None

    @property
    def busy(self) -> bool:
        return self._current is not None

    def placement(self, stage: str) -> EvalStagePlan | None:
        """The plan's word on where `stage`'s checkpoints are evaluated (None: no plan)."""
        return self.plan.stage(stage) if self.plan is not None else None

    def make_room(self, stage: str, timeout: float | None = None) -> bool:
        """Block until no evaluation pending or running could hold a GPU of `stage`'s training
        nodes (the driver calls it before starting `stage`): checkpoints of a stage evaluated
        at its boundary, and of one evaluated beside training on nodes `stage` now trains on,
        are evaluated first. Without a plan nothing waits. True when there is room, False on
        timeout or once the scheduler stopped."""
        if self.plan is None or self._thread is None:
            return True
        training = self.training_nodes.get(stage, set())
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._thread is not None and self._thread.is_alive():
                cur = self._current
                # `stage`'s own checkpoints (a resumed stage's) wait for its own end instead
                stages = {st for st, _, _ in self.pending() if st != stage}
                if cur is not None:
                    stages.add(cur.request.stage)
                if not any(self._in_the_way(st, training) for st in stages):
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(POLL_SECONDS if left is None else min(POLL_SECONDS, left))
        return False

    def _in_the_way(self, stage: str, training: set[str]) -> bool:
        """Whether evaluating a checkpoint of `stage` may take GPUs on the `training` nodes."""
        placement = self.placement(stage)
        if placement is None or placement.gpus == 0:
            return False
        if placement.when == "beside training" and placement.nodes:
            return bool(set(placement.nodes) & training)
        return True  # at a boundary it runs wherever the freed GPUs are

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._halt.is_set():
                if self._current is None:
                    pending = self.pending()
                    ready = [p for p in pending if self._may_start(p[0])]
                    if ready:
                        self._submit(*ready[-1], attempt=1)  # newest first
                    elif self._draining.is_set() and not pending:
                        break
                else:
                    self._check_current()
                self._halt.wait(POLL_SECONDS if self._current is None else 0.1)
        except Exception:  # the thread must never take the training driver down
            log.exception("evaluation scheduler stopped on an unexpected error")
        finally:
            self._cancel_current()
            with self._idle:
                self._idle.notify_all()

    def _may_start(self, stage: str) -> bool:
        """A stage evaluated at its boundary waits until the ledger says it ended (its GPUs
        are free) or the scheduler drains; any other starts at once."""
        placement = self.placement(stage)
        if placement is None or placement.when != "at the stage boundary":
            return True
        if self._draining.is_set():
            return True
        entry = self.ledger.read().stages.get(stage)
        return entry is not None and entry.state in ("done", "failed")

    def pending(self) -> list[tuple[str, str, int]]:
        """(stage, checkpoint path, step) committed and not yet evaluated, oldest to newest."""
        doc = self.ledger.read()
        order = {s.name: i for i, s in enumerate(self.run.stages)}
        found = []
        for stage, entry in doc.stages.items():
            for ckpt in entry.checkpoints:
                done = entry.eval.get(ckpt.path)
                if ckpt.path in self._handled or (done and done.status in ("done", "failed")):
                    continue
                if is_committed(self.ledger.resolve(ckpt.path, f"stages.{stage}.checkpoints")):
                    found.append((order.get(stage, len(order)), ckpt.step, stage, ckpt.path))
        return [(stage, path, step) for _, step, stage, path in sorted(found)]

    def _request(self, stage: str, path: str, step: int, attempt: int) -> EvalRequest:
        e = self.run.eval
        names = [s.name for s in self.run.stages]
        index = names.index(stage) if stage in names else len(names) - 1
        lengths = plan_lengths([s.seq_len for s in self.run.stages], index, e.context_lengths)
        return EvalRequest(stage=stage, checkpoint=path, step=step, run_dir=self.run_dir,
                           attempt=attempt, tasks=tuple(e.tasks), lengths=tuple(lengths),
                           depths=tuple(e.depths), samples=e.samples, seed=e.seed, gpus=e.gpus,
                           cpus=e.cpus, max_length=self.max_length, gang_size=e.gang_size,
                           gang_place_timeout_s=e.gang_place_timeout_s,
                           rope=(self.run.stage_rope(index, self.base_rope) if stage in names
                                 else None),
                           ruler=e.ruler, ruler_lengths=self._ruler_lengths(stage, path, lengths),
                           babilong=e.babilong, data_dir=self.data_dir,
                           babilong_lengths=self._babilong_lengths(stage, path, lengths),
                           kamradt=e.kamradt, haystack_files=self.haystack,
                           compute_dtype=self.run.compute_dtype,
                           nodes=tuple(self._reserved_nodes(stage)))

    def _reserved_nodes(self, stage: str) -> list[str]:
        placement = self.placement(stage)
        if placement is None or placement.when != "beside training":
            return []
        return placement.nodes

    def _ruler_lengths(self, stage: str, path: str, lengths: list[int]) -> tuple[int, ...]:
        r = self.run.eval.ruler
        if r is None or (r.final_only and not self._is_final(stage, path)):
            return ()
        return tuple(n for n in lengths if n >= r.min_length)

    def _babilong_lengths(self, stage: str, path: str, lengths: list[int]) -> tuple[int, ...]:
        b = self.run.eval.babilong
        if b is None or (b.final_only and not self._is_final(stage, path)):
            return ()
        return tuple(lengths)

    def _is_final(self, stage: str, path: str) -> bool:
        entry = self.ledger.read().stages.get(stage)
        return entry is not None and any(c.path == path and c.final for c in entry.checkpoints)

    def _submit(self, stage: str, path: str, step: int, attempt: int) -> None:
        request = self._request(stage, path, step, attempt)
        actor = self._new_actor(stage)
        ref = self._actors.submit(actor, request, self._evaluate_fn)
        self._current = _Running(request=request, ref=ref, actor=actor)
        self._record(stage, path, EvalEntry(status="running", attempts=attempt))
        log.info("evaluating %s (attempt %d)", path, attempt)

    def _record(self, stage: str, path: str, entry: EvalEntry) -> None:
        try:
            self.ledger.record_eval(stage, path, entry)
        except Fenced as e:  # a newer driver owns the run (and evaluates its checkpoints)
            if not self._halt.is_set():
                log.warning("evaluation scheduler stops: %s", e)
            self._halt.set()

    def _check_current(self) -> None:
        import ray

        cur = self._current
        if not self._actors.ready(cur.ref):
            return
        try:
            summary: EvalSummary = self._actors.get(cur.ref)
        except ray.exceptions.RayActorError as err:  # the actor process died mid-evaluation
            self._retry_or_fail(f"evaluation actor died: {type(err).__name__}")
            return
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, CheckpointError):  # retrying cannot fix the directory
                self._finish("failed", error=str(err.cause))
                return
            self._retry_or_fail(f"evaluation raised {type(err.cause).__name__}: {err.cause}")
            return
        self._finish("done", scores=summary.scores,
                     results=os.path.relpath(summary.results, self.run_dir),
                     started_unix=summary.started_unix)

    def _retry_or_fail(self, error: str) -> None:
        req = self._current.request
        log.warning("%s on %s (attempt %d)", error, req.checkpoint, req.attempt)
        if not is_committed(req.checkpoint_dir):
            self._finish("failed", error=f"{error}; the checkpoint is gone (pruned by "
                         "storage.keep_last) so it cannot be retried")
        elif req.attempt <= self.run.eval.max_retries:
            self._release(self._current)
            self._current = None
            self._submit(req.stage, req.checkpoint, req.step, req.attempt + 1)
        else:
            self._finish("failed", error=f"{error}; gave up after {req.attempt} attempt(s) "
                         f"(eval.max_retries = {self.run.eval.max_retries})")

    def _finish(self, status: Literal["done", "failed"], *, scores: dict | None = None,
                results: str | None = None, error: str | None = None,
                started_unix: float | None = None) -> None:
        cur, self._current = self._current, None
        self._release(cur)  # its GPUs go back before the next checkpoint asks for some
        req = cur.request
        self._record(req.stage, req.checkpoint, EvalEntry(
            status=status, attempts=req.attempt, scores=scores or {}, results=results,
            error=error))
        self._handled.add(req.checkpoint)  # after the ledger says so (make_room reads both)
        self.history.append(Finished(path=req.checkpoint, status=status, attempts=req.attempt,
                                     submitted_unix=cur.submitted_unix,
                                     started_unix=started_unix, finished_unix=time.time()))
        log.info("evaluation of %s: %s", req.checkpoint, status)
        with self._idle:
            self._idle.notify_all()

    def _cancel_current(self) -> None:
        if self._current is not None:
            self._finish("failed", error="cancelled: the scheduler was stopped before the "
                         "evaluation finished")

    def _new_actor(self, stage: str):
        e = self.run.eval
        return self._actors.create(actor_options(self.run, self.placement(stage)),
                                   max(1, int(e.cpus)),
                                   offline=e.ruler is not None and e.ruler.offline)

    def _release(self, cur: _Running | None) -> None:
        """Kill the checkpoint's actor (a dead one too: Ray forgets it)."""
        if cur is not None and cur.actor is not None:
            actor, cur.actor = cur.actor, None
            self._actors.kill(actor)
