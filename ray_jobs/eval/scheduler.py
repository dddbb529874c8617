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
from ray_jobs.eval.pipeline import EvalActor, EvalRequest, EvalSummary, EvaluateFn
from ray_jobs.eval.runner import plan_lengths
from specs.checkpoint import CheckpointError
from specs.ledger import EvalEntry, Fenced, Ledger, is_committed
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
    submitted_unix: float = field(default_factory=time.time)


class EvalScheduler:
    """Driver-side thread: watch the ledger, evaluate new committed checkpoints in actors."""

    def __init__(self, run: RunSpec, run_dir: str | Path, *,
                 max_length: int | None = None,
                 evaluate_fn: EvaluateFn | None = None, ledger: Ledger | None = None,
                 spec_dir: Path | None = None):
        self.run, self.run_dir = run, Path(run_dir)
        # eval.kamradt.haystack, resolved now (relative to the run file): one error up front
        self.haystack = (tuple(str(p) for p in task_lib.haystack_files(
            run.eval.kamradt.haystack, spec_dir or Path.cwd())) if run.eval.kamradt else ())
        self.max_length = max_length or run.eval.max_tokens_per_evaluator
        # the driver's fenced ledger: a superseded driver's scheduler records nothing more
        self.ledger = ledger or Ledger(self.run_dir, run.name)
        self._evaluate_fn = evaluate_fn  # tests inject faults here; None: pipeline.evaluate_request
        self._handled: set[str] = set()
        self._current: _Running | None = None
        self._actor = None
        self._draining, self._halt = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.history: list[Finished] = []

    # -- public -----------------------------------------------------------------------------
    def start(self) -> EvalScheduler:
        import ray

        if not self.run.eval.enabled:
            log.info("eval.enabled is false: checkpoints will not be evaluated")
            return self
        if not ray.is_initialized():
            raise RuntimeError("EvalScheduler.start(): Ray is not initialised; call ray.init() "
                               "(the training driver does) before starting the scheduler")
        self._actor = self._new_actor()  # started now so a checkpoint does not wait for it
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

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._halt.is_set():
                if self._current is None:
                    pending = self.pending()
                    if pending:
                        self._submit(*pending[-1], attempt=1)  # newest first
                    elif self._draining.is_set():
                        break
                else:
                    self._check_current()
                self._halt.wait(POLL_SECONDS if self._current is None else 0.1)
        except Exception:  # the thread must never take the training driver down
            log.exception("evaluation scheduler stopped on an unexpected error")
        finally:
            self._cancel_current()
            self._kill_actor()

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
                           rope_theta=(self.run.stage_theta(index) if stage in names else None),
                           ruler=e.ruler, ruler_lengths=self._ruler_lengths(stage, path, lengths),
                           kamradt=e.kamradt, haystack_files=self.haystack)

    def _ruler_lengths(self, stage: str, path: str, lengths: list[int]) -> tuple[int, ...]:
        r = self.run.eval.ruler
        if r is None:
            return ()
        if r.final_only:
            entry = self.ledger.read().stages.get(stage)
            final = entry is not None and any(c.path == path and c.final
                                              for c in entry.checkpoints)
            if not final:
                return ()
        return tuple(n for n in lengths if n >= r.min_length)

    def _submit(self, stage: str, path: str, step: int, attempt: int) -> None:
        if self._actor is None:
            self._actor = self._new_actor()
        request = self._request(stage, path, step, attempt)
        ref = self._actor.evaluate.remote(request, self._evaluate_fn)
        self._current = _Running(request=request, ref=ref)
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
        ready, _ = ray.wait([cur.ref], timeout=0)
        if not ready:
            return
        try:
            summary: EvalSummary = ray.get(cur.ref)
        except ray.exceptions.RayActorError as err:  # the actor process died mid-evaluation
            self._actor = None
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
            self._current = None
            self._submit(req.stage, req.checkpoint, req.step, req.attempt + 1)
        else:
            self._finish("failed", error=f"{error}; gave up after {req.attempt} attempt(s) "
                         f"(eval.max_retries = {self.run.eval.max_retries})")

    def _finish(self, status: Literal["done", "failed"], *, scores: dict | None = None,
                results: str | None = None, error: str | None = None,
                started_unix: float | None = None) -> None:
        cur, self._current = self._current, None
        req = cur.request
        self._handled.add(req.checkpoint)
        self._record(req.stage, req.checkpoint, EvalEntry(
            status=status, attempts=req.attempt, scores=scores or {}, results=results,
            error=error))
        self.history.append(Finished(path=req.checkpoint, status=status, attempts=req.attempt,
                                     submitted_unix=cur.submitted_unix,
                                     started_unix=started_unix, finished_unix=time.time()))
        log.info("evaluation of %s: %s", req.checkpoint, status)

    def _cancel_current(self) -> None:
        if self._current is not None:
            self._kill_actor()
            self._finish("failed", error="cancelled: the scheduler was stopped before the "
                         "evaluation finished")

    def _new_actor(self):
        import ray

        e = self.run.eval
        # tqdm's bars (lm-eval's sample generation, datasets') off from the actor's start: the
        # variable is read when tqdm is imported. Their other output goes to the run's log file
        # (pipeline.library_output_to).
        cls = ray.remote(EvalActor).options(num_cpus=e.cpus, num_gpus=e.gpus, max_restarts=0,
                                             max_concurrency=1,
                                             runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})
        return cls.remote(max(1, int(e.cpus)), offline=e.ruler is not None and e.ruler.offline)

    def _kill_actor(self) -> None:
        import ray

        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None
