"""Placement planner: ring x data-parallel degrees, which GPUs form each ring, in which order."""

from topology.planner.decisions import SEARCH_SECONDS, PlanError, Planner
from topology.planner.evaluation import TIE, TIERS, Evaluated, floor_of, rank
from topology.planner.exhaustive import exhaustive_count, plan_exhaustive, plan_exhaustive_any

__all__ = [
    "SEARCH_SECONDS",
    "TIE",
    "TIERS",
    "Evaluated",
    "PlanError",
    "Planner",
    "exhaustive_count",
    "floor_of",
    "plan_exhaustive",
    "plan_exhaustive_any",
    "rank",
]
