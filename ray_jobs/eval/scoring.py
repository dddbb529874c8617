"""Scores of one model output against a sample's expected answers, as RULER scores them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Metric = Literal["exact", "all", "any"]

_EDGE_PUNCT = ".,;:!?\"'()[]{}<>"


def score_exact(output: str, answers: Sequence[str]) -> float:
    """1.0 when the output's first word is the (single) answer, else 0.0 (NIAH grid cells).

    Greedy decoding keeps going after the answer, so only the first word is compared, with the
    punctuation around it stripped.
    """
    words = output.split()
    first = words[0].strip(_EDGE_PUNCT) if words else ""
    return 1.0 if any(first.lower() == a.lower() for a in answers) else 0.0


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
