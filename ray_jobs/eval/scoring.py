"""Scores of one model output against a sample's expected answers, as RULER scores them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Metric = Literal["exact", "all", "any"]

_EDGE_PUNCT = ".,;:!?\"'()[]{}<>"


def score_exact(output: str, answers: Sequence[str]) -> float:
    """1.0 when the first answer-shaped word of the output is the (single) answer, else 0.0
    (NIAH grid cells).

    Answer-shaped: for a numeric answer the output's first number, else its first word, with
    punctuation and Markdown emphasis around it stripped. So `1234567.`, `**1234567**`,
    `Answer: 1234567` and `The special magic number for X is 1234567.` all count, while a wrong
    number first (or a longer number that merely contains the answer) does not, and greedy
    decoding may go on after the answer.
    """
    if not answers:
        raise ValueError("score_exact: answers is empty; a sample must expect one answer")
    for answer in answers:
        if answer.isdigit():
            first = re.search(r"\d+", output)
            found = first.group() if first else ""
        else:
            words = [w.strip(_EDGE_PUNCT + "*_`") for w in output.split()]
            found = next((w for w in words if w), "")
        if found.lower() == answer.lower():
            return 1.0
    return 0.0


def score_all(output: str, answers: Sequence[str]) -> float:
    """Fraction of the expected answers that occur in the output (RULER's string_match_all)."""
    if not answers:
        raise ValueError("score_all: answers is empty; a sample must expect at least one answer")
    text = output.lower()
    return sum(_contains(text, a.lower()) for a in answers) / len(answers)


def score_any(output: str, answers: Sequence[str]) -> float:
    """1.0 when any of the acceptable answers occurs in the output (RULER's string_match_part,
    used for QA-style tasks where several phrasings are right)."""
    text = output.lower()
    return 1.0 if any(_contains(text, a.lower()) for a in answers) else 0.0


def _contains(text: str, answer: str) -> bool:
    # Whole-token match, so the answer 12 is not found inside 1234 and "rat" not inside "rather".
    return re.search(rf"(?<![\w]){re.escape(answer)}(?![\w])", text) is not None


SCORERS = {"exact": score_exact, "all": score_all, "any": score_any}


def score(metric: Metric, output: str, answers: Sequence[str]) -> float:
    return SCORERS[metric](output, answers)
