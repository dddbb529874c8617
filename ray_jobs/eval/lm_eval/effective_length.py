"""RULER's headline numbers: the average over its 13 tasks per length, the effective length,
and published curves to draw ours against.

RULER (Hsieh et al., 2024; github.com/NVIDIA/RULER, README) reports per model the average over
its 13 tasks at 4K .. 128K and an "effective length": the longest length whose average stays
above a threshold, the score Llama-2-7B reaches at its own 4K context (85.6). Here a length
counts when it and every shorter evaluated length are above the threshold (strictly). With fewer
than 13 tasks the average is labelled partial and no effective length is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from specs.run import RULER_TASK_NAMES

RULER_README = "https://github.com/NVIDIA/RULER (README, table of results)"
THRESHOLD = 85.6  # Llama-2-7B (4K context) on RULER at 4K: RULER's README
THRESHOLD_SOURCE = (f"{RULER_README}: the effective length is the longest length above "
                    "Llama-2-7B's average at 4K, 85.6")
K = 1024


@dataclass(frozen=True)
class ReferenceCurve:
    """A published RULER curve: the 13-task average per length, as its source prints it."""

    model: str
    lengths: tuple[int, ...]
    scores: tuple[float, ...]
    effective_length: int  # as published
    source: str


_LENGTHS = (4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 128 * K)
REFERENCE_CURVES: tuple[ReferenceCurve, ...] = (
    ReferenceCurve("Llama-3-8B-Instruct-Gradient-1048k", _LENGTHS,
                   (92.8, 90.3, 85.7, 79.9, 76.3, 69.5), 16 * K, RULER_README),
    ReferenceCurve("Llama-3-70B-Instruct-Gradient-1048k", _LENGTHS,
                   (95.1, 94.4, 90.8, 85.4, 80.9, 72.1), 16 * K, RULER_README),
    ReferenceCurve("Llama-3.1-8B-Instruct", _LENGTHS,
                   (95.5, 93.8, 91.6, 87.4, 84.7, 77.0), 32 * K, RULER_README),
)


def effective_length(averages: Mapping[int, float], threshold: float = THRESHOLD) -> int | None:
    """The longest length whose average, and every shorter one's, is above `threshold`; None
    when the shortest is not."""
    best = None
    for length in sorted(averages):
        if not averages[length] > threshold:
            break
        best = length
    return best


def summarize(rows: Sequence[Mapping], tasks_asked: Sequence[str]) -> dict:
    """The headline of RULER rows (each: length, score, tasks {name: score}): the average per
    length, whether all 13 tasks ran at every length, the effective length when they did, the
    threshold with its source, and which tasks did not run."""
    ran = sorted({t for r in rows for t in r["tasks"]})
    complete = bool(rows) and all(set(r["tasks"]) >= set(RULER_TASK_NAMES) for r in rows)
    averages = {int(r["length"]): float(r["score"]) for r in rows}
    eff = effective_length(averages) if complete else None
    missing = [t for t in RULER_TASK_NAMES if t not in ran]
    if complete:
        label = (f"effective length {eff:,}" if eff is not None else
                 f"effective length: none (below {THRESHOLD} at {min(averages):,})")
    else:
        label = f"partial: {len(ran)} of {len(RULER_TASK_NAMES)} tasks, no effective length"
    return {"average": {str(n): s for n, s in sorted(averages.items())},
            "complete": complete, "effective_length": eff, "threshold": THRESHOLD,
            "threshold_source": THRESHOLD_SOURCE, "tasks_run": ran, "tasks_missing": missing,
            "tasks_asked": list(tasks_asked), "label": label}


def score_key(summary: Mapping, length: int) -> str:
    """The ledger's key for a length's average: `ruler@N` over all 13 tasks, `ruler_partial@N`
    over fewer."""
    return f"{'ruler' if summary['complete'] else 'ruler_partial'}@{length}"
