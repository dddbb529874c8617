"""lm-eval's RULER tasks on one checkpoint, reported per length as RULER publishes them.

lm-eval generates each task's data with the checkpoint's own tokenizer, the ringpilot backend
(adapter.py) answers, and RULER's metrics score; the table is the mean over tasks x 100 per
length, with its samples and a 95% interval.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import statistics
import time
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ray_jobs.eval.lm_eval.adapter import (
    MODEL_NAME,
    RulerInputError,
    register_backend,
    require_lm_eval,
)
from ray_jobs.eval.lm_eval.offline_data import check_data_dir, local_sources
from specs.run import RulerTask

# lm-eval's 13 RULER tasks, as lm-eval spells them (the `ruler` group of lm_eval/tasks/ruler/).
RULER_TASKS: tuple[str, ...] = typing.get_args(RulerTask)
# What those that cannot be generated from the tokenizer alone fetch (read in lm-eval 0.4.13's
# lm_eval/tasks/ruler/: prepare_niah.get_haystack("essay"), qa_utils).
_ESSAYS = ("its haystack is Paul Graham's essays, which lm-eval loads from the Hugging Face hub "
           "(datasets.load_dataset('baber/paul_graham_essays'))")
DOWNLOADS = {
    **{t: _ESSAYS for t in ("niah_single_2", "niah_single_3", "niah_multikey_1",
                            "niah_multiquery", "niah_multivalue")},
    "ruler_qa_squad": "its documents and questions are SQuAD v2's dev set, which lm-eval "
                      "downloads from rajpurkar.github.io",
    "ruler_qa_hotpot": "its documents and questions are HotpotQA's dev set, which lm-eval loads "
                       "from the Hugging Face hub",
}
NO_DATA_DIR = "; give eval.data_dir (`ringpilot eval fetch-data DIR` builds it) to run it offline"
Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class LengthRow:
    """One row of the table as RULER publishes it: a length, the mean over tasks x 100."""

    length: int
    score: float  # mean over the tasks of each task's mean sample score, x 100
    ci95: float  # half-width of a 95% normal-approximation interval around `score`
    samples: int  # scored samples at this length, all tasks together
    tasks: dict[str, float]  # task -> its mean x 100 (lm-eval's own aggregate)


@dataclass
class RulerReport:
    checkpoint: str
    lengths: list[int]
    rows: list[LengthRow]
    unavailable: dict[str, str] = field(default_factory=dict)  # task -> why it did not run
    results_path: str | None = None  # lm-eval's results JSON
    seconds: float = 0.0

    def table(self) -> str:
        tasks = sorted({t for r in self.rows for t in r.tasks})
        lines = [f"RULER (lm-eval) for {self.checkpoint}: mean over {len(tasks)} task(s) x 100",
                 f"{'length':>8} {'score':>7} {'95% CI':>13} {'samples':>8}  per task"]
        for r in self.rows:
            per = ", ".join(f"{t} {s:.1f}" for t, s in r.tasks.items())
            lines.append(f"{r.length:>8} {r.score:7.1f} {f'+/- {r.ci95:.1f}':>13} "
                         f"{r.samples:>8}  {per}")
        for task, why in self.unavailable.items():
            lines.append(f"not run: {task}: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "lengths": self.lengths,
                "rows": [r.__dict__ for r in self.rows], "unavailable": self.unavailable,
                "results_path": self.results_path, "seconds": self.seconds}


def _check_vt_tokenizer(tokenizer, lengths: Sequence[int]) -> None:
    """lm-eval 0.4.13's ruler_vt (vt_utils.sys_vartrack_w_noise_random) loops forever, printing,
    when a sample does not fit: first its worked example (five noise sentences, the template and
    one chain) in 500 tokens, then each sample (ten noise sentences and one chain, 30 tokens to
    generate, the worked example) in the context length. Refuse here what would not fit."""
    import contextlib
    import os
    import random

    import numpy as np
    from lm_eval.tasks.ruler import vt_utils

    def tokens(text: str) -> int:
        return len(tokenizer(text).input_ids)

    # leave the data lm-eval generates next as they would be without this check
    state, np_state = random.getstate(), np.random.get_state()
    try:
        text, answer = vt_utils.generate_input_output(5, 1, 4, is_icl=True)
        example = tokens(text + " " + " ".join(answer)) + 30
        if example > 500:
            raise RulerInputError(
                f"ruler_vt cannot run with this tokenizer: its worked example takes {example} "
                "tokens with lm-eval's 500-token budget for it (lm-eval would loop forever); use "
                "a tokenizer with a vocabulary for English text")
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            icl = vt_utils.sys_vartrack_w_noise_random(tokenizer, num_samples=1,
                                                       max_seq_length=500, incremental=5)[0]
        shot = tokens(icl["input"] + " " + " ".join(icl["outputs"]) + "\n\n")
        # as lm-eval sizes it: the input and its answer list, 30 to generate, the example;
        # 5 % of margin for the random variable names it draws
        text, answer = vt_utils.generate_input_output(10, 1, 4, is_icl=False)
        smallest = int(1.05 * (tokens(text + f" {answer}") + 30 + shot))
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    if smallest > min(lengths):
        raise RulerInputError(
            f"ruler_vt cannot run at {min(lengths):,} tokens with this tokenizer: its smallest "
            f"sample (worked example, ten noise sentences, one chain, 30 tokens to generate) "
            f"takes {smallest:,} (lm-eval would loop forever); run it from "
            f"{smallest:,} tokens up (ruler.min_length) or use a tokenizer with a vocabulary "
            "for English text")


def length_rows(results: dict, lengths: Sequence[int]) -> list[LengthRow]:
    """Per length: lm-eval's per-task aggregate, their mean x 100, sample count and a 95% CI
    (normal approximation: the tasks' sample means are independent, so the variance of their
    average is the sum of var/n over tasks, divided by the number of tasks squared)."""
    rows = []
    for length in lengths:
        key = str(length)
        per_task, var_sum, n_all = {}, 0.0, 0
        for task, logged in results["samples"].items():
            scores = [float(s[key]) for s in logged
                      if s["doc"]["max_length"] == length and key in s]
            if not scores:
                continue
            aggregate = results["results"][task][f"{key},none"]
            per_task[task] = 100.0 * aggregate
            n_all += len(scores)
            if len(scores) > 1:
                var_sum += statistics.variance(scores) / len(scores)
        if per_task:
            k = len(per_task)
            rows.append(LengthRow(length, sum(per_task.values()) / k,
                                  100.0 * Z95 * math.sqrt(var_sum) / k, n_all, per_task))
    return rows


@dataclass
class PreparedTasks:
    """lm-eval's tasks with their data generated for one checkpoint's tokenizer and lengths
    (generation is the slow part: RULER makes 500 samples per task and length)."""

    checkpoint: str
    lengths: list[int]
    manager: object  # lm_eval.tasks.TaskManager
    tasks: dict  # name -> lm_eval Task, data generated
    unavailable: dict[str, str]  # name -> why its data could not be made here


def _task_manager(names: Sequence[str], metadata: dict):
    """A TaskManager indexing only lm-eval's RULER folder when that is all that is asked (the
    full index of ~15K tasks takes seconds); else the full one. Unknown names: one clear error."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    if all(n in RULER_TASKS for n in names):
        ruler_dir = Path(lm_eval.tasks.__file__).parent / "ruler"
        return TaskManager(include_path=ruler_dir, include_defaults=False,
                           metadata=metadata)
    manager = TaskManager(metadata=metadata)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise RulerInputError(f"unknown lm-eval task(s) {unknown}; RULER's are {list(RULER_TASKS)}"
                              f" ({len(manager.all_tasks)} tasks in all: `lm-eval ls tasks`)")
    return manager


def tokenizer_folder(tokenizer, parent: str | Path) -> Path:
    """`tokenizer` (as ringpilot loaded it, PreTrainedTokenizerFast: no code) saved alone into a
    new folder under `parent`, for lm-eval's RULER generators: they load their tokenizer by path
    with `AutoTokenizer.from_pretrained(path, trust_remote_code=True)` (lm-eval 0.4.13,
    tasks/ruler/common_utils.py: get_tokenizer) and take no argument to turn that off. This folder
    holds only the tokenizer files ringpilot wrote, with no `auto_map`, so there is no code for
    that call to run; its name carries the files' digest because lm-eval caches tokenizers by
    path."""
    import hashlib
    import tempfile

    from specs.trust import check_checkpoint_is_data

    staging = Path(tempfile.mkdtemp(prefix="tokenizer-", dir=parent))
    tokenizer.save_pretrained(staging)
    config_path = staging / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("auto_map", "custom_pipelines"):  # refused upstream; never written onwards
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    digest = hashlib.sha256()
    for f in sorted(staging.iterdir()):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    folder = staging.with_name(f"{staging.name}-{digest.hexdigest()[:16]}")
    staging.rename(folder)
    return check_checkpoint_is_data(folder)


def prepare_tasks(checkpoint: str | Path, tasks: Sequence[str], lengths: Sequence[int], *,
                  apply_chat_template: bool = False,
                  data_dir: str | Path | None = None) -> PreparedTasks:
    """Check the request and generate each task's data with the checkpoint's tokenizer; tasks
    whose data cannot be made here (downloads) are set aside with the reason. The checkpoint is
    refused if it carries code (specs/trust.py), and lm-eval only ever sees a code-free copy of
    the tokenizer ringpilot loaded (`tokenizer_folder`), never the checkpoint's path.
    `data_dir` (eval.data_dir, offline_data.py): what the essay and QA tasks would download,
    checked before anything is generated."""
    require_lm_eval()
    import shutil
    import tempfile

    from ray_jobs.data.tokenizer import load_tokenizer
    from ray_jobs.eval.model import max_model_length
    from specs.checkpoint import check_checkpoint
    from specs.trust import check_checkpoint_is_data

    checkpoint = str(check_checkpoint_is_data(check_checkpoint(checkpoint)))
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] <= 0:
        raise RulerInputError(f"lengths must be positive token counts, got {lengths}")
    if not tasks:
        raise RulerInputError(f"no task given; RULER's are {list(RULER_TASKS)}")
    top = max_model_length(checkpoint)
    if top and lengths[-1] > top:
        raise RulerInputError(f"length {lengths[-1]} is above what checkpoint {checkpoint} holds "
                              f"(max_position_embeddings={top})")
    tokenizer = load_tokenizer(checkpoint)
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise RulerInputError(f"a chat template was asked for, but the tokenizer of checkpoint "
                              f"{checkpoint} has none; run without it")
    names = list(dict.fromkeys(tasks))
    data = check_data_dir(data_dir, names) if data_dir is not None else None
    private = tempfile.mkdtemp(prefix="ringpilot-lm-eval-")  # mode 0700: this user's only
    try:
        manager = _task_manager(names, {"max_seq_lengths": lengths,
                                        "tokenizer": str(tokenizer_folder(tokenizer, private))})
        with local_sources(data) if data else contextlib.nullcontext():
            built, unavailable = _load_tasks(manager, names, tokenizer, lengths, data)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return PreparedTasks(checkpoint, lengths, manager, built, unavailable)


def _load_tasks(manager, names: list[str], tokenizer, lengths: list[int], data=None
                ) -> tuple[dict, dict[str, str]]:
    """(task name -> lm-eval Task with its data generated, task name -> why it could not be)."""
    # seeded as lm_eval.simple_evaluate seeds before it loads tasks: the same samples as
    # `lm-eval run --tasks ...` with this tokenizer
    import random

    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    built, unavailable = {}, {}
    for name in names:
        try:
            if name == "ruler_vt":
                _check_vt_tokenizer(tokenizer, lengths)
            # lm-eval's generators print a line per try; keep them out of the run's log
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                loaded = manager.load([name])["tasks"]
            for task_name, task in loaded.items():
                _check_answers(task_name, task.eval_docs)
            built.update(loaded)
        except RulerInputError as e:
            unavailable[name] = str(e)
        except Exception as e:  # noqa: BLE001 - a task that cannot make its data is reported
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            why = f"{type(e).__name__}: {first}"
            unavailable[name] = (f"{DOWNLOADS[name]}; here: {why}{'' if data else NO_DATA_DIR}"
                                 if name in DOWNLOADS else why)
    return built, unavailable


def _check_answers(name: str, docs) -> None:
    """Refuse a task whose generated samples expect no answer: lm-eval 0.4.13's ruler_cwe
    makes such samples with a small-vocabulary tokenizer, and RULER's string_match_all then
    divides by zero when scoring them."""
    empty = sum(1 for d in docs if not d.get("outputs"))
    if empty:
        raise RulerInputError(
            f"lm-eval generated {empty} of {len(docs)} {name} samples with no expected answer "
            "for this tokenizer (RULER's scorer cannot score them); use a tokenizer with a "
            "vocabulary for English text")


_PREPARED: dict[tuple, PreparedTasks] = {}


def prepare_tasks_cached(checkpoint: str | Path, tasks: Sequence[str], lengths: Sequence[int],
                         *, apply_chat_template: bool = False,
                         data_dir: str | Path | None = None) -> PreparedTasks:
    """`prepare_tasks`, reusing the data generated for an earlier checkpoint with the same
    tokenizer (a run's checkpoints share theirs), so an evaluation actor generates RULER's data
    once per run instead of once per checkpoint. The checks of the request still run."""
    import dataclasses
    import hashlib

    from ray_jobs.eval.model import max_model_length
    from specs.checkpoint import check_checkpoint
    from specs.trust import check_checkpoint_is_data

    path = check_checkpoint_is_data(check_checkpoint(checkpoint))  # a hit is checked too
    digest = hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest()
    key = (digest, tuple(dict.fromkeys(tasks)), tuple(sorted(set(lengths))),
           apply_chat_template, None if data_dir is None else str(data_dir))
    cached = _PREPARED.get(key)
    top = max_model_length(path)
    if cached is None or (top and max(lengths) > top):
        cached = _PREPARED[key] = prepare_tasks(path, tasks, lengths,
                                                apply_chat_template=apply_chat_template,
                                                data_dir=data_dir)
    return dataclasses.replace(cached, checkpoint=str(path))


def evaluate_prepared(prepared: PreparedTasks, out_dir: str | Path, *, limit: int | None = None,
                      model: str | type = MODEL_NAME, apply_chat_template: bool = False,
                      device: str = "cpu", lengths: Sequence[int] | None = None,
                      long_generate: Callable | None = None,
                      max_local: int | None = None,
                      compute_dtype: str = "float32") -> RulerReport:
    """lm_eval.simple_evaluate over the prepared tasks with the registered backend `model`
    (`ringpilot`; another registered name, or an lm-eval LM class, for checks), `limit` samples per
    task and length (`lengths`: a subset of the prepared ones); writes lm-eval's results to
    OUT_DIR/lm_eval_results.json (its logged samples beside it) and OUT_DIR/ruler_table.json, and
    returns the per-length table. `long_generate`: what generates for prompts longer than
    `max_local` tokens (an evaluation gang), with the ringpilot backend."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    start = time.perf_counter()
    if not prepared.tasks:
        raise RulerInputError(f"none of the tasks could run here: {prepared.unavailable}")
    cls = backend_class(model) if isinstance(model, str) else model
    lengths = sorted(set(lengths or prepared.lengths))
    if not set(lengths) <= set(prepared.lengths):
        raise RulerInputError(f"lengths {lengths} were not all prepared ({prepared.lengths})")
    samples = {name: _first_per_length(task.eval_docs, limit, lengths)
               for name, task in prepared.tasks.items()}
    extra = ({"long_generate": long_generate, "max_local": max_local}
             if long_generate is not None else {})
    if compute_dtype != "float32":  # the run's: the backend loads bf16 on CUDA, as evaluators do
        extra["compute_dtype"] = compute_dtype
    lm = cls(pretrained=prepared.checkpoint, device=device, **extra)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(prepared.tasks.values()), task_manager=prepared.manager,
        samples=samples, apply_chat_template=apply_chat_template, log_samples=True,
        bootstrap_iters=0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump = functools.partial(json.dumps, default=handle_non_serializable, ensure_ascii=False)
    path = out / "lm_eval_results.json"
    path.write_text(dump({k: v for k, v in results.items() if k != "samples"}, indent=2) + "\n")
    for task, logged in results["samples"].items():
        (out / f"lm_eval_samples_{task}.jsonl").write_text(
            "".join(dump(s) + "\n" for s in logged))
    report = RulerReport(prepared.checkpoint, lengths, length_rows(results, lengths),
                         dict(prepared.unavailable),
                         str(path), time.perf_counter() - start)
    (out / "ruler_table.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def backend_class(name: str) -> type:
    """The lm-eval model class registered as `name` (`ringpilot` is registered here; others by
    whoever defines them), or one clear error."""
    from lm_eval.api.registry import get_model

    register_backend()
    try:
        return get_model(name)
    except ValueError:
        raise RulerInputError(f"unknown backend {name!r}: ringpilot's is {MODEL_NAME!r}; register "
                              "another lm-eval LM class under its name first") from None


def run_ruler(checkpoint: str | Path, tasks: Sequence[str], lengths: Sequence[int],
              out_dir: str | Path, *, limit: int | None = None, model: str = MODEL_NAME,
              apply_chat_template: bool = False, device: str = "cpu",
              data_dir: str | Path | None = None) -> RulerReport:
    """lm-eval's `tasks` at `lengths` for one checkpoint: prepare_tasks, then
    evaluate_prepared."""
    prepared = prepare_tasks(checkpoint, tasks, lengths, apply_chat_template=apply_chat_template,
                             data_dir=data_dir)
    return evaluate_prepared(prepared, out_dir, limit=limit, model=model,
                             apply_chat_template=apply_chat_template, device=device)


def _first_per_length(docs, limit: int | None, lengths: Sequence[int]) -> list[int]:
    """Indices of the first `limit` documents of each of `lengths` (lm-eval's own `limit` takes
    the first documents overall, which are all of the first length)."""
    seen: Counter = Counter()
    keep = []
    for i, doc in enumerate(docs):
        n = doc["max_length"]
        if n in lengths and (limit is None or seen[n] < limit):
            seen[n] += 1
            keep.append(i)
    return keep
