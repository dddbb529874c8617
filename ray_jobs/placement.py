"""Where each worker sits in the rings: the topology plan, looked up by (node, local device).

With `resources.cluster` the plan comes from topology's planner on the ClusterSpec, made on the
driver, and each worker is pinned to its planned node by a Ray label selector (nodes carry the
label `ringpilot.io/node=<ClusterSpec node name>`, set with `ray start --labels`). Without one,
the plan is made from where Ray actually placed the workers (topology.plan_from_workers), so it
always matches. Either way the worker's ring position comes from its node and local device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from topology.plan import Plan, StagePlan
from topology.run_plan import plan_from_workers, plan_run

NODE_LABEL = "ringpilot.io/node"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class WorkerSlot:
    """A worker as the plan sees it (node name, local device index) plus its torch rank."""

    node: str
    local: int
    rank: int


def plan_for_cluster(run, spec_dir: Path | None) -> Plan:
    """Plan every stage on the ClusterSpec named by resources.cluster (relative to the run file)."""
    from ray_jobs.specfile import load_model
    from topology.cluster import ClusterSpec

    path = Path(run.resources.cluster)
    if not path.is_absolute():
        path = (spec_dir or Path.cwd()) / path
    return plan_run(load_model(path, ClusterSpec), run)


def plan_from_capacity(run, counts: dict[str, int]) -> Plan:
    """Check the degrees against what Ray offers, before any worker starts (PlanError if not)."""
    return plan_from_workers(counts, run)


def resolve_degrees(stage_plan: StagePlan) -> tuple[int, int]:
    return stage_plan.ring_degree, stage_plan.dp_degree


def stage_plan_for(run, stage_index: int, slots: list[WorkerSlot], plan: dict | None) -> StagePlan:
    """The stage's plan: the driver's (ClusterSpec) or one made from the workers' actual places."""
    name = run.stages[stage_index].name
    if plan is not None:
        return Plan.model_validate(plan).stage(name)
    counts: dict[str, int] = {}
    for s in slots:
        counts[s.node] = counts.get(s.node, 0) + 1
    return plan_from_workers(counts, run).stage(name)


def build_rings(slots: list[WorkerSlot], stage_plan: StagePlan) -> list[list[int]]:
    """Rings as lists of torch ranks in ring order: each worker found by (node, local device)."""
    by_place = {(s.node, s.local): s.rank for s in slots}
    rings = []
    for ring in stage_plan.rings:
        ranks = []
        for w in ring:
            if (w.node, w.gpu) not in by_place:
                raise RuntimeError(
                    f"stage {stage_plan.name}: the plan puts a worker on node {w.node!r} device "
                    f"{w.gpu}, but no worker runs there (workers: {sorted(by_place)}); label the "
                    f"Ray nodes {NODE_LABEL}=<ClusterSpec node> or drop resources.cluster")
            ranks.append(by_place[(w.node, w.gpu)])
        rings.append(ranks)
    if len(by_place) != sum(map(len, rings)):
        raise RuntimeError(f"stage {stage_plan.name}: {len(by_place)} workers started but the "
                           f"plan uses {sum(map(len, rings))}; ring x dp must equal the workers")
    return rings


def write_stage_plan(run_dir: Path, run_name: str, stage_plan: StagePlan, full: dict | None) -> None:
    """Save plan.json in the run directory: the whole driver plan, or this stage merged in."""
    path = Path(run_dir) / PLAN_FILE
    if full is not None:
        doc = Plan.model_validate(full)
    elif path.exists():
        doc = Plan.model_validate_json(path.read_text())
        doc.stages = [s for s in doc.stages if s.name != stage_plan.name] + [stage_plan]
    else:
        doc = Plan(run=run_name, cluster=None, profile=None, stages=[stage_plan])
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc.model_dump(mode="json"), indent=1) + "\n")
    tmp.replace(path)
