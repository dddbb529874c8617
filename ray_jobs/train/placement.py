"""Where each worker sits in the rings: the topology plan, looked up by (node, local device).

With `resources.cluster` the plan comes from topology's planner on the ClusterSpec, made on the
driver, and each worker is pinned to its planned node by a Ray label selector (nodes carry the
label `ringpilot.io/node=<ClusterSpec node name>`, set with `ray start --labels`). Without one,
the plan is made from where Ray actually placed the workers (topology.plan_from_workers), so it
always matches: once, by rank 0 from the gathered slots, and broadcast. Either way every worker
builds its mesh from that one plan's ParallelDims and rings, and its ring position comes from
its node and local device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from specs.atomic import atomic_write
from specs.plan import Plan, StagePlan
from specs.run import RunSpec
from topology.planner import SEARCH_SECONDS, PlanError
from topology.run_plan import plan_from_workers, plan_run
from topology.sources import load_cluster

NODE_LABEL = "ringpilot.io/node"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class WorkerSlot:
    """A worker as the plan sees it (node name, local device index) plus its torch rank."""

    node: str
    local: int
    rank: int


def only_stages(run: RunSpec, indices: list[int] | None) -> RunSpec:
    """The run as planning sees it: every stage (None), or only those being trained (--stage),
    so that a stage trained on its own needs its own ring x dp x ulysses GPUs, not the most any
    stage of the run needs (the 8B recipe's first stage runs on one 8-GPU node, its last on 512).
    A stage's plan does not depend on the others (its RoPE base comes from its own seq_len)."""
    if indices is None:
        return run
    return run.model_copy(update={"stages": [run.stages[i] for i in indices]})


def plan_for_cluster(run: RunSpec, spec_dir: Path | None) -> Plan:
    """Plan every stage on the ClusterSpec named by resources.cluster (relative to the run file;
    the trainer's --cluster sets it to an absolute path)."""
    path = Path(run.resources.cluster)
    if not path.is_absolute():
        path = (spec_dir or Path.cwd()) / path
    return plan_run(load_cluster(path), run, search_seconds=SEARCH_SECONDS,
                    base_rope=run.base_rope(spec_dir))


def check_capacity(run: RunSpec, spec_dir: Path | None = None) -> Plan:
    """Check the degrees against the workers the run asks for, before any worker starts
    (PlanError if they do not tile them)."""
    return plan_from_workers({"workers": run.resources.workers}, run, run.base_rope(spec_dir))


def plan_from_slots(run: RunSpec, stage_index: int, slots: list[WorkerSlot]) -> StagePlan:
    """The stage planned from the workers' actual places (no ClusterSpec)."""
    counts: dict[str, int] = {}
    for s in slots:
        counts[s.node] = counts.get(s.node, 0) + 1
    plan = plan_from_workers(counts, only_stages(run, [stage_index]))
    return plan.stage(run.stages[stage_index].name)


def agree_stage_plan(run: RunSpec, stage_index: int, slots: list[WorkerSlot],
                     planned: StagePlan | None) -> StagePlan:
    """The one stage plan every rank builds its mesh from (collective): the driver's
    (ClusterSpec), or made once by rank 0 from the gathered slots and broadcast as plan.json
    text, so no rank plans for itself and all read the same degrees and rings."""
    if planned is not None:
        return planned
    sent: list = [None]
    if dist.get_rank() == 0:
        try:
            sent = [(plan_from_slots(run, stage_index, slots).model_dump_json(), None)]
        except PlanError as e:  # every rank fails with rank 0's reason instead of waiting
            sent = [(None, str(e))]
    dist.broadcast_object_list(sent)
    text, error = sent[0]
    if error is not None:
        raise PlanError(error)
    return StagePlan.model_validate_json(text)


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


def write_plan(run_dir: Path, plan: Plan, *, keep_others: bool = False) -> Path:
    """Save the driver's plan as plan.json in the run directory. `keep_others` (a --stage run,
    which plans its stage alone): the stages of an earlier plan.json that this plan does not
    cover stay, so the file still holds every stage trained so far."""
    path = Path(run_dir) / PLAN_FILE
    if keep_others and path.exists():
        mine = {s.name for s in plan.stages}
        earlier = Plan.model_validate_json(path.read_text()).stages
        plan = plan.model_copy(update={"stages": [s for s in earlier if s.name not in mine]
                                       + plan.stages})
    return atomic_write(path, plan.model_dump_json(indent=1) + "\n")


def record_stage_plan(run_dir: Path, run_name: str, stage_plan: StagePlan) -> Path:
    """Merge a stage planned from the workers' places into plan.json (no ClusterSpec)."""
    path = Path(run_dir) / PLAN_FILE
    if path.exists():
        doc = Plan.model_validate_json(path.read_text())
        doc.stages = [s for s in doc.stages if s.name != stage_plan.name] + [stage_plan]
    else:
        doc = Plan(run=run_name, cluster=None, profile=None, stages=[stage_plan])
    return write_plan(run_dir, doc)
