"""kopf wiring: cache StagedTrainings, their RayJobs and Nodes; one loop reconciles them.

Handlers stay thin: they keep an in-memory copy of what the watches report and wake the
reconcile loop, which calls the pure `plan_reconcile` and `apply_decision`. The loop is one task,
so reconciles never race each other, and the caches are rebuilt from the watches' initial
listing after a restart. No per-object timer or daemon, hence no finalizer: deletion cascades
through owner references and needs no cleanup by the operator.

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

from operators.apply import apply_decision
from operators.decide import Requeue, Settings, plan_reconcile
from operators.rayjob import CLUSTER_FILE, LABEL_TRAINING
from operators.resource import GROUP, PLURAL, VERSION
from ray_jobs.ledger import LEDGER_FILE, LedgerDoc

log = logging.getLogger("ringpilot.operator")


def build_settings() -> Settings:
    env = os.environ
    return Settings(backoff_seconds=float(env.get("RINGPILOT_BACKOFF_SECONDS", "30")),
                    backoff_cap_seconds=float(env.get("RINGPILOT_BACKOFF_CAP_SECONDS", "600")),
                    poll_seconds=float(env.get("RINGPILOT_POLL_SECONDS", "10")))


@dataclass
class Cache:
    trainings: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    jobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _store(table: dict, key: Any, event: dict[str, Any], body: Any) -> None:
    if event.get("type") == "DELETED":
        table.pop(key, None)
    else:
        table[key] = dict(body)


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


@kopf.on.event(GROUP, VERSION, PLURAL)
def training_seen(event: dict, body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                  **_: Any) -> None:
    _store(memo.cache.trainings, (namespace, name), event, body)
    memo.wake.set()


@kopf.on.event("ray.io", "v1", "rayjobs", labels={LABEL_TRAINING: kopf.PRESENT})
def rayjob_seen(event: dict, body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                **_: Any) -> None:
    _store(memo.cache.jobs, (namespace, name), event, body)
    memo.wake.set()


@kopf.on.event("v1", "nodes")
def node_seen(event: dict, body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> None:
    _store(memo.cache.nodes, name, event, body)
    memo.wake.set()


@kopf.on.resume(GROUP, VERSION, PLURAL)
def resumed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
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
        for key in list(memo.cache.trainings):
            st = memo.cache.trainings.get(key)
            if st is None or st.get("metadata", {}).get("deletionTimestamp"):
                continue
            try:
                updated = await asyncio.to_thread(_reconcile_one, memo, st)
            except Exception:  # one broken object must not stop the others
                log.exception("reconcile of %s/%s failed; retrying next round", *key)
                continue
            if updated is not None:  # don't act twice on a status the watch hasn't echoed yet
                memo.cache.trainings[key] = updated


def _reconcile_one(memo: kopf.Memo, st: dict[str, Any]) -> dict[str, Any] | None:
    ns, name = st["metadata"]["namespace"], st["metadata"]["name"]
    uid = st["metadata"].get("uid")
    jobs = [j for (jns, _), j in memo.cache.jobs.items() if jns == ns and any(
        o.get("uid") == uid for o in j.get("metadata", {}).get("ownerReferences", []) or [])]
    now = dt.datetime.now(dt.timezone.utc)
    decision = plan_reconcile(st, jobs, list(memo.cache.nodes.values()), now,
                              read_ledger(st.get("spec") or {}), memo.settings,
                              read_cluster_yaml(memo.api, ns, st.get("spec") or {}))
    updated = apply_decision(memo.api, st, decision, now)
    waits = [a.after for a in decision.of(Requeue)]
    if waits and min(waits) < memo.settings.poll_seconds:
        asyncio.run_coroutine_threadsafe(_wake_later(memo, min(waits)), memo.loop)
    return updated


async def _wake_later(memo: kopf.Memo, delay: float) -> None:
    await asyncio.sleep(delay)
    memo.wake.set()
