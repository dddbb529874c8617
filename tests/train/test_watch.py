"""The driver's ring-health watch without Ray: synthetic step records and heartbeats in a run
directory, a clock the test moves, and a stand-in for ending a process. Also the workers' side:
what a heartbeat says, and the environment a CUDA run's workers get."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ray_jobs.train.config import WorkerConfig
from ray_jobs.train.driver import worker_runtime_env
from ray_jobs.train.health import Beat
from ray_jobs.train.heartbeat import (
    Heartbeat,
    beat_path,
    flight_recorder_env,
    health_dir,
    process_started,
    where_waiting,
)
from ray_jobs.train.progress import health_table, render_progress_line
from ray_jobs.train.watch import HealthWatch
from specs.ledger import Ledger
from specs.run import RunSpec
from tests.train.conftest import mini_spec

TIMEOUT = 60.0


def make_run(tmp_path: Path, device: str = "cpu") -> RunSpec:
    return RunSpec.model_validate(mini_spec(tmp_path / "runs", **{
        "resources.device": device, "failure.hang_timeout_s": TIMEOUT,
        "observability": {"ring_health": {"window_steps": 4, "slow_steps": 3}}}))


class Watched:
    """A watch on stage s64 of a fresh run, its clock in the test's hands."""

    def __init__(self, tmp_path: Path, device: str = "cpu", end=None):
        self.run = make_run(tmp_path, device)
        self.run_dir = self.run.run_dir
        self.ledger = Ledger(self.run_dir, self.run.name).begin_attempt()
        self.now = 0.0
        self.ended: list[Beat] = []
        self.watch = HealthWatch(self.run, self.run_dir, self.ledger, None,
                                 end_process=end or self._end, clock=lambda: self.now)
        self.beats = health_dir(self.run_dir, "s64", self.ledger.epoch)
        self.beats.mkdir(parents=True)
        self.watch.begin_stage("s64")

    def _end(self, beat: Beat) -> None:
        self.ended.append(beat)

    def step(self, step: int, waits: list[float]) -> None:
        self.ledger.append_line(self.run_dir / "metrics" / "s64.jsonl", {
            "step": step, "loss": 1.0, "step_s": 1.0, "kv_wait_s": waits,
            "attn_compute_s": [0.1, 0.1], "ring_prev": [1, 0]})

    def beat(self, rank: int, *, step: int, waiting: bool, beat_at: float,
             where: str = "ray_jobs/ring_attention/comm.py:150 in wait") -> None:
        beat_path(self.beats, rank).write_text(json.dumps({
            "rank": rank, "world": 2, "node": "n0", "gpu": rank, "pid": 1000 + rank,
            "node_id": "abc", "started": 7.0, "step": step, "phase": "step",
            "beat_at": beat_at, "waiting": waiting, "where": where, "ring_prev": 1 - rank}))

    def findings(self):
        entry = self.ledger.read().stages.get("s64")
        return entry.findings if entry else []


def test_a_slow_hop_is_recorded_once_with_its_places(tmp_path):
    w = Watched(tmp_path)
    w.beat(0, step=1, waiting=True, beat_at=1.0)
    w.beat(1, step=1, waiting=True, beat_at=1.0)
    for step in range(1, 7):
        w.step(step, [0.01, 0.5])  # rank 0 -> rank 1 is slow
        if step == 4:
            w.step(3, [0.01, 0.5])  # a restart replays step 3: counted once
        w.watch.poll()
    [hop] = w.findings()
    assert (hop.kind, hop.step, hop.sender, hop.rank, hop.node, hop.gpu) == (
        "slow_hop", 3, 0, 1, "n0", "n0/gpu1")
    assert "slow ring hop rank 0 -> rank 1 (n0/gpu0 -> n0/gpu1)" in hop.message
    lines = [json.loads(x) for x in (w.run_dir / "progress" / "s64.jsonl").read_text()
             .splitlines()]
    assert lines == [{"stage": "s64", "step": 3, "health": "slow_hop", "message": hop.message,
                      "time": lines[0]["time"]}]
    assert render_progress_line(lines[0]) == f"[s64] step 3: {hop.message}"
    table = health_table(w.run, w.ledger.read())
    assert table.rows == [["s64", "3", hop.message]]


def test_a_stopped_rank_is_reported_once_and_ended(tmp_path):
    w = Watched(tmp_path)
    for t in (0.0, 30.0, TIMEOUT + 1):
        w.now = t  # both keep beating; neither takes another step
        w.beat(0, step=5, waiting=True, beat_at=t)
        w.beat(1, step=5, waiting=False, beat_at=t, where="tests/x.py:3 in hook")
        w.watch.poll()
    [hang] = w.findings()
    assert [b.rank for b in w.ended] == [1] and w.ended[0].pid == 1001
    assert (hang.kind, hang.rank, hang.node, hang.gpu, hang.step, hang.dump) == (
        "hang", 1, "n0", "n0/gpu1", 5, None)
    for part in ("no progress for 61 s", "rank 1 (node n0, GPU n0/gpu1, pid 1001) stopped at "
                 "step 5 inside the step, at tests/x.py:3 in hook", "ranks 0 wait for it",
                 "ended its process (pid 1001)", "failure.max_failures 2"):
        assert part in hang.message
    w.now = 2 * TIMEOUT
    w.beat(1, step=5, waiting=False, beat_at=w.now)
    w.watch.poll()
    assert len(w.findings()) == 1 and len(w.ended) == 1  # the same group: said once


def test_a_rank_that_cannot_be_ended_is_reported_with_why_and_a_gpu_run_names_its_dump(
        tmp_path):
    w = Watched(tmp_path, device="gpu", end=lambda beat: "pid 1001 is no longer that worker")
    for t in (0.0, TIMEOUT + 1):
        w.now = t
        w.beat(0, step=2, waiting=True, beat_at=t)
        w.beat(1, step=2, waiting=False, beat_at=t)
        w.watch.poll()
    [hang] = w.findings()
    assert hang.dump == "health/s64/attempt-1/nccl-trace-rank"
    assert ("could not end rank 1 (pid 1001 is no longer that worker); NCCL's watchdog ends "
            "the wait at its timeout") in hang.message
    assert "NCCL flight recorder dumps to health/s64/attempt-1/nccl-trace-rank<rank>" in (
        hang.message)


def test_a_group_whose_heartbeats_all_stopped_is_left_to_ray_train(tmp_path):
    w = Watched(tmp_path)
    w.beat(0, step=3, waiting=True, beat_at=1.0)
    w.beat(1, step=3, waiting=False, beat_at=1.0)
    w.watch.poll()
    w.now = 3 * TIMEOUT  # no beat since: the workers died, Ray Train restarts them
    w.watch.poll()
    assert w.findings() == [] and w.ended == []


def test_the_flight_recorder_environment_of_a_cuda_run(tmp_path):
    """What only a GPU run uses, checked as built: the names torch 2.13 reads (and their
    older spellings), the values, and the dump directory made before the workers start."""
    run = make_run(tmp_path, device="gpu")
    config = WorkerConfig(run=run, stage_index=0, run_dir=run.run_dir, spec_dir=tmp_path,
                          plan=None, workers=2, epoch=4)
    prefix = str(run.run_dir / "health" / "s64" / "attempt-4" / "nccl-trace-rank")
    assert worker_runtime_env(config) == {"env_vars": {
        "TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_FR_DUMP_TEMP_FILE": prefix, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}}
    assert Path(prefix).parent.is_dir()
    cpu = WorkerConfig(run=make_run(tmp_path / "cpu"), stage_index=0, run_dir=tmp_path / "c",
                       spec_dir=tmp_path, plan=None, workers=2, epoch=4)
    assert worker_runtime_env(cpu) == {}  # gloo has no flight recorder
    assert flight_recorder_env(Path("/x/p"))["TORCH_FR_DUMP_TEMP_FILE"] == "/x/p"


def _in(filename: str, body: str) -> dict:
    """Functions compiled as if they lived in `filename` (a frame's file is what counts)."""
    namespace: dict = {}
    exec(compile(body, filename, "exec"), namespace)
    return namespace


WAITS = _in("/venv/site-packages/torch/distributed/fsdp/_fake.py",
            "def wait(event):\n    event.wait()\n")
WORKS = _in("/venv/site-packages/torch/distributed/checkpoint/filesystem.py",
            "def write(event):\n    event.wait()\n")


@pytest.mark.parametrize("blocked_in, waiting, where", [
    (WAITS["wait"], True, "distributed/fsdp/_fake.py:2 in wait"),
    (WORKS["write"], False, "distributed/checkpoint/filesystem.py:2 in write"),
])
def test_where_a_thread_is_tells_waiting_from_working(blocked_in, waiting, where):
    """The innermost frame outside the standard library (threading's wait is its caller's)."""
    event, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (ready.set(), blocked_in(event)))
    thread.start()
    ready.wait()
    try:
        for _ in range(200):  # until it is inside the function, not yet starting
            frame = __import__("sys")._current_frames()[thread.ident]
            if where_waiting(frame) == (waiting, where):
                break
            time.sleep(0.01)
        assert where_waiting(frame) == (waiting, where)
    finally:
        event.set()
        thread.join()


def test_a_heartbeat_says_where_its_training_thread_is(tmp_path):
    """The heartbeat is made on the training thread, beats from its own, and says where the
    training thread is: here, sleeping in this test (not a wait on other ranks)."""
    made, release = threading.Event(), threading.Event()
    box: dict = {}

    def training() -> None:
        box["hb"] = Heartbeat(tmp_path, rank=3, world=4, node="n1", gpu=1, node_id="id",
                              interval=0.05).start()
        box["hb"].mark("step", 7)
        made.set()
        release.wait()  # the training thread is "here"

    thread = threading.Thread(target=training)
    thread.start()
    made.wait()
    try:
        beat = None
        for _ in range(200):
            data = json.loads(beat_path(tmp_path, 3).read_text())
            beat = Beat.from_json(data)
            if beat.step == 7 and "in training" in beat.where:
                break
            time.sleep(0.02)
        assert (beat.rank, beat.world, beat.node, beat.vertex, beat.step, beat.phase) == (
            3, 4, "n1", "n1/gpu1", 7, "step")
        assert not beat.waiting and "test_watch.py" in beat.where
        assert beat.started == process_started(beat.pid) > 0
    finally:
        release.set()
        thread.join()
        box["hb"].stop()


def test_a_stopped_worker_is_ended_only_while_its_pid_is_still_that_process():
    """What the zero-CPU Ray task runs on the stopped rank's node (without Ray here)."""
    import signal
    import subprocess
    import sys

    from ray_jobs.train.watch import _end_process

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        started = process_started(proc.pid)
        assert _end_process(proc.pid, started + 1) == f"pid {proc.pid} is no longer that worker"
        assert _end_process(proc.pid, -1.0) == f"pid {proc.pid} cannot be checked to be that " \
                                               "worker"
        assert proc.poll() is None  # refused: still running
        assert _end_process(proc.pid, started) is None
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
