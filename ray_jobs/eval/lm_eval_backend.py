"""ringpilot as an lm-evaluation-harness model backend; lm-eval's RULER tasks for one checkpoint.

lm-eval (the optional `eval` extra) generates RULER's data with the checkpoint's own tokenizer and
scores it with RULER's metrics; ringpilot only answers. Nothing of lm-eval's or RULER's code is
copied here: this module depends on the package and imports it lazily, so the rest of ringpilot
loads without it.

    python -m ray_jobs.eval.lm_eval_backend --checkpoint DIR --tasks niah_single_1 ruler_vt \\
        --lengths 4096 8192 --limit 25 --out OUT_DIR
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import statistics
import time
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from specs.run import RulerTask

MODEL_NAME = "ringpilot"
# Test-only backends: they never look at a checkpoint's weights. The oracle reads each answer out
# of the prompt (so a score below 100 means prompts, answers and scoring do not line up); the
# constant one always says the same thing (so the harness can fail).
ORACLE_NAME = "ringpilot-test-oracle"
CONSTANT_NAME = "ringpilot-test-constant"

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
Z95 = 1.959964  # two-sided 95% normal quantile


class LmEvalMissing(ImportError):
    """lm-eval (with its RULER requirements) is not installed."""


class RulerInputError(ValueError):
    """A request that cannot be run: unknown task, length, missing chat template..."""


def offline_environment() -> None:
    """Keep lm-eval's RULER tasks off the network, before huggingface_hub, datasets or nltk are
    imported (they read these at import): the hub in offline mode (tasks needing a download fail
    at once with the reason instead of ~25 s of retries each), and an empty `punkt_tab` on
    NLTK_DATA, because importing lm-eval's NIAH module downloads nltk's sentence splitter when
    it finds none. Only the essay haystacks use it, and they are downloads themselves."""
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    stub = Path(tempfile.gettempdir()) / "ringpilot-nltk-offline"
    (stub / "tokenizers" / "punkt_tab").mkdir(parents=True, exist_ok=True)
    paths = os.environ.get("NLTK_DATA", "").split(os.pathsep)
    if str(stub) not in paths:
        os.environ["NLTK_DATA"] = os.pathsep.join([p for p in paths if p] + [str(stub)])


def require_lm_eval():
    """The `lm_eval` module, or one clear error naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.api.registry  # noqa: F401
    except ImportError as e:
        raise LmEvalMissing(
            f"lm-evaluation-harness is not installed ({e}); install ringpilot's `eval` extra: "
            "pip install -e '.[eval]' (it brings lm-eval[ruler])") from e
    return lm_eval


# -- the backends -----------------------------------------------------------------------------

def _stop_at(text: str, until: Sequence[str]) -> str:
    """`text` cut before the earliest stop sequence it contains."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def _gen_settings(gen_kwargs: dict, default_max: int) -> tuple[list[str], int]:
    if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 1.0) or 0) > 0:
        raise RulerInputError("the ringpilot backend decodes greedily only; this task asks for "
                              f"sampling ({gen_kwargs})")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return until, int(gen_kwargs.get("max_gen_toks", default_max))


class _CheckpointModel:
    """A checkpoint's model and tokenizer, answering lm-eval's requests (greedy decoding)."""

    def __init__(self, pretrained: str, device: str = "cpu", max_gen_toks: int = 256,
                 long_generate: Callable | None = None, max_local: int | None = None):
        from ray_jobs.eval.model import load_checkpoint, max_model_length

        # Prompts longer than `max_local` tokens go to `long_generate`
        # (ids, max_new_tokens, eos) -> new ids: an evaluation gang (ray_jobs.eval.gang).
        self.long_generate, self.max_local = long_generate, max_local
        self.path = str(pretrained)
        self.model, self.tokenizer = load_checkpoint(pretrained, device)
        self.max_length = max_model_length(pretrained)
        self.max_gen_toks = max_gen_toks
        self.warned = False
        self.torch_device = next(self.model.parameters()).device

    def encode(self, text: str, *, with_bos: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        bos, bos_text = self.tokenizer.bos_token_id, self.tokenizer.bos_token
        # as ringpilot's trainer starts every sequence (unless a chat template already wrote it)
        if with_bos and bos is not None and not (bos_text and text.startswith(bos_text)):
            ids = [bos] + ids
        return ids

    def _check_fits(self, n: int, what: str) -> None:
        """Warn (once) past max_position_embeddings. Not an error: RULER sizes a prompt without
        lm-eval's gen_prefix, so a prompt at the checkpoint's own length can run a few tokens
        over; lengths above the checkpoint's are refused up front (prepare_tasks)."""
        if self.max_length and n > self.max_length and not self.warned:
            self.warned = True
            logging.getLogger(__name__).warning(
                "%s needs %d positions; checkpoint %s has max_position_embeddings=%d",
                what, n, self.path, self.max_length)

    def generate(self, context: str, gen_kwargs: dict) -> str:
        import torch

        from ray_jobs.eval.model import greedy_tokens

        until, max_new = _gen_settings(gen_kwargs, self.max_gen_toks)
        ids = self.encode(context)
        self._check_fits(len(ids) + max_new, f"a prompt of {len(ids)} tokens plus {max_new} "
                                              "generated")
        eos = self.tokenizer.eos_token_id
        if (self.long_generate is not None and self.max_local is not None
                and len(ids) > self.max_local):
            new = self.long_generate(ids, max_new, eos)
        else:
            new = greedy_tokens(self.model, torch.tensor([ids], device=self.torch_device),
                                max_new, eos)
        return _stop_at(self.tokenizer.decode(new, skip_special_tokens=True), until)

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        import torch

        ctx = self.encode(context)
        if not ctx:  # no BOS and an empty context: condition on the end-of-text token
            ctx = [self.tokenizer.eos_token_id]
        cont = self.tokenizer(continuation, add_special_tokens=False).input_ids
        if not cont:
            return 0.0, True
        self._check_fits(len(ctx) + len(cont), "a loglikelihood request")
        ids = torch.tensor([ctx + cont], device=self.torch_device)
        with torch.inference_mode():
            # logits at positions len(ctx)-1 .. end-1 predict the continuation's tokens
            logits = self.model(input_ids=ids, logits_to_keep=len(cont) + 1).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(cont, device=logp.device)
        total = float(logp.gather(1, target[:, None]).sum())
        return total, bool((logp.argmax(-1) == target).all())

    def chat_template(self) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise RulerInputError(
                f"a chat template was asked for, but the tokenizer of checkpoint {self.path} has "
                "none (no chat_template in tokenizer_config.json); run without it")
        return template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        self.chat_template()
        # with lm-eval's gen_prefix the last message is the assistant's opening: continue it
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)


def _answer_from_prompt(prompt: str) -> str:
    """The answer to a RULER prompt, read from the prompt alone (test-only oracle)."""
    needle = re.compile(r"One of the special magic \w+ for (.+?) is: (.+?)\.(?=\s|$)")
    asked = re.search(r"(?:What are all|What is) the special magic \w+ for (.+?) mentioned in "
                      r"the provided text\?", prompt)
    if asked:
        keys = re.split(r", and |, ", asked.group(1))
        found: dict[str, list[str]] = {}
        for key, value in needle.findall(prompt[:asked.start()]):
            found.setdefault(key, []).append(value)
        return " " + ", ".join(v for k in keys for v in found.get(k, [])) + "."
    if "Find all variables that are assigned the value" in prompt:
        task = prompt[prompt.rfind("Memorize and track the chain"):]
        value = re.findall(r"assigned the value (\d+)", task)[-1]
        names, assign, changed = [], re.findall(r"VAR (\w+) = (VAR \w+|\d+)", task), True
        while changed:
            changed = False
            for var, rhs in assign:
                if var not in names and (rhs == value or rhs.removeprefix("VAR ") in names):
                    names.append(var)
                    changed = True
        return " " + " ".join(names)
    if "What are the 10 most common words in the above list?" in prompt:
        body = prompt[prompt.find("\n") + 1:prompt.rfind("\nQuestion:")]
        words = [w.strip() for w in re.split(r"(?:^|\s)\d+\. ", body) if w.strip()]
        return " " + " ".join(f"{i}. {w}" for i, (w, _) in
                              enumerate(Counter(words).most_common(10), 1))
    if "three most frequently appeared coded words" in prompt:
        body = prompt[prompt.find("coded words.") + len("coded words."):prompt.rfind("\nQuestion:")]
        counts = Counter(w for w in body.split() if w != "...")
        return " " + ", ".join(w for w, _ in counts.most_common(3))
    raise RulerInputError(f"the test oracle does not know this prompt: ...{prompt[-300:]!r}")


@functools.cache
def register_backends() -> dict[str, type]:
    """Define and register (once) the lm-eval model classes: `ringpilot` and the two test-only
    ones. Returns {name: class}."""
    require_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class RingpilotLM(LM):
        """A ringpilot checkpoint (`pretrained`: its local directory) as an lm-eval model."""

        def __init__(self, pretrained: str, device: str | None = None,
                     max_gen_toks: int = 256, long_generate: Callable | None = None,
                     max_local: int | None = None, **_ignored):
            super().__init__()
            self.ckpt = _CheckpointModel(pretrained, device or "cpu", int(max_gen_toks),
                                         long_generate, max_local)
            self._device = self.ckpt.torch_device

        @property
        def tokenizer_name(self) -> str:
            return self.ckpt.path.replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.ckpt.chat_template() if chat_template else None

        def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
            return self.ckpt.apply_chat_template(chat_history, add_generation_prompt)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, gen_kwargs = req.args
                out.append(self.ckpt.generate(context, dict(gen_kwargs)))
                self.cache_hook.add_partial("generate_until", req.args, out[-1])
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [self.ckpt.loglikelihood(*req.args) for req in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError(
                "the ringpilot backend does not implement loglikelihood_rolling (perplexity "
                "tasks); RULER needs generate_until only")

    class _TextOnlyLM(LM):
        answer: Callable[[str], str]

        def __init__(self, **_ignored):
            super().__init__()

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return [_stop_at(type(self).answer(r.args[0]), _gen_settings(dict(r.args[1]), 0)[0])
                    for r in requests]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("test-only backend: generate_until only")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("test-only backend: generate_until only")

    class RulerTestOracle(_TextOnlyLM):
        """TEST ONLY: answers each RULER prompt by reading the asked values out of it."""

        answer = staticmethod(_answer_from_prompt)

    class ConstantTestLM(_TextOnlyLM):
        """TEST ONLY: always the same answer."""

        answer = staticmethod(lambda prompt: " I do not know, maybe 42.")

    classes = {MODEL_NAME: RingpilotLM, ORACLE_NAME: RulerTestOracle,
               CONSTANT_NAME: ConstantTestLM}
    for name, cls in classes.items():
        register_model(name)(cls)
    return classes


# -- running RULER for one checkpoint ---------------------------------------------------------

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


def prepare_tasks(checkpoint: str | Path, tasks: Sequence[str], lengths: Sequence[int], *,
                  apply_chat_template: bool = False) -> PreparedTasks:
    """Check the request and generate each task's data with the checkpoint's tokenizer; tasks
    whose data cannot be made here (downloads) are set aside with the reason."""
    require_lm_eval()
    from ray_jobs.data.tokenizer import load_tokenizer
    from ray_jobs.eval.model import max_model_length
    from specs.checkpoint import check_checkpoint

    checkpoint = str(check_checkpoint(checkpoint))
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
    manager = _task_manager(names, {"max_seq_lengths": lengths, "pretrained": checkpoint})
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
            unavailable[name] = f"{DOWNLOADS[name]}; here: {why}" if name in DOWNLOADS else why
    return PreparedTasks(checkpoint, lengths, manager, built, unavailable)


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
                         *, apply_chat_template: bool = False) -> PreparedTasks:
    """`prepare_tasks`, reusing the data generated for an earlier checkpoint with the same
    tokenizer (a run's checkpoints share theirs), so an evaluation actor generates RULER's data
    once per run instead of once per checkpoint. The checks of the request still run."""
    import dataclasses
    import hashlib

    from ray_jobs.eval.model import max_model_length
    from specs.checkpoint import check_checkpoint

    path = check_checkpoint(checkpoint)
    digest = hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest()
    key = (digest, tuple(dict.fromkeys(tasks)), tuple(sorted(set(lengths))),
           apply_chat_template)
    cached = _PREPARED.get(key)
    top = max_model_length(path)
    if cached is None or (top and max(lengths) > top):
        cached = _PREPARED[key] = prepare_tasks(path, tasks, lengths,
                                                apply_chat_template=apply_chat_template)
    return dataclasses.replace(cached, checkpoint=str(path))


def evaluate_prepared(prepared: PreparedTasks, out_dir: str | Path, *, limit: int | None = None,
                      model: str | type = MODEL_NAME, apply_chat_template: bool = False,
                      device: str = "cpu", lengths: Sequence[int] | None = None,
                      long_generate: Callable | None = None,
                      max_local: int | None = None) -> RulerReport:
    """lm_eval.simple_evaluate over the prepared tasks with the registered backend `model`
    (`ringpilot`; the test-only ones, or an lm-eval LM class, for checks), `limit` samples per
    task and length (`lengths`: a subset of the prepared ones); writes lm-eval's results to
    OUT_DIR/lm_eval_results.json (its logged samples beside it) and OUT_DIR/ruler_table.json, and
    returns the per-length table. `long_generate`: what generates for prompts longer than
    `max_local` tokens (an evaluation gang), with the ringpilot backend."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    start = time.perf_counter()
    if not prepared.tasks:
        raise RulerInputError(f"none of the tasks could run here: {prepared.unavailable}")
    classes = register_backends()
    if isinstance(model, str) and model not in classes:
        raise RulerInputError(f"unknown backend {model!r}; one of {sorted(classes)}")
    lengths = sorted(set(lengths or prepared.lengths))
    if not set(lengths) <= set(prepared.lengths):
        raise RulerInputError(f"lengths {lengths} were not all prepared ({prepared.lengths})")
    samples = {name: _first_per_length(task.eval_docs, limit, lengths)
               for name, task in prepared.tasks.items()}
    cls = classes[model] if isinstance(model, str) else model
    extra = ({"long_generate": long_generate, "max_local": max_local}
             if long_generate is not None else {})
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


def run_ruler(checkpoint: str | Path, tasks: Sequence[str], lengths: Sequence[int],
              out_dir: str | Path, *, limit: int | None = None, model: str = MODEL_NAME,
              apply_chat_template: bool = False, device: str = "cpu") -> RulerReport:
    """lm-eval's `tasks` at `lengths` for one checkpoint: prepare_tasks, then
    evaluate_prepared."""
    prepared = prepare_tasks(checkpoint, tasks, lengths, apply_chat_template=apply_chat_template)
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


# -- command line -------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Print the per-length RULER table of one checkpoint (lm-eval's own output on stderr)."""
    import argparse
    import contextlib
    import sys

    from specs.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.eval.lm_eval_backend",
        description="lm-eval's RULER tasks on one ringpilot checkpoint, per length as RULER "
                    "publishes (tasks whose data must be downloaded are listed when offline)")
    parser.add_argument("--checkpoint", required=True, help="a committed checkpoint directory")
    parser.add_argument("--tasks", nargs="+", default=list(RULER_TASKS),
                        help="lm-eval task names (default: RULER's 13)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096],
                        help="context lengths in tokens (default: 4096)")
    parser.add_argument("--limit", type=int, default=None,
                        help="samples per task and length (default: all 500)")
    parser.add_argument("--out", default="ruler_results",
                        help="folder for lm-eval's results JSON and the table")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--online", action="store_true", help="let lm-eval download what "
                        "tasks need (essay haystacks, QA sets, nltk's punkt); default: offline")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--verbose", action="store_true", help="lm-eval's own log messages")
    args = parser.parse_args(argv)
    if not args.online:  # in effect for modules not imported yet (`python -m` imports none)
        offline_environment()
    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        # lm-eval's generators print progress: keep stdout for the table
        with contextlib.redirect_stdout(sys.stderr):
            report = run_ruler(args.checkpoint, args.tasks, args.lengths, args.out,
                               limit=args.limit, apply_chat_template=args.chat_template,
                               device=args.device)
    except (LmEvalMissing, RulerInputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
