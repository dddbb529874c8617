"""Inside an evaluation actor: one checkpoint's evaluation, from loading it to saving results.

The pipeline: check the stage's RoPE base, load the checkpoint, start an evaluation gang for the
contexts one evaluator cannot hold, run ringpilot's grid (and Kamradt's test), run RULER through
lm-eval at its lengths, save results.json and the reports. The driver side that decides which
checkpoint to evaluate, and retries, is ray_jobs.eval.scheduler.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ray_jobs.eval.results import RESULTS_FILE
from specs.checkpoint import CheckpointError, eval_dir
from specs.ledger import contained
from specs.run import BabilongSpec, KamradtSpec, RulerSpec

log = logging.getLogger("ringpilot.eval")
# ringpilot's own loggers in the actor: the job's console keeps them while the libraries' output
# goes to the run's log file (library_output_to)
OWN_LOGGERS = ("ringpilot", "ray_jobs")
LIBRARY_LOG = "evaluation.log"  # in the run directory's logs/


@contextmanager
def library_output_to(path: Path) -> Iterator[None]:
    """Inside the block, what the libraries write (lm-eval's, datasets' and transformers'
    loggers and progress bars, and the subprocesses they start, such as lm-eval's `git
    describe`) goes to the file `path` instead of the process's stdout and stderr, which Ray
    forwards to the job's console; ringpilot's own log lines keep the console. Works on the
    file descriptors, so output written below Python (a subprocess, a C library) follows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    handler = logging.StreamHandler(console)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    own = [(logging.getLogger(name), logging.getLogger(name).propagate) for name in OWN_LOGGERS]
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        for logger, _ in own:
            logger.addHandler(handler)
            logger.propagate = False
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)
        for logger, propagate in own:
            logger.removeHandler(handler)
            logger.propagate = propagate
        console.close()


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
    rope: dict | None = None  # the stage's rope_parameters, which the checkpoint must carry
    kamradt: KamradtSpec | None = None  # Kamradt's test, on `haystack_files`
    haystack_files: tuple[str, ...] = ()
    ruler: RulerSpec | None = None  # lm-eval's RULER tasks, at `ruler_lengths`
    ruler_lengths: tuple[int, ...] = ()
    babilong: BabilongSpec | None = None  # lm-eval's BABILong tasks, at `babilong_lengths`
    babilong_lengths: tuple[int, ...] = ()
    data_dir: str | None = None  # eval.data_dir, resolved and checked by the scheduler
    compute_dtype: str = "float32"  # the run's (RunSpec.compute_dtype): bf16 loads bf16 on CUDA
    # ray_jobs.train.placement.NODE_LABEL values the gang may use (the plan's evaluation nodes);
    # empty: anywhere Ray finds room
    nodes: tuple[str, ...] = ()

    @property
    def checkpoint_dir(self) -> Path:
        return contained(self.run_dir, self.checkpoint, "the checkpoint path in the ledger")

    @property
    def out_dir(self) -> Path:
        """eval/<stage>/step-NNNNNN: the stage must be a simple name and the folder (symlinks
        followed) inside the run, or the results would be written elsewhere."""
        rel = eval_dir(Path(), self.stage, self.step)
        return contained(self.run_dir, rel, f"the evaluation folder of stage {self.stage!r}")


@dataclass(frozen=True)
class EvalSummary:
    """What an actor sends back; the full results are in `results` (results.json) on disk."""

    scores: dict[str, float]
    results: Path
    started_unix: float
    pid: int
    skipped: int


EvaluateFn = Callable[[EvalRequest], EvalSummary]


def evaluate_request(request: EvalRequest, wrap_generate: Callable | None = None,
                     on_gang: Callable | None = None) -> EvalSummary:
    """Inside the actor: load the checkpoint, run the grid, write results; return a summary.

    Contexts up to `max_length` run here; longer ones on an evaluation gang started for this
    checkpoint (and shut down after it). A gang that cannot be placed leaves those contexts
    recorded as not run, with the reason; a gang member that fails fails the evaluation, which
    the scheduler retries as a whole. `on_gang(gang)` is a test hook called once it started."""
    from ray_jobs.eval import tasks as task_lib
    from ray_jobs.eval.gang import start_long_contexts
    from ray_jobs.eval.model import (
        build_generate,
        build_token_counter,
        evaluation_device,
        load_checkpoint,
    )
    from ray_jobs.eval.report import save_results
    from ray_jobs.eval.runner import evaluate

    started = time.time()
    device = evaluation_device(request.gpus)
    checkpoint = str(request.checkpoint_dir)
    if request.rope is not None:
        check_stage_rope(request)
    model, tokenizer = load_checkpoint(checkpoint, device, request.compute_dtype)
    generate = build_generate(model, tokenizer)
    if wrap_generate is not None:
        generate = wrap_generate(generate)
    long = start_long_contexts(
        [n for n in request.lengths if n > request.max_length], request.max_length,
        request.gang_size, checkpoint, tokenizer, cpus=request.cpus, gpus=request.gpus,
        place_timeout_s=request.gang_place_timeout_s, compute_dtype=request.compute_dtype,
        nodes=request.nodes,
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
        if (request.ruler is not None and request.ruler_lengths) or \
                (request.babilong is not None and request.babilong_lengths):
            del model  # lm-eval's backend loads its own copy
        if request.ruler is not None and request.ruler_lengths:
            add_ruler(results, request, checkpoint, device, long)
        if request.babilong is not None and request.babilong_lengths:
            add_babilong(results, request, checkpoint, device)
    finally:
        long.shutdown()
    save_results(results, request.out_dir)
    return EvalSummary(scores=results.scores, results=request.out_dir / RESULTS_FILE,
                       started_unix=started, pid=os.getpid(), skipped=len(results.skipped))


def add_ruler(results, request: EvalRequest, checkpoint: str, device: str,
              long=None, model: str | None = None) -> None:
    """RULER through lm-eval (ray_jobs.eval.lm_eval) at the request's RULER lengths,
    into `results.ruler` (per length, as RULER publishes: the mean over tasks x 100, its
    samples and 95% interval) and `results.scores` ("ruler@LENGTH", 0..1). Lengths beyond one
    evaluator run on the evaluation gang `long` (ray_jobs.eval.gang.LongContexts) when there is
    one. What cannot run (lm-eval missing, a task needing a download, a length no evaluator or
    gang holds) is recorded with the reason; it never fails the evaluation of ringpilot's own
    tasks. `model`: another registered lm-eval backend than ringpilot's (tests)."""
    from ray_jobs.eval.gang import GangFailed
    from ray_jobs.eval.lm_eval.adapter import LmEvalMissing, RulerInputError
    from ray_jobs.eval.lm_eval.effective_length import score_key, summarize
    from ray_jobs.eval.lm_eval.ruler import evaluate_prepared, prepare_tasks_cached

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
                                            apply_chat_template=r.chat_template,
                                            data_dir=request.data_dir)
            report = evaluate_prepared(
                prepared, request.out_dir / "ruler", limit=r.samples,
                apply_chat_template=r.chat_template, device=device,
                long_generate=on_gang,
                max_local=request.max_length, compute_dtype=request.compute_dtype,
                **({"model": model} if model else {}))
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
    doc.update(summarize(doc["rows"], r.tasks))  # average per length, effective length or partial
    for row in doc["rows"]:
        results.scores[score_key(doc, row["length"])] = row["score"] / 100
    if doc["effective_length"] is not None:
        results.scores["ruler_effective_length"] = float(doc["effective_length"])
    results.ruler = doc


def add_babilong(results, request: EvalRequest, checkpoint: str, device: str,
                 model: str | None = None) -> None:
    """BABILong through lm-eval at the request's lengths (each runs the largest BABILong config
    that fits it, up to one evaluator's length), into `results.babilong` (per config: mean
    accuracy over the tasks x 100) and `results.scores` ("babilong@CONFIG_TOKENS", 0..1). What
    cannot run is recorded with the reason; it never fails the rest of the evaluation."""
    from ray_jobs.eval.lm_eval.adapter import LmEvalMissing, RulerInputError
    from ray_jobs.eval.lm_eval.babilong import evaluate_babilong, prepare_babilong

    b = request.babilong
    here = [n for n in request.babilong_lengths if n <= request.max_length]
    doc: dict = {"tasks": list(b.tasks), "samples_per_task": b.samples, "rows": [],
                 "unavailable": {}, "not_run": {
                     str(n): f"longer than the {request.max_length:,} tokens one evaluator holds"
                     for n in request.babilong_lengths if n not in here}}
    try:
        prepared = prepare_babilong(checkpoint, here, b.tasks, data_dir=request.data_dir)
        doc["unavailable"] = dict(prepared.unavailable)
        if prepared.tasks:
            doc.update(evaluate_babilong(prepared, request.out_dir / "babilong", limit=b.samples,
                                         device=device, compute_dtype=request.compute_dtype,
                                         **({"model": model} if model else {})))
    except (LmEvalMissing, RulerInputError) as e:
        doc["error"] = str(e)
        log.warning("BABILong not run on %s: %s", request.checkpoint, e)
    except Exception as e:  # noqa: BLE001 - lm-eval failing must not lose the other tasks
        doc["error"] = f"lm-eval failed: {type(e).__name__}: {e}"
        log.warning("BABILong failed on %s: %s: %s", request.checkpoint, type(e).__name__, e)
    for row in doc["rows"]:
        results.scores[f"babilong@{row['length']}"] = row["score"] / 100
    results.babilong = doc


def check_stage_rope(request: EvalRequest) -> None:
    """Refuse a checkpoint whose config does not carry its stage's RoPE (method, base and
    factor): a model evaluated with other positions retrieves nothing past its old context, and
    the grid would blame the training. The error goes into results.json and the log, and is not
    retried."""
    from ray_jobs.eval.results import write_error
    from specs.checkpoint import config_rope
    from specs.errors import SpecError

    want = request.rope
    try:  # a damaged or hostile config.json is this checkpoint's error, not a traceback
        have = config_rope(request.checkpoint_dir) or {}
        problem = _rope_difference(have, want)
    except (SpecError, ValueError, TypeError, AttributeError, RecursionError) as e:
        problem = f"a config.json that cannot be read ({' '.join(str(e).split())[:200]})"
    if problem:
        error = (f"checkpoint {request.checkpoint}: {problem}, but stage {request.stage!r} "
                 f"trains with {_rope_words(want)}; it was not saved by this stage (or its "
                 "config was edited): evaluate the stage's own checkpoint, or fix "
                 "rope_parameters in its config.json")
        log.error("%s", error)
        write_error(request.out_dir, request.checkpoint, error)
        raise CheckpointError(error)


def _rope_difference(have: dict, want: dict) -> str:
    """'' when `have` rotates as `want` does (type, base and factor; bases within 1e-6), else
    what the checkpoint has."""
    same = have.get("rope_type", "default") == want.get("rope_type", "default")
    for key in ("rope_theta", "factor"):
        a, b = have.get(key), want.get(key)
        if b is not None:
            same = same and a is not None and abs(float(a) - float(b)) <= 1e-6 * abs(float(b))
    return "" if same else f"config.json has {_rope_words(have)}"


def _rope_words(params: dict) -> str:
    kind = params.get("rope_type", "default")
    words = f"rope_theta {params.get('rope_theta')}"
    return words if kind == "default" else \
        f"rope_type {kind} (factor {params.get('factor')}), {words}"


class EvalActor:
    """A Ray actor process that evaluates checkpoints; reused until it dies."""

    def __init__(self, threads: int, offline: bool = False):
        if offline:  # before huggingface_hub, datasets or nltk are imported in this process
            from ray_jobs.eval.lm_eval.adapter import offline_environment

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
        with library_output_to(Path(request.run_dir) / "logs" / LIBRARY_LOG):
            return (fn or evaluate_request)(request)
