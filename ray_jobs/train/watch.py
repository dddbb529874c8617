"""The driver's ring-health watch: a thread that reads the workers' step records and heartbeats
from the run directory, asks ray_jobs/train/health.py what they show, and reports each finding
once: a line in the stage's progress log, an entry in the ledger (the operator's Events and
status come from there), the run summary's table.

For a hang it does one thing more. When the ranks that wait name a rank that stopped after its
first step, the watch ends that rank's process (SIGKILL, from a zero-CPU Ray task on its node,
after checking that the pid is still that worker): Ray Train then sees a dead worker and restarts
the group from the last committed checkpoint, as it does for any worker that dies
(failure.max_failures). Nothing else would end a stuck but living worker soon: the waits of its
peers end only at torch's collective timeout (gloo: 30 minutes; NCCL: 10 minutes, when its
watchdog also dumps the flight recorder). Any other hang (every rank waiting in a collective, a
rank stopped while loading) is reported and left to that timeout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray_jobs.train.health import (
    Beat,
    Hang,
    RankView,
    SlowHop,
    SlowHopDetector,
    diagnose_hang,
    render_hang,
    render_slow_hop,
    suspect_links,
)
from ray_jobs.train.heartbeat import (
    FLIGHT_RECORDER_PREFIX,
    health_dir,
    process_started,
)
from specs.ledger import MAX_LINKS, MAX_MESSAGE, Fenced, Ledger
from specs.plan import Plan
from specs.run import RunSpec
from topology.graph import Link

log = logging.getLogger("ringpilot.watch")
Route = Callable[[str, str], list[Link]]
# The plan's part that a hop's wait is held against (topology/cost.py predict_stage).
EXPOSED_KV = "exposed ring K/V"


def cluster_route(run: RunSpec, spec_dir: Path | None) -> Route | None:
    """Routes between GPU vertices on resources.cluster's graph (None without one)."""
    if not run.resources.cluster:
        return None
    from topology.graph import Router, build_graph
    from topology.sources import load_cluster

    path = Path(run.resources.cluster)
    spec = load_cluster(path if path.is_absolute() else (spec_dir or Path.cwd()) / path)
    return Router(spec, build_graph(spec)).route


def end_worker_process(beat: Beat) -> str | None:
    """End a stopped rank's process on its node (None), or say why not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_end_process)
    on_node = NodeAffinitySchedulingStrategy(beat.node_id, soft=False)
    try:
        return ray.get(task.options(scheduling_strategy=on_node).remote(beat.pid, beat.started),
                       timeout=120)
    except Exception as e:  # noqa: BLE001 - a node gone, Ray busy: reported, never raised
        return f"{e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _end_process(pid: int, started: float) -> str | None:
    if started < 0:  # no /proc where it beat: nothing tells that pid is still the worker
        return f"pid {pid} cannot be checked to be that worker"
    if process_started(pid) != started:  # ended meanwhile, or the number is another's now
        return f"pid {pid} is no longer that worker"
    os.kill(pid, signal.SIGKILL)
    return None


@dataclass
class _Stage:
    """What the watch knows of the stage being trained."""

    name: str
    detector: SlowHopDetector
    beats: Path  # this attempt's heartbeat directory
    offset: int  # bytes of the metrics file read
    last_step: int = 0  # steps a restart replays are not counted twice
    views: dict[int, RankView] = field(default_factory=dict)
    reported_groups: set[frozenset] = field(default_factory=set)


class HealthWatch:
    """`start()`, then `begin_stage(name)` / `end_stage()` around each stage, `stop()`."""

    def __init__(self, run: RunSpec, run_dir: Path, ledger: Ledger, predicted: Plan | None,
                 route: Route | None = None,
                 end_process: Callable[[Beat], str | None] = end_worker_process,
                 clock: Callable[[], float] = time.monotonic,
                 warn: Callable[[str], None] | None = None):
        self.run, self.run_dir, self.ledger = run, Path(run_dir), ledger
        self.predicted, self.route, self.end_process = predicted, route, end_process
        self.clock = clock
        self.timeout = run.failure.hang_timeout_s
        self.interval = min(2.0, self.timeout / 8)
        self._warn = warn or log.warning
        self._warned = False
        self._stage: _Stage | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ringpilot-health", daemon=True)

    def start(self) -> HealthWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def begin_stage(self, name: str) -> None:
        """Watch `name` from now on: records already in its metrics file are an earlier run's."""
        rh = self.run.observability.ring_health
        metrics = self._metrics(name)
        with self._lock:
            self._stage = _Stage(
                name=name, detector=SlowHopDetector(rh.window_steps, rh.slow_steps,
                                                    rh.slow_factor, self._predicted_wait(name)),
                beats=health_dir(self.run_dir, name, self.ledger.epoch),
                offset=metrics.stat().st_size if metrics.is_file() else 0)

    def end_stage(self) -> None:
        with self._lock:
            if self._stage is not None:
                self._guarded(self._read_steps, self._stage)
            self._stage = None

    def poll(self) -> None:
        """One look at the stage's records and heartbeats (the thread's round)."""
        with self._lock:
            if self._stage is not None:
                self._guarded(self._read_steps, self._stage)
                self._guarded(self._check_hang, self._stage)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def _guarded(self, look: Callable[[_Stage], None], stage: _Stage) -> None:
        """A look whose failure is said once: the watch must never take training down."""
        try:
            look(stage)
        except Fenced:
            self._stop.set()  # a newer driver owns the run: it watches from now on
        except Exception as e:  # noqa: BLE001
            if not self._warned:
                self._warned = True
                self._warn(f"ring health: watching {stage.name} failed ({e.__class__.__name__}: "
                           f"{e}); training goes on unwatched where this repeats")

    # -- slow hops -------------------------------------------------------------------------
    def _metrics(self, name: str) -> Path:
        return self.run_dir / "metrics" / f"{name}.jsonl"

    def _predicted_wait(self, name: str) -> float | None:
        try:
            sp = self.predicted.stage(name) if self.predicted is not None else None
        except KeyError:
            return None
        return sp.prediction.parts_seconds.get(EXPOSED_KV) if sp and sp.prediction else None

    def _read_steps(self, stage: _Stage) -> None:
        path = self._metrics(stage.name)
        if not path.is_file():
            return
        with open(path, encoding="utf-8") as fh:
            fh.seek(stage.offset)
            data = fh.read()
        complete = data[: data.rfind("\n") + 1]
        stage.offset += len(complete.encode())
        for line in complete.splitlines():
            rec = json.loads(line)
            waits, prevs = rec.get("kv_wait_s"), rec.get("ring_prev")
            if rec.get("step", 0) <= stage.last_step or not isinstance(prevs, list):
                continue
            stage.last_step = rec["step"]
            for hop in stage.detector.observe(rec["step"], rec.get("step_s") or 0.0, waits,
                                              prevs, rec.get("attn_compute_s")):
                self._report_slow_hop(stage, hop)

    def _report_slow_hop(self, stage: _Stage, hop: SlowHop) -> None:
        self._read_beats(stage)
        places = {r: v.beat for r, v in stage.views.items()}
        src, dst = places.get(hop.sender), places.get(hop.receiver)
        links = None
        if self.route is not None and src is not None and dst is not None:
            healthy = [(places[a].vertex, places[b].vertex)
                       for a, b in stage.detector.healthy() if a in places and b in places]
            links = suspect_links(self.route, (src.vertex, dst.vertex), healthy)
        message = render_slow_hop(hop, places, links, stage.detector.factor)
        self._record(stage.name, message, kind="slow_hop", step=hop.step, rank=hop.receiver,
                     node=dst.node if dst else None, gpu=dst.vertex if dst else None,
                     sender=hop.sender,
                     links=[f"{a} -> {b}" for a, b in links or []][:MAX_LINKS])

    # -- hangs -----------------------------------------------------------------------------
    def _read_beats(self, stage: _Stage) -> None:
        now = self.clock()
        for path in sorted(stage.beats.glob("rank-*.json")):
            try:
                beat = Beat.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being replaced, or not a heartbeat: the next look reads it
            old = stage.views.get(beat.rank)
            if old is None or old.beat.pid != beat.pid:
                stage.views[beat.rank] = RankView(beat, now, now)
                continue
            moved = (old.beat.step, old.beat.phase) != (beat.step, beat.phase)
            stage.views[beat.rank] = RankView(
                beat, now if moved else old.progressed_at,
                now if beat.beat_at != old.beat.beat_at else old.beat_seen_at)

    def _check_hang(self, stage: _Stage) -> None:
        self._read_beats(stage)
        hang = diagnose_hang(stage.views, self.clock(), self.timeout)
        if hang is None:
            return
        group = frozenset((r, v.beat.pid) for r, v in stage.views.items())
        if group in stage.reported_groups:
            return
        stage.reported_groups.add(group)
        gpu = self.run.resources.device == "gpu"
        dump = (os.path.relpath(stage.beats / FLIGHT_RECORDER_PREFIX, self.run_dir)
                if gpu else None)
        action = self._act(hang, gpu)
        first = hang.stopped[0] if hang.stopped else None
        self._record(stage.name, render_hang(hang, action, dump), kind="hang",
                     step=hang.step, rank=first.rank if first else None,
                     node=first.node if first else None, gpu=first.vertex if first else None,
                     dump=dump)

    def _act(self, hang: Hang, gpu: bool) -> str:
        """End the stopped ranks that may be ended; say what was done, or what will end it."""
        timeout = ("NCCL's watchdog ends the wait at its timeout" if gpu else
                   "torch's collective timeout ends the wait")
        if not hang.stopped:
            return f"reported only: {timeout}"
        if not hang.endable:
            return (f"reported only: not past its first step (loading can be slow); {timeout}")
        failed = {b.rank: why for b in hang.endable if (why := self.end_process(b)) is not None}
        ended = [b for b in hang.endable if b.rank not in failed]
        said = []
        if ended:
            said.append(f"ended {'its process' if len(ended) == 1 else 'their processes'} "
                        f"(pid {', '.join(str(b.pid) for b in ended)}): Ray Train restarts the "
                        "group from the last committed checkpoint (failure.max_failures "
                        f"{self.run.failure.max_failures})")
        said += [f"could not end rank {r} ({why}); {timeout}" for r, why in failed.items()]
        return "; ".join(said)

    def _record(self, stage: str, message: str, **finding) -> None:
        """One finding: the ledger's entry, then the progress log's line."""
        message = message[:MAX_MESSAGE]  # many ranks named at once: the line is cut, not lost
        self.ledger.record_finding(stage, {**finding, "message": message})
        self.ledger.append_line(self.run_dir / "progress" / f"{stage}.jsonl",
                                {"stage": stage, "step": finding["step"],
                                 "health": finding["kind"], "message": message,
                                 "time": time.time()})
