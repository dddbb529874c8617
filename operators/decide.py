"""The operator's decisions: a pure function of the observed objects that returns actions.

`plan_reconcile` looks at a StagedTraining, the RayJobs it owns, the Nodes and (when the run's
storage is visible) the run ledger, and says what to do next: create the next stage's RayJob,
wait, retry with backoff, re-plan around lost nodes, or give up. The kopf handlers only gather
the inputs and carry the actions out, so every behaviour is tested here without an API server.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from operators.admission import describe, plan_admission, plan_auth_secret
from operators.rayjob import build_configmap, build_rayjob
from operators.replan import (
    plan_eligible_nodes,
    plan_lost_nodes,
    plan_topology,
    plan_workers,
    with_workers,
)
from operators.resource import (
    DEFAULT_IMAGE,
    Condition,
    StagedTrainingSpec,
    StagedTrainingStatus,
    StageStatus,
)
from specs.ledger import LedgerDoc
from specs.loading import format_errors

# Ring-health findings (specs/ledger.py HealthFinding): the Event reason of each kind, and how
# many new ones one pass announces per stage (a flapping link must not flood the namespace).
HEALTH_REASONS = {"slow_hop": "SlowRingHop", "hang": "RankStopped"}
MAX_HEALTH_EVENTS = 10
RING_HEALTHY = "RingHealthy"  # condition: False while the current stage has findings

# What KubeRay reports (RayJob status.jobStatus / status.jobDeploymentStatus).
JOB_SUCCEEDED = {"SUCCEEDED"}
JOB_FAILED = {"FAILED", "STOPPED"}
DEPLOYMENT_FAILED = {"Failed", "ValidationFailed"}


@dataclass(frozen=True)
class Settings:
    backoff_seconds: float = 30.0  # first retry waits this long, then doubles
    backoff_cap_seconds: float = 600.0
    poll_seconds: float = 10.0
    # Images a StagedTraining may run (operators/admission.py says how entries match).
    allowed_images: tuple[str, ...] = (DEFAULT_IMAGE,)


@dataclass(frozen=True)
class Emit:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class CreateObject:
    """Create `body`; post `announce` only if this call created it (not if it already existed),
    so a pass that acts on a stale copy of the status cannot announce a stage twice."""
    body: dict[str, Any]
    announce: Emit | None = None


@dataclass(frozen=True)
class ApplyConfigMap:
    body: dict[str, Any]


@dataclass(frozen=True)
class DeleteRayJob:
    name: str


@dataclass(frozen=True)
class Requeue:
    after: float


Action = CreateObject | ApplyConfigMap | DeleteRayJob | Emit | Requeue


@dataclass
class Decision:
    status: StagedTrainingStatus  # the status the object should have after the actions
    actions: list[Action] = field(default_factory=list)

    def of(self, kind: type) -> list:
        return [a for a in self.actions if isinstance(a, kind)]

    def events(self) -> list[Emit]:
        """Every event this decision may post, creation announcements included, in order."""
        out: list[Emit] = []
        for a in self.actions:
            if isinstance(a, Emit):
                out.append(a)
            elif isinstance(a, CreateObject) and a.announce is not None:
                out.append(a.announce)
        return out


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse(t: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(t.replace("Z", "+00:00")) if t else None


def plan_backoff(attempts: int, settings: Settings) -> float:
    """Seconds to wait before attempt `attempts + 1`: doubling from the base, capped."""
    return min(settings.backoff_seconds * 2 ** max(attempts - 1, 0), settings.backoff_cap_seconds)


def _set_condition(conditions: list[Condition], type_: str, status: str, reason: str,
                   message: str, now: dt.datetime) -> list[Condition]:
    out, found = [], False
    for c in conditions:
        if c.type == type_:
            found = True
            since = c.lastTransitionTime if c.status == status else _iso(now)
            c = Condition(type=type_, status=status, reason=reason, message=message,
                          lastTransitionTime=since)
        out.append(c)
    if not found:
        out.append(Condition(type=type_, status=status, reason=reason, message=message,
                             lastTransitionTime=_iso(now)))
    return out


def with_condition(st: dict[str, Any] | StagedTrainingStatus, type_: str, status: str,
                   reason: str, message: str, now: dt.datetime) -> StagedTrainingStatus:
    """A status (or the object's current one) with one condition set: for what the loop or
    apply finds (the decision's own status is not written when its actions did not happen)."""
    current = st if isinstance(st, StagedTrainingStatus) else _read_status(st)
    return current.model_copy(update={"conditions": _set_condition(
        current.conditions, type_, status, reason, message, now)})


def _job_outcome(job: dict[str, Any]) -> tuple[str, str]:
    """('succeeded' | 'failed' | 'running', message) from a RayJob's status."""
    status = job.get("status") or {}
    job_status = status.get("jobStatus", "")
    deployment = status.get("jobDeploymentStatus", "")
    message = status.get("message") or status.get("reason") or ""
    if job_status in JOB_SUCCEEDED:
        return "succeeded", message or "job SUCCEEDED"
    if job_status in JOB_FAILED or deployment in DEPLOYMENT_FAILED:
        return "failed", message or f"jobStatus {job_status or '-'}, deployment {deployment}"
    return "running", ""


def _invalid(st: dict[str, Any], error: ValidationError, now: dt.datetime) -> Decision:
    lines = format_errors(error, StagedTrainingSpec)
    return _refuse(st, "InvalidSpec", "; ".join(f"spec.{line}" for line in lines), now)


def _refuse(st: dict[str, Any], reason: str, message: str, now: dt.datetime,
            stop_running: bool = False) -> Decision:
    """Failed, with one message on the SpecValid condition and one event per generation; no
    RayJob and no ConfigMap: nothing runs until the spec is fixed (a new generation).

    `stop_running`: also delete the RayJobs of running stages (they go back to Pending), for a
    spec refused for safety: a job started before the edit, or before its image was taken off
    the allow-list, must not go on running what the operator now refuses.
    """
    status = _read_status(st)
    conds = _set_condition(status.conditions, "SpecValid", "False", reason, message, now)
    actions: list[Action] = []
    stages = list(status.stages)
    if stop_running:
        for i, stage in enumerate(stages):
            if stage.state in ("Running", "BackingOff") and stage.ray_job:
                actions.append(DeleteRayJob(stage.ray_job))
                stages[i] = stage.model_copy(update={
                    "state": "Pending", "ray_job": None,
                    "message": f"RayJob {stage.ray_job} deleted: the spec was refused"})
    new = status.model_copy(update={"phase": "Failed", "conditions": conds, "stages": stages,
                                    "observedGeneration": st["metadata"].get("generation")})
    if status.observedGeneration != st["metadata"].get("generation") or status.phase != "Failed":
        actions.append(Emit("Warning", reason, message))
    return Decision(new, actions)


def _read_status(st: dict[str, Any]) -> StagedTrainingStatus:
    raw = dict(st.get("status") or {})
    known = {k: v for k, v in raw.items() if k in StagedTrainingStatus.model_fields}
    return StagedTrainingStatus.model_validate(known)


def plan_reconcile(st: dict[str, Any], jobs: list[dict[str, Any]], nodes: list[dict[str, Any]],
                   now: dt.datetime, ledger: LedgerDoc | None = None,
                   settings: Settings = Settings(), cluster_yaml: str | None = None) -> Decision:
    """Everything the operator should do for one StagedTraining, given what it observes.

    `cluster_yaml` is the topology ConfigMap's cluster.yaml when spec.topology names one.
    """
    try:
        spec = StagedTrainingSpec.model_validate(st.get("spec") or {})
    except ValidationError as e:
        return _invalid(st, e, now)
    refusals = plan_admission(spec, settings.allowed_images)
    refusals += plan_auth_secret(str(st.get("metadata", {}).get("name", "")), spec)
    if refusals:  # images off the allow-list, templates wider than the operator's own pods
        return _refuse(st, "Refused", describe(refusals), now, stop_running=True)
    meta = st["metadata"]
    generation = meta.get("generation")
    status = _read_status(st)
    conds = _set_condition(status.conditions, "SpecValid", "True", "Valid", "", now)
    problem = plan_topology(spec, cluster_yaml)
    if problem is not None:  # nothing can start without its topology: wait for the ConfigMap
        was = next((c for c in status.conditions if c.type == "TopologyReady"), None)
        conds = _set_condition(conds, "TopologyReady", "False", "ClusterSpecUnusable", problem,
                               now)
        actions: list[Action] = [Requeue(settings.poll_seconds)]
        if was is None or was.status != "False" or was.message != problem:
            actions.insert(0, Emit("Warning", "ClusterSpecUnusable", problem))
        new = status.model_copy(update={"conditions": conds, "observedGeneration": generation})
        return Decision(new, actions)
    if spec.topology.source == "config-map":
        conds = _set_condition(conds, "TopologyReady", "True", "ClusterSpecValid", "", now)
    actions = []
    jobs_by_name = {j["metadata"]["name"]: j for j in jobs}

    # Stages are matched by name, so an edited spec keeps what already ran.
    old = {s.name: s for s in status.stages}
    stages = [old.get(s.name, StageStatus(name=s.name)) for s in spec.stages]
    edited = status.observedGeneration is not None and status.observedGeneration != generation
    if edited:
        actions.append(Emit("Normal", "SpecChanged", f"generation {generation}: applies from "
                            "the next RayJob; stages that succeeded stay done"))
        for name, gone in old.items():
            if name not in {s.name for s in stages} and gone.state in ("Running", "BackingOff"):
                if gone.ray_job:
                    actions.append(DeleteRayJob(gone.ray_job))
                actions.append(Emit("Normal", "StageRemoved", f"stage {name} left the spec; "
                                    f"its RayJob {gone.ray_job} is deleted"))
        if status.phase == "Failed":  # a fix of a given-up run: the failed stage starts afresh
            stages = [s.model_copy(update={"state": "Pending", "attempts": 0, "ray_job": None})
                      if s.state == "Failed" else s for s in stages]
    excluded = list(status.excluded_nodes)
    phase, gave_up = status.phase, False
    if phase == "Failed" and not edited:
        gave_up = True

    i = 0
    while i < len(stages) and not gave_up:
        stage = stages[i]
        if stage.state == "Succeeded":
            i += 1
            continue
        stage, more, stop = _plan_stage(st, spec, stage, jobs_by_name, nodes, excluded, now,
                                        settings)
        stages[i] = stage
        actions.extend(more)
        if stage.state == "Failed":
            gave_up = True
        if stop:
            break
        i += 1  # the stage just succeeded: start the next one in this same pass

    current = next((s for s in stages if s.state != "Succeeded"), None)
    if gave_up:
        phase = "Failed"
        current = next((s for s in stages if s.state == "Failed"), current)
        conds = _set_condition(conds, "Complete", "False", "GaveUp",
                               (current.message if current else None) or "", now)
    elif current is None:
        phase = "Succeeded"
        if status.phase != "Succeeded":
            actions.append(Emit("Normal", "Completed", f"all {len(stages)} stages succeeded"))
        conds = _set_condition(conds, "Complete", "True", "AllStagesSucceeded", "", now)
    else:
        phase = "Running" if current.attempts else "Pending"
        conds = _set_condition(conds, "Complete", "False", "InProgress",
                               f"stage {current.name}: {current.state}", now)
        actions.append(Requeue(settings.poll_seconds))
    # The working dir of the next submission: the run file as the current stage runs it.
    workers = current.workers if current is not None else None
    actions.insert(0, ApplyConfigMap(build_configmap(st, with_workers(spec, workers),
                                                     cluster_yaml)))
    stages, last_score = _apply_ledger(stages, ledger)
    stages, announced = _apply_health(stages, ledger)
    actions.extend(announced)
    if ledger is not None:
        conds = _health_condition(conds, current or (stages[-1] if stages else None), ledger,
                                  now)
    new = StagedTrainingStatus(
        phase=phase, current_stage=current.name if current else None,
        last_score=last_score if last_score is not None else status.last_score,
        stages=stages, excluded_nodes=sorted(set(excluded)), conditions=conds,
        observedGeneration=generation)
    return Decision(new, actions)


def _plan_stage(st, spec, stage: StageStatus, jobs_by_name, nodes, excluded: list[str],
                now: dt.datetime, settings: Settings) -> tuple[StageStatus, list[Action], bool]:
    """(new stage status, actions, stop here) for the first stage not yet succeeded.

    `excluded` is extended in place when re-planning drops lost nodes.
    """
    actions: list[Action] = []
    retries = spec.failure.stage_retries
    index = [s.name for s in spec.stages].index(stage.name)

    def start(attempt: int, reason: str, message: str) -> StageStatus:
        used = plan_eligible_nodes(nodes, spec.topology.node_selector, excluded)
        workers, problem = spec.resources.workers, None
        if nodes and spec.ray_cluster.selector is None:
            workers, problem = plan_workers(spec, index, used)
        if problem is not None:
            actions.append(Emit("Warning", "InsufficientNodes",
                                f"stage {stage.name}: {problem}; waiting for nodes to return"))
            actions.append(Requeue(settings.poll_seconds))
            return stage.model_copy(update={
                "state": "BackingOff" if stage.attempts else "Pending",
                "message": f"waiting for nodes: {problem}"})
        if workers != spec.resources.workers:
            actions.append(Emit("Warning", "Shrunk",
                                f"stage {stage.name}: {len(used)} usable nodes; re-planned on "
                                f"{workers} of {spec.resources.workers} workers"))
        body = build_rayjob(st, with_workers(spec, workers), stage.name, attempt, sorted(excluded))
        actions.append(CreateObject(body, Emit("Normal", reason,
                                               message.format(job=body["metadata"]["name"]))))
        return stage.model_copy(update={
            "state": "Running", "attempts": attempt, "ray_job": body["metadata"]["name"],
            "nodes": used, "finished_at": None, "message": None,
            "workers": None if workers == spec.resources.workers else workers})

    if stage.ray_job is None:  # never started
        return start(max(stage.attempts, 0) + 1, "StageStarted",
                     f"stage {stage.name}: created RayJob {{job}}"), actions, True

    job = jobs_by_name.get(stage.ray_job)
    if stage.state == "Running" and job is None:
        # The create may not have landed before an operator restart, or someone deleted the
        # job: recreate it under the same, deterministic name.
        body = build_rayjob(st, with_workers(spec, stage.workers), stage.name, stage.attempts,
                            sorted(excluded))
        actions.append(CreateObject(body, Emit("Normal", "RayJobRecreated",
                                               f"stage {stage.name}: RayJob {stage.ray_job} was "
                                               "missing")))
        return stage, actions, True

    if stage.state == "Running":
        outcome, message = _job_outcome(job)
        if outcome == "running":
            return stage, actions, True
        finished = (job.get("status") or {}).get("endTime") or _iso(now)
        if outcome == "succeeded":
            actions.append(Emit("Normal", "StageSucceeded",
                                f"stage {stage.name}: RayJob {stage.ray_job} succeeded"))
            return stage.model_copy(update={"state": "Succeeded", "finished_at": finished,
                                            "message": message}), actions, False
        if stage.attempts > retries:
            actions.append(Emit("Warning", "GaveUp",
                                f"stage {stage.name} failed {stage.attempts} times (stage_retries "
                                f"{retries}); last: {message}"))
            return stage.model_copy(update={"state": "Failed", "finished_at": finished,
                                            "message": message}), actions, True
        wait = plan_backoff(stage.attempts, settings)
        actions.append(Emit("Warning", "StageFailed",
                            f"stage {stage.name} attempt {stage.attempts} failed ({message}); "
                            f"retrying in {wait:.0f}s from its last committed checkpoint"))
        actions.append(Requeue(wait))
        return stage.model_copy(update={"state": "BackingOff", "finished_at": _iso(now),
                                        "message": message}), actions, True

    if stage.state == "BackingOff":
        since = _parse(stage.finished_at) or now
        wait = plan_backoff(stage.attempts, settings)
        left = (since + dt.timedelta(seconds=wait) - now).total_seconds()
        if left > 0:
            actions.append(Requeue(math.ceil(left * 10) / 10))
            return stage, actions, True
        lost = plan_lost_nodes(stage.nodes, nodes) if nodes else []
        lost = [n for n in lost if n not in excluded]
        if lost:
            excluded.extend(lost)
            where = ("the next RayJob's cluster avoids them" if spec.ray_cluster.selector is None
                     else "the selected RayCluster must replace them itself")
            actions.append(Emit("Warning", "Replanned",
                                f"stage {stage.name}: nodes {', '.join(lost)} are NotReady, "
                                f"cordoned or gone; re-planned on the rest ({where})"))
        return start(stage.attempts + 1, "StageRetried",
                     f"stage {stage.name}: attempt {stage.attempts + 1} as RayJob {{job}}"), \
            actions, True

    # Pending with attempts recorded, e.g. waiting for nodes: try starting again.
    return start(stage.attempts + 1, "StageStarted",
                 f"stage {stage.name}: created RayJob {{job}}"), actions, True


def _apply_ledger(stages: list[StageStatus], ledger: LedgerDoc | None
                  ) -> tuple[list[StageStatus], float | None]:
    """Checkpoints and eval scores from the run ledger, when the operator can read it."""
    if ledger is None:
        return stages, None
    out, last_score = [], None
    for s in stages:
        entry = ledger.stages.get(s.name)
        if entry is None:
            out.append(s)
            continue
        update: dict[str, Any] = {}
        if entry.checkpoints:
            update["last_checkpoint"] = entry.checkpoints[-1].path
        done = [e for e in entry.eval.values() if e.status == "done" and e.scores]
        if done:
            newest = done[-1].scores
            update["scores"] = dict(newest)
            last_score = sum(newest.values()) / len(newest)
        out.append(s.model_copy(update=update))
    return out, last_score


def _apply_health(stages: list[StageStatus], ledger: LedgerDoc | None
                  ) -> tuple[list[StageStatus], list[Emit]]:
    """Each stage's newest ring-health finding from the ledger, and a Warning Event for every
    finding not announced before (by the ledger's finding number, kept in the status)."""
    if ledger is None:
        return stages, []
    out, events = [], []
    for s in stages:
        entry = ledger.stages.get(s.name)
        if entry is None or not entry.findings:
            out.append(s)
            continue
        new = [f for f in entry.findings if f.seq > s.health_seen]
        events += [Emit("Warning", HEALTH_REASONS[f.kind],
                        f"stage {s.name} step {f.step}: {f.message}")
                   for f in new[-MAX_HEALTH_EVENTS:]]
        newest = entry.findings[-1]
        out.append(s.model_copy(update={"health": newest.message,
                                        "health_seen": max(s.health_seen, newest.seq)}))
    return out, events


def _health_condition(conds: list[Condition], stage: StageStatus | None, ledger: LedgerDoc,
                      now: dt.datetime) -> list[Condition]:
    """RingHealthy: False while `stage` (the current one) has ring-health findings in the
    ledger, with the newest as its reason and message; True otherwise."""
    entry = ledger.stages.get(stage.name) if stage is not None else None
    if entry is None or not entry.findings:
        return _set_condition(conds, RING_HEALTHY, "True", "NoFindings", "", now)
    newest = entry.findings[-1]
    return _set_condition(conds, RING_HEALTHY, "False", HEALTH_REASONS[newest.kind],
                          f"stage {stage.name} step {newest.step}: {newest.message}", now)
