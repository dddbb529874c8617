"""Evaluate every committed checkpoint the moment it lands, in Ray actors beside the training.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ray_jobs.eval import tasks as task_lib
from ray_jobs.eval.results import RESULTS_FILE
from ray_jobs.eval.runner import plan_lengths
from specs.checkpoint import CheckpointError, eval_dir
from specs.ledger import EvalEntry, Fenced, Ledger, contained, is_committed
from specs.run import KamradtSpec, RulerSpec, RunSpec

log = logging.getLogger("ringpilot.eval")
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class EvalRequest:
    """What an evaluation actor is asked to do: one checkpoint, the whole grid."""

    stage: str
    checkpoint: str  # relative to the run directory, as in the ledger
    step: int  # the ledger's step of that checkpoint
    run_dir: Path
    attempt: int
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    seed: int
    gpus: float
    max_length: int
    cpus: float = 1.0
    gang_size: int = 0  # 0: derived from the longest context and max_length
    gang_place_timeout_s: float = 120.0
    rope_theta: float | None = None  # the stage's RoPE base, which the checkpoint must carry
    kamradt: KamradtSpec | None = None  # Kamradt's test, on `haystack_files`
    haystack_files: tuple[str, ...] = ()
    ruler: RulerSpec | None = None  # lm-eval's RULER tasks, at `ruler_lengths`
    ruler_lengths: tuple[int, ...] = ()

    @property
    def checkpoint_dir(self) -> Path:
        return contained(self.run_dir, self.checkpoint, "the checkpoint path in the ledger")

    @property
    def out_dir(self) -> Path:
        return eval_dir(self.run_dir, self.stage, self.step)


@dataclass(frozen=True)
class EvalSummary:
    """What an actor sends back; the full results are in `results` (results.json) on disk."""

    scores: dict[str, float]
    results: Path
    started_unix: float
    pid: int
    skipped: int


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


EvaluateFn = Callable[[EvalRequest], EvalSummary]


def evaluate_request(request: EvalRequest, wrap_generate: Callable | None = None,
                     on_gang: Callable | None = None) -> EvalSummary:
    """Inside the actor: load the checkpoint, run the grid, write results; return a summary.

    Contexts up to `max_length` run here; longer ones on an evaluation gang started for this
    checkpoint (and shut down after it). A gang that cannot be placed leaves those contexts
    recorded as not run, with the reason; a gang member that fails fails the evaluation, which
    the scheduler retries as a whole. `on_gang(gang)` is a test hook called once it started."""
    import torch

    from ray_jobs.eval import tasks as task_lib
    from ray_jobs.eval.gang import start_long_contexts
    from ray_jobs.eval.model import build_generate, build_token_counter, load_checkpoint
    from ray_jobs.eval.report import save_results
    from ray_jobs.eval.runner import evaluate

    started = time.time()
    device = "cuda" if request.gpus > 0 and torch.cuda.is_available() else "cpu"
    checkpoint = str(request.checkpoint_dir)
    if request.rope_theta is not None:
        check_stage_theta(request)
    model, tokenizer = load_checkpoint(checkpoint, device)
    generate = build_generate(model, tokenizer)
    if wrap_generate is not None:
        generate = wrap_generate(generate)
    long = start_long_contexts(
        [n for n in request.lengths if n > request.max_length], request.max_length,
        request.gang_size, checkpoint, tokenizer, cpus=request.cpus, gpus=request.gpus,
        place_timeout_s=request.gang_place_timeout_s,
        on_gang=None if on_gang is None else lambda gang: on_gang(gang, request))
    if long.generate is not None and wrap_generate is not None:
        long.generate = wrap_generate(long.generate)
    kamradt = None
    if request.kamradt is not None:
        k = request.kamradt
        kamradt = task_lib.Kamradt(haystack=task_lib.read_haystack(request.haystack_files),
                                   needle=k.needle, question=k.question,
                                   key_phrases=tuple(k.key_phrases))
    try:
        results = evaluate(generate, build_token_counter(tokenizer), checkpoint=checkpoint,
                           stage=request.stage, step=request.step, tasks=request.tasks,
                           lengths=request.lengths, depths=request.depths,
                           samples=request.samples, seed=request.seed,
                           max_length=request.max_length,
                           long_generate=long.generate, long_engine=long.engine,
                           long_unavailable=long.unavailable, gang=long.info,
                           kamradt=kamradt, haystack_files=request.haystack_files,
                           kamradt_intervals=request.kamradt.depth_intervals
                           if request.kamradt else 11)
        if request.ruler is not None and request.ruler_lengths:
            del model  # lm-eval's backend loads its own copy
            add_ruler(results, request, checkpoint, device, long)
    finally:
        long.shutdown()
    save_results(results, request.out_dir)
    return EvalSummary(scores=results.scores, results=request.out_dir / RESULTS_FILE,
                       started_unix=started, pid=os.getpid(), skipped=len(results.skipped))


def add_ruler(results, request: EvalRequest, checkpoint: str, device: str,
              long=None) -> None:
    """RULER through lm-eval (ray_jobs.eval.lm_eval_backend) at the request's RULER lengths,
    into `results.ruler` (per length, as RULER publishes: the mean over tasks x 100, its
    samples and 95% interval) and `results.scores` ("ruler@LENGTH", 0..1). Lengths beyond one
    evaluator run on the evaluation gang `long` (ray_jobs.eval.gang.LongContexts) when there is
    one. What cannot run (lm-eval missing, a task needing a download, a length no evaluator or
    gang holds) is recorded with the reason; it never fails the evaluation of ringpilot's own
    tasks."""
    from ray_jobs.eval.gang import GangFailed
    from ray_jobs.eval.lm_eval_backend import (
        LmEvalMissing,
        RulerInputError,
        evaluate_prepared,
        prepare_tasks_cached,
    )

    r = request.ruler
    gang = long is not None and long.gang is not None
    here = [n for n in request.ruler_lengths if n <= request.max_length or gang]
    doc: dict = {"tasks": list(r.tasks), "lengths": here, "rows": [], "unavailable": {},
                 "samples_per_task": r.samples, "not_run": {
                     str(n): (long.unavailable if long is not None and long.unavailable else
                              f"longer than the {request.max_length:,} tokens one evaluator "
                              "holds, and no evaluation gang ran")
                     for n in request.ruler_lengths if n not in here}}
    if gang:
        doc["engines"] = {str(n): "one evaluator" if n <= request.max_length else long.engine
                          for n in here}
    on_gang = None
    if gang:
        doc["gang_prompts"] = 0

        def on_gang(ids, max_new, eos):  # counted: what the gang really generated
            doc["gang_prompts"] += 1
            return long.gang.generate(ids, max_new, eos)
    if here:
        try:
            prepared = prepare_tasks_cached(checkpoint, r.tasks, here,
                                            apply_chat_template=r.chat_template)
            report = evaluate_prepared(
                prepared, request.out_dir / "ruler", limit=r.samples,
                apply_chat_template=r.chat_template, device=device,
                long_generate=on_gang,
                max_local=request.max_length)
        except (LmEvalMissing, RulerInputError) as e:
            doc["error"] = str(e)
            log.warning("RULER not run on %s: %s", request.checkpoint, e)
        except GangFailed:
            raise  # the gang is gone: the evaluation is retried as a whole
        except Exception as e:  # noqa: BLE001 - lm-eval failing must not lose ringpilot's tasks
            doc["error"] = f"lm-eval failed: {type(e).__name__}: {e}"
            log.warning("RULER failed on %s: %s: %s", request.checkpoint, type(e).__name__, e)
        else:
            doc.update(report.to_dict(), lengths=here)
            doc["results_path"] = os.path.relpath(report.results_path, request.out_dir)
            for row in report.rows:
                results.scores[f"ruler@{row.length}"] = row.score / 100
    results.ruler = doc


def check_stage_theta(request: EvalRequest) -> None:
    """Refuse a checkpoint whose config does not carry its stage's RoPE base (a model evaluated
    with the wrong theta retrieves nothing past its old context, and the grid would blame the
    training): the error goes into results.json and the log, and is not retried."""
    import json

    from ray_jobs.eval.results import write_error

    config = json.loads((request.checkpoint_dir / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    if theta is None or abs(float(theta) - request.rope_theta) > 1e-6 * request.rope_theta:
        error = (f"checkpoint {request.checkpoint}: config.json has rope_theta {theta}, but stage "
                 f"{request.stage!r} trains with {request.rope_theta:g}; it was not saved by "
                 "this stage (or its config was edited): evaluate the stage's own checkpoint, or "
                 "fix rope_parameters.rope_theta in its config.json")
        log.error("%s", error)
        write_error(request.out_dir, request.checkpoint, error)
        raise CheckpointError(error)


class _EvalActor:
    """A Ray actor process that evaluates checkpoints; reused until it dies."""

    def __init__(self, threads: int, offline: bool = False):
        if offline:  # before huggingface_hub, datasets or nltk are imported in this process
            from ray_jobs.eval.lm_eval_backend import offline_environment

            offline_environment()
        import torch

        torch.set_num_threads(threads)  # its own CPUs only, never the training workers' cores
        # Import the heavy modules now (~5-10 s here), not when the first checkpoint lands.
        import transformers.models.llama.modeling_llama  # noqa: F401
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per checkpoint in the job's log

        import ray_jobs.eval.report  # noqa: F401

    def ready(self) -> int:
        return os.getpid()

    def evaluate(self, request: EvalRequest, fn: EvaluateFn | None = None) -> EvalSummary:
        return (fn or evaluate_request)(request)


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
        self._evaluate_fn = evaluate_fn  # tests inject faults here; None: evaluate_request
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
        cls = ray.remote(_EvalActor).options(num_cpus=e.cpus, num_gpus=e.gpus, max_restarts=0,
                                             max_concurrency=1)
        return cls.remote(max(1, int(e.cpus)), offline=e.ruler is not None and e.ruler.offline)

    def _kill_actor(self) -> None:
        import ray

        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None
