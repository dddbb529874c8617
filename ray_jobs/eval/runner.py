"""Run the evaluation grid (task x length x depth x sample) with any `Generate` and save results."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ray_jobs.eval import tasks as task_lib
from ray_jobs.eval.model import Generate
from ray_jobs.eval.report import save_results
from ray_jobs.eval.results import CellResult, EvalResults, SampleResult, Skipped
from ray_jobs.eval.scoring import score
from specs.eval_tasks import DEPTH_TASKS, KAMRADT_TASK

# One evaluator runs the whole sequence on one device with SDPA up to this length; longer
# contexts run on an evaluation gang (ray_jobs.eval.gang) when one is configured, else they are
# skipped and the reason is written into results.json. 32K tokens keeps an 8B Llama's weights
# (16 GB bf16) plus its KV cache (~4 GB) well inside one 48 GB L40S.
MAX_TOKENS_PER_EVALUATOR = 32_768


def plan_lengths(stage_lengths: Sequence[int], stage_index: int, given: Sequence[int]) -> list[int]:
    """Context lengths for a checkpoint of stage `stage_index`: the given ones, or that stage's
    seq_len and every shorter stage length before it."""
    if given:
        return sorted(set(given))
    return sorted(set(stage_lengths[: stage_index + 1]))


def run_grid(results: EvalResults, generate: Generate, count_tokens: Callable[[str], int],
             on_cell: Callable[[CellResult], None] | None = None,
             long_generate: Generate | None = None, long_engine: str = "",
             long_unavailable: str = "", kamradt: task_lib.Kamradt | None = None
             ) -> EvalResults:
    """Fill `results` (its tasks/lengths/depths/samples/seed say what to run) by scoring every
    sample's greedy output. Lengths up to `max_length` run on `generate` (one evaluator); longer
    ones on `long_generate` (an evaluation gang, `long_engine` names it) when given, else they
    are skipped with `long_unavailable` (or the default reason). Cells too short for a task are
    skipped too; every skip is recorded with its reason."""
    for length in results.lengths:
        engine, gen = "one evaluator", generate
        if length > results.max_length:
            if long_generate is None:
                results.skipped.append(Skipped(task="*", length=length, reason=long_unavailable or (
                    f"longer than the {results.max_length} tokens one evaluator runs on one "
                    "device, and no evaluation gang was configured (eval.gang_size, "
                    "--gang-size)")))
                continue
            engine, gen = long_engine or "evaluation gang", long_generate
        results.engines[str(length)] = engine
        for task in results.tasks:
            depths = (results.task_depths.get(task, results.depths)
                      if task in DEPTH_TASKS else [None])
            for depth in depths:
                try:
                    samples = task_lib.build_samples(task, length, depth, results.samples,
                                                     results.seed, count_tokens, kamradt)
                except ValueError as e:
                    results.skipped.append(Skipped(task=task, length=length, reason=str(e)))
                    break
                scores = []
                for s in samples:
                    output = gen(s.prompt, s.max_new_tokens)
                    value = score(s.metric, output, s.answers)
                    scores.append(value)
                    results.outputs.append(SampleResult(
                        task=task, length=length, depth=depth, index=s.index,
                        prompt_tokens=s.prompt_tokens, answers=list(s.answers), output=output,
                        score=value))
                cell = CellResult(task=task, length=length, depth=depth,
                                  score=statistics.fmean(scores), samples=len(scores),
                                  engine=engine)
                results.cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
    for task in results.tasks:
        values = [o.score for o in results.outputs if o.task == task]
        if values:
            results.scores[task] = statistics.fmean(values)
    results.finished_unix = time.time()
    return results


def evaluate(generate: Generate, count_tokens: Callable[[str], int], *, checkpoint: str,
             stage: str | None = None, step: int | None = None, tasks: Sequence[str],
             lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int,
             max_length: int = MAX_TOKENS_PER_EVALUATOR, out_dir: Path | None = None,
             on_cell: Callable[[CellResult], None] | None = None,
             long_generate: Generate | None = None, long_engine: str = "",
             long_unavailable: str = "", gang: dict | None = None,
             kamradt: task_lib.Kamradt | None = None, kamradt_intervals: int = 11,
             haystack_files: Sequence[str] = ()) -> EvalResults:
    """Run the grid and, with `out_dir`, write results.json, the heatmaps and tables.md (see
    run_grid for the contexts longer than `max_length`). `stage` and `step` are the caller's
    (the ledger's, for a ringpilot checkpoint; None for any other model). With `kamradt`, Kamradt's
    needle-in-a-haystack test runs too, on his depth grid of `kamradt_intervals` depths."""
    if kamradt is not None and KAMRADT_TASK not in tasks:
        tasks = [*tasks, KAMRADT_TASK]
    results = EvalResults(checkpoint=str(checkpoint), stage=stage, step=step, tasks=list(tasks),
                          lengths=sorted(set(lengths)), depths=list(depths), samples=samples,
                          seed=seed, max_length=max_length, gang=gang,
                          started_unix=time.time())
    if kamradt is not None:
        results.task_depths[KAMRADT_TASK] = task_lib.kamradt_depths(kamradt_intervals)
        results.kamradt = {"needle": kamradt.needle, "question": kamradt.question,
                           "key_phrases": list(kamradt.key_phrases),
                           "haystack_files": list(haystack_files),
                           "haystack_chars": len(kamradt.haystack)}
    run_grid(results, generate, count_tokens, on_cell, long_generate, long_engine,
             long_unavailable, kamradt)
    if out_dir is not None:
        save_results(results, out_dir)
    return results
