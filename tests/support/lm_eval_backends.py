"""Test-only lm-eval backends, which never look at a checkpoint's weights: an oracle that reads
each RULER answer out of the prompt (a score below 100 means prompts, answers and scoring do not
line up) and a constant answer (so the harness can fail). Registered by the tests that use them
and by benchmarks/ruler.py; no product module knows them."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable

from ray_jobs.eval.lm_eval.adapter import (
    RulerInputError,
    gen_settings,
    require_lm_eval,
    stop_at,
)

ORACLE_NAME = "ringpilot-test-oracle"
CONSTANT_NAME = "ringpilot-test-constant"


def answer_from_prompt(prompt: str) -> str:
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
    from tests.support.offline_data import answer_from_prompt as data_dir_answer

    answer = data_dir_answer(prompt)  # the QA and BABILong prompts of a test eval.data_dir
    if answer is not None:
        return answer
    raise RulerInputError(f"the test oracle does not know this prompt: ...{prompt[-300:]!r}")


@functools.cache
def register_test_backends() -> dict[str, type]:
    """Define and register (once) the oracle and the constant backend; returns {name: class}."""
    require_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class _TextOnlyLM(LM):
        answer: Callable[[str], str]

        def __init__(self, **_ignored):
            super().__init__()

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return [stop_at(type(self).answer(r.args[0]), gen_settings(dict(r.args[1]), 0)[0])
                    for r in requests]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("test-only backend: generate_until only")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("test-only backend: generate_until only")

    class RulerTestOracle(_TextOnlyLM):
        """TEST ONLY: answers each RULER prompt by reading the asked values out of it."""

        answer = staticmethod(answer_from_prompt)

    class ConstantTestLM(_TextOnlyLM):
        """TEST ONLY: always the same answer."""

        answer = staticmethod(lambda prompt: " I do not know, maybe 42.")

    classes = {ORACLE_NAME: RulerTestOracle, CONSTANT_NAME: ConstantTestLM}
    for name, cls in classes.items():
        register_model(name)(cls)
    return classes
