"""The names of ringpilot's own evaluation tasks: the one list eval.tasks accepts, the generators
of ray_jobs.eval.tasks implement and the planner's estimate counts.

They are in the style of RULER's tasks but are not RULER's generators (lm-eval runs RULER itself:
ray_jobs.eval.lm_eval, eval.ruler); "_lite" keeps the two apart.
"""

from __future__ import annotations

import typing
from typing import Literal

# The order is the CRD's enum and the order of the reports' tables.
EvalTask = Literal[
    "passkey", "niah_lite", "niah_single_lite", "niah_multikey_lite", "niah_multivalue_lite",
    "niah_multiquery_lite", "vt_lite", "cwe_lite", "fwe_lite",
]
SPEC_TASKS: tuple[str, ...] = typing.get_args(EvalTask)
# Kamradt's test needs the user's haystack, so it runs when eval.kamradt is given, not by name.
KAMRADT_TASK = "niah_kamradt"
# These list words instead of hiding needles in a haystack: one cell per length, no depth.
NO_DEPTH_TASKS: tuple[str, ...] = ("cwe_lite", "fwe_lite")
DEPTH_TASKS: tuple[str, ...] = (
    *(t for t in SPEC_TASKS if t not in NO_DEPTH_TASKS), KAMRADT_TASK)
ALL_TASKS: tuple[str, ...] = DEPTH_TASKS + NO_DEPTH_TASKS
