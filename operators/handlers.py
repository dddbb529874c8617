"""kopf wiring: index RayJobs and Nodes, cache StagedTrainings; one loop reconciles them.

Handlers stay thin: they keep an in-memory copy of what the watches report and wake the
reconcile loop, which calls the pure `plan_reconcile` and `apply_decision`. The loop is one task,
so reconciles never race each other, and everything is rebuilt from the watches' initial
listings after a restart (kopf holds the watching handlers back until its indices are full).
No per-object timer or daemon, hence no finalizer: deletion cascades through owner references
and needs no cleanup by the operator.

Run: `kopf run -m operators.handlers --namespace NS --standalone` (`python -m operators`
adds a Lease so one replica at a time is active).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client, config

from operators.admission import parse_allowed_images
from operators.apply import apply_decision
from operators.decide import Requeue, Settings, plan_reconcile
from operators.rayjob import CLUSTER_FILE, LABEL_TRAINING
from operators.resource import DEFAULT_IMAGE, GROUP, PLURAL, VERSION
from specs.ledger import LEDGER_FILE, LedgerDoc

log = logging.getLogger("ringpilot.operator")
# The images StagedTrainings may run (comma separated); `python -m operators --allowed-image`
# sets it. Unset: the operator's own image as the manifests name it.
ALLOWED_IMAGES_ENV = "RINGPILOT_ALLOWED_IMAGES"


def build_settings() -> Settings:
    env = os.environ
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


def _api() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def read_ledger(spec: dict[str, Any]) -> LedgerDoc | None:
    """The run ledger, when the run's storage is mounted in the operator's pod too."""
    try:
        path = Path(spec["storage"]["path"]) / spec["name"] / LEDGER_FILE
        if path.is_file():
            return LedgerDoc.model_validate_json(path.read_text(encoding="utf-8"))
    except (KeyError, TypeError, OSError, ValueError) as e:
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
    memo.loop = asyncio.get_running_loop()
    memo.loop_task = asyncio.create_task(_reconcile_loop(memo))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    memo.loop_task.cancel()


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
    if memo.cache.rayjobs is None:  # indices not handed over yet: nothing was seen
        return
    for key in list(memo.cache.trainings):
        st = memo.cache.trainings.get(key)
        if st is None or st.get("metadata", {}).get("deletionTimestamp"):
            continue
        # Snapshot on the event loop: kopf updates the indices here, never mid-copy.
        jobs = _observed_jobs(memo, st)
        nodes = [n for store in memo.cache.nodes.values() for n in store]
        try:
            updated = await asyncio.to_thread(_reconcile_one, memo, st, jobs, nodes)
        except Exception:  # one broken object must not stop the others
            log.exception("reconcile of %s/%s failed; retrying next round", *key)
            continue
        if updated is not None:  # don't act twice on a status the watch hasn't echoed yet
            memo.cache.trainings[key] = updated


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
                   nodes: list[dict[str, Any]]) -> dict[str, Any] | None:
    ns = st["metadata"]["namespace"]
    now = dt.datetime.now(dt.timezone.utc)
    spec = st.get("spec") or {}
    decision = plan_reconcile(st, jobs, nodes, now, read_ledger(spec), memo.settings,
                              read_cluster_yaml(memo.api, ns, spec))
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
