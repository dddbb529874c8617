"""kopf wiring: index RayJobs and Nodes, cache StagedTrainings; one loop reconciles them.

Handlers stay thin: they keep an in-memory copy of what the watches report and wake the
reconcile loop, which calls the pure `plan_reconcile` and `apply_decision`. Everything is rebuilt
from the watches' initial listings after a restart (kopf holds the watching handlers back until
its indices are full). No per-object timer or daemon, hence no finalizer: deletion cascades
through owner references and needs no cleanup by the operator.

Reconciles are bounded and independent: each object's reconcile (planning, decide, apply) runs
in a bounded thread pool, never on the event loop, at most one at a time per object, so objects
never race themselves and a slow one cannot hold the others up. A reconcile still running after
its deadline (RINGPILOT_RECONCILE_DEADLINE_SECONDS) gets a `Reconciled: False, DeadlineExceeded`
condition, its object is retried only after a doubling backoff, and the liveness probe
(`--liveness`) fails while it is stuck, so Kubernetes restarts an operator whose threads hang.

Run: `kopf run -m operators.handlers --namespace NS --standalone` (`python -m operators`
adds a Lease so one replica at a time is active).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client, config

from operators.admission import parse_allowed_images
from operators.apply import apply_decision
from operators.decide import Requeue, Settings, plan_reconcile, with_condition
from operators.rayjob import CLUSTER_FILE, LABEL_TRAINING
from operators.resource import DEFAULT_IMAGE, GROUP, PLURAL, VERSION
from specs.files import read_bounded
from specs.ledger import LEDGER_FILE, LedgerDoc
from specs.loading import SpecError

log = logging.getLogger("ringpilot.operator")
# The images StagedTrainings may run (comma separated); `python -m operators --allowed-image`
# sets it. Unset: the operator's own image as the manifests name it.
ALLOWED_IMAGES_ENV = "RINGPILOT_ALLOWED_IMAGES"
DEADLINE_ENV = "RINGPILOT_RECONCILE_DEADLINE_SECONDS"
# Where the operator's pod mounts the runs volume (read-only); ledgers are read only inside it.
RUNS_ROOT_ENV = "RINGPILOT_RUNS_ROOT"
WORKERS_ENV = "RINGPILOT_RECONCILE_WORKERS"
RECONCILED = "Reconciled"  # condition: False while the object's reconcile is past its deadline


@dataclass(frozen=True)
class LoopSettings:
    deadline_seconds: float = 60.0  # one object's reconcile (planning, decide, apply)
    workers: int = 4  # reconciles in flight at once; a stuck one holds its thread


def build_loop_settings() -> LoopSettings:
    env = os.environ
    loop = LoopSettings(deadline_seconds=float(env.get(DEADLINE_ENV, "60")),
                        workers=int(env.get(WORKERS_ENV, "4")))
    if not 0 < loop.deadline_seconds <= 3600 or not 1 <= loop.workers <= 64:
        raise ValueError(f"${DEADLINE_ENV} must be in (0, 3600] and ${WORKERS_ENV} in 1..64 "
                         f"(got {loop.deadline_seconds} and {loop.workers})")
    return loop


def build_settings() -> Settings:
    env = os.environ
    build_loop_settings()  # checked with the others, so a bad value stops the operator at start
    return Settings(backoff_seconds=float(env.get("RINGPILOT_BACKOFF_SECONDS", "30")),
                    backoff_cap_seconds=float(env.get("RINGPILOT_BACKOFF_CAP_SECONDS", "600")),
                    poll_seconds=float(env.get("RINGPILOT_POLL_SECONDS", "10")),
                    allowed_images=parse_allowed_images(env.get(ALLOWED_IMAGES_ENV, DEFAULT_IMAGE)))


@dataclass
class Cache:
    trainings: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # RayJobs this operator created that the index may not have echoed yet (by namespace, name).
    created: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # kopf's indices, handed over by the first watching handler (handlers get a shallow copy of
    # the operator's memo, so they are kept here, in an object that copy shares).
    rayjobs: Any = None
    nodes: Any = None
    # Reconciles in flight, by object: (its future, when it started, monotonic seconds).
    inflight: dict[tuple[str, str], tuple[Future, float]] = field(default_factory=dict)
    # Objects whose last reconcile overran its deadline: (retry not before, overruns in a row).
    backoff: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    # Objects whose in-flight reconcile has been marked stuck (once per reconcile).
    marked: set[tuple[str, str]] = field(default_factory=set)


def _api() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def read_ledger(spec: dict[str, Any], root: str | None = None) -> LedgerDoc | None:
    """The run ledger, when the run's storage is mounted in the operator's pod too.

    storage.path is written by the tenant, so it is only a hint: the ledger is read only when
    its real path (symlinks resolved) is a regular file inside the runs volume the operator
    mounts (`RINGPILOT_RUNS_ROOT`; unset: no ledger is read), and its size is bounded."""
    root = root if root is not None else os.environ.get(RUNS_ROOT_ENV)
    if not root:
        return None
    try:
        base = os.path.realpath(root)
        path = os.path.realpath(Path(str(spec["storage"]["path"])) / str(spec["name"])
                                / LEDGER_FILE)
        if os.path.commonpath([base, path]) != base or not os.path.isfile(path):
            return None
        return LedgerDoc.model_validate_json(read_bounded(path, "ledger"))
    except (KeyError, TypeError, OSError, ValueError, SpecError) as e:
        log.warning("run ledger not readable: %s", e)
    return None


def read_cluster_yaml(api: client.ApiClient, ns: str, spec: dict[str, Any]) -> str | None:
    """cluster.yaml of the topology ConfigMap named by the spec, if it names one and it exists."""
    topology = spec.get("topology") or {}
    if topology.get("source") != "config-map" or not topology.get("config_map"):
        return None
    try:
        cm = client.CoreV1Api(api).read_namespaced_config_map(topology["config_map"], ns)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise
    return (cm.data or {}).get(CLUSTER_FILE)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our Events describe stage transitions; kopf's per-handler events would only add noise.
    settings.posting.level = logging.WARNING
    # Serve the given namespace only, without listing namespaces or watching CRDs cluster-wide:
    # the RBAC grants neither.
    settings.scanning.disabled = True
    memo.cache, memo.wake = Cache(), asyncio.Event()
    memo.settings, memo.api = build_settings(), _api()
    memo.loop_settings = build_loop_settings()
    memo.pool = ThreadPoolExecutor(memo.loop_settings.workers, thread_name_prefix="reconcile")
    memo.loop = asyncio.get_running_loop()
    memo.loop_task = asyncio.create_task(_reconcile_loop(memo))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    memo.loop_task.cancel()
    memo.pool.shutdown(wait=False, cancel_futures=True)


@kopf.on.probe(id="reconciles", errors=kopf.ErrorsMode.PERMANENT)
async def reconciles_alive(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Liveness: fails (HTTP 500) while any reconcile runs past its deadline."""
    stuck = find_stuck(memo.cache, memo.loop_settings.deadline_seconds, time.monotonic())
    if stuck:
        raise kopf.PermanentError(f"reconcile past its deadline for {', '.join(stuck)}")
    return {"in_flight": len(memo.cache.inflight)}


def find_stuck(cache: Cache, deadline: float, now: float) -> list[str]:
    """ns/name of every object whose reconcile has run longer than `deadline` seconds."""
    return sorted(f"{ns}/{name}" for (ns, name), (future, started) in cache.inflight.items()
                  if not future.done() and now - started > deadline)


# RayJobs and Nodes are kopf indices: kopf starts the watching handlers (training_seen) only
# once every index holds its initial listing, so no StagedTraining is ever reconciled against
# a half-read cluster after a (re)start.
@kopf.index("ray.io", "v1", "rayjobs", labels={LABEL_TRAINING: kopf.PRESENT})
async def rayjobs_by_owner(body: kopf.Body, namespace: str, memo: kopf.Memo,
                           **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    memo.wake.set()
    owners = body.metadata.get("ownerReferences") or []
    return {(namespace, o.get("uid")): dict(body) for o in owners
            if o.get("kind") == "StagedTraining"}


@kopf.index("v1", "nodes")
async def nodes_by_name(body: kopf.Body, name: str, memo: kopf.Memo,
                        **_: Any) -> dict[str, dict[str, Any]]:
    memo.wake.set()
    return {name: dict(body)}


# Async handlers run on the event loop, like the reconcile loop's own bookkeeping
# (asyncio.Event is not thread-safe, and kopf runs sync handlers in threads).
@kopf.on.event(GROUP, VERSION, PLURAL)
async def training_seen(event: dict, body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                        rayjobs_by_owner: kopf.Index, nodes_by_name: kopf.Index,
                        **_: Any) -> None:
    memo.cache.rayjobs, memo.cache.nodes = rayjobs_by_owner, nodes_by_name
    if event.get("type") == "DELETED":
        memo.cache.trainings.pop((namespace, name), None)
    else:
        memo.cache.trainings[(namespace, name)] = dict(body)
    memo.wake.set()


@kopf.on.resume(GROUP, VERSION, PLURAL)
async def resumed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # Nothing to redo: the loop picks the run up from its status and the observed RayJobs.
    stage = (body.get("status") or {}).get("current_stage")
    log.info("resumed %s/%s at stage %s", body.metadata.namespace, body.metadata.name, stage)
    memo.wake.set()


async def _reconcile_loop(memo: kopf.Memo) -> None:
    settings: Settings = memo.settings
    while True:
        try:
            await asyncio.wait_for(memo.wake.wait(), timeout=settings.poll_seconds)
        except asyncio.TimeoutError:
            pass
        memo.wake.clear()
        try:
            await _reconcile_all(memo)
        except Exception:  # the loop must outlive any bug in one pass
            log.exception("reconcile pass failed; retrying next round")


async def _reconcile_all(memo: kopf.Memo) -> None:
    """Start a reconcile for every object that has none in flight (and is not backing off),
    then wait for them up to the deadline; what is still running then is marked stuck."""
    cache: Cache = memo.cache
    if cache.rayjobs is None:  # indices not handed over yet: nothing was seen
        return
    deadline = memo.loop_settings.deadline_seconds
    now = time.monotonic()
    started: list[tuple[str, str]] = []
    for key in list(cache.trainings):
        st = cache.trainings.get(key)
        if st is None or st.get("metadata", {}).get("deletionTimestamp"):
            continue
        if key in cache.inflight or cache.backoff.get(key, (0.0, 0))[0] > now:
            continue
        # Snapshot on the event loop: kopf updates the indices here, never mid-copy.
        jobs = _observed_jobs(memo, st)
        nodes = [n for store in cache.nodes.values() for n in store]
        future = memo.pool.submit(_reconcile_one, memo, st, jobs, nodes, key in cache.backoff)
        cache.inflight[key] = (future, now)
        future.add_done_callback(lambda f, key=key: _on_loop(memo, _finished, memo, key, f))
        started.append(key)
    if started:  # look again once their deadline has passed (the loop never waits on them)
        memo.loop.call_later(deadline + 0.05, memo.wake.set)
    for key in find_stuck(cache, deadline, time.monotonic()):
        ns, name = key.split("/", 1)
        await _mark_stuck(memo, (ns, name), deadline)


def _on_loop(memo: kopf.Memo, fn: Any, *args: Any) -> None:
    try:
        memo.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the operator is stopping and its loop closed: nothing to record
        pass


def _finished(memo: kopf.Memo, key: tuple[str, str], future: Future) -> None:
    """On the event loop, when one object's reconcile ends (in time or late)."""
    cache: Cache = memo.cache
    _, started = cache.inflight.pop(key, (None, 0.0))
    cache.marked.discard(key)
    if time.monotonic() - started <= memo.loop_settings.deadline_seconds:
        cache.backoff.pop(key, None)  # in time: the next overrun starts the backoff afresh
    error = future.exception() if not future.cancelled() else None
    if error is not None:  # one broken object must not stop the others
        log.error("reconcile of %s/%s failed; retrying next round", *key,
                  exc_info=(type(error), error, error.__traceback__))
        return
    if future.cancelled():
        return
    updated = future.result()
    if updated is not None and key in cache.trainings:
        # don't act twice on a status the watch hasn't echoed yet
        cache.trainings[key] = updated


async def _mark_stuck(memo: kopf.Memo, key: tuple[str, str], deadline: float) -> None:
    """A reconcile overran: back its object off (doubling, capped) and say so on its status.

    The thread cannot be stopped; it keeps its pool slot until it returns, and the liveness
    probe fails meanwhile, so a reconcile that never returns gets the operator restarted."""
    cache: Cache = memo.cache
    if key in cache.marked:
        return
    cache.marked.add(key)
    _, overruns = cache.backoff.get(key, (0.0, 0))
    settings: Settings = memo.settings
    delay = min(settings.backoff_seconds * 2 ** overruns, settings.backoff_cap_seconds)
    cache.backoff[key] = (time.monotonic() + deadline + delay, overruns + 1)
    st = cache.trainings.get(key)
    if st is None or overruns:  # said once per stuck spell
        return
    log.error("reconcile of %s/%s still running after %.0fs; it is retried after %.0fs",
              *key, deadline, delay)
    message = (f"the reconcile (planning, decide, apply) took longer than {deadline:g}s; it is "
               f"retried after {delay:g}s. A spec whose planning is this slow may ask for "
               "absurd sizes: check spec.resources and spec.stages")
    status = with_condition(st, RECONCILED, "False", "DeadlineExceeded", message,
                            dt.datetime.now(dt.timezone.utc)).model_dump(mode="json")
    try:  # in the default executor: the pool's threads may all be stuck
        await asyncio.to_thread(
            client.CustomObjectsApi(memo.api).patch_namespaced_custom_object_status,
            GROUP, VERSION, key[0], PLURAL, key[1], {"status": status})
    except Exception as e:
        log.warning("status of %s/%s not written: %s", *key, e)


def _observed_jobs(memo: kopf.Memo, st: dict[str, Any]) -> list[dict[str, Any]]:
    ns, uid = st["metadata"]["namespace"], st["metadata"].get("uid")
    jobs = {j["metadata"]["name"]: j for j in memo.cache.rayjobs.get((ns, uid), [])}
    for (cns, cname), job in list(memo.cache.created.items()):
        if cname in jobs or cns != ns:
            memo.cache.created.pop((cns, cname), None)  # the index has it now
        elif any(o.get("uid") == uid for o in job["metadata"].get("ownerReferences", [])):
            jobs[cname] = job
    return list(jobs.values())


def _reconcile_one(memo: kopf.Memo, st: dict[str, Any], jobs: list[dict[str, Any]],
                   nodes: list[dict[str, Any]], was_stuck: bool = False
                   ) -> dict[str, Any] | None:
    ns = st["metadata"]["namespace"]
    now = dt.datetime.now(dt.timezone.utc)
    spec = st.get("spec") or {}
    decision = plan_reconcile(st, jobs, nodes, now, read_ledger(spec), memo.settings,
                              read_cluster_yaml(memo.api, ns, spec))
    if was_stuck or any(c.type == RECONCILED and c.status == "False"
                        for c in decision.status.conditions):
        decision.status = with_condition(decision.status, RECONCILED, "True", "InTime", "", now)
    updated, created = apply_decision(memo.api, st, decision, now)
    for job in created:  # known at once, so the next pass does not find it "missing"
        memo.loop.call_soon_threadsafe(memo.cache.created.__setitem__,
                                       (ns, job["metadata"]["name"]), job)
    waits = [a.after for a in decision.of(Requeue)]
    if waits and min(waits) < memo.settings.poll_seconds:
        asyncio.run_coroutine_threadsafe(_wake_later(memo, min(waits)), memo.loop)
    return updated


async def _wake_later(memo: kopf.Memo, delay: float) -> None:
    await asyncio.sleep(delay)
    memo.wake.set()
