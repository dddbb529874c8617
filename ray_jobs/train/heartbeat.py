"""What each training worker leaves for the driver's health watch: a heartbeat file per rank, and
on CUDA the environment that makes NCCL's flight recorder dump a hang into the run directory.

A heartbeat is written by a thread beside the training loop every `beat_interval` seconds, never
by the step itself: the loop only sets two attributes (its step and phase). It says where the
training thread is, so the driver can tell a rank that waits on its peers from the rank they wait
for (ray_jobs/train/health.py). Files: RUN_DIR/health/<stage>/attempt-<epoch>/rank-NNNNN.json,
one directory per driver attempt, so a superseded attempt's workers never overwrite a current
beat.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import threading
import time
from pathlib import Path

from specs.atomic import atomic_write

HEALTH_DIR = "health"
# Where a training thread waits on the other ranks when its innermost frame (outside the standard
# library) is here: torch.distributed's collectives and FSDP's waits, the ring's exchange, Ray
# Train's report. Writing a checkpoint's files is work, not a wait.
WAIT_PLACES = ("/torch/distributed/", "/ray/", "/ray_jobs/ring_attention/comm.py")
NOT_WAITS = ("/torch/distributed/checkpoint/filesystem.py",)
BEATS_PER_TIMEOUT = 5  # a stopped heartbeat shows within a fifth of failure.hang_timeout_s
MAX_BEAT_INTERVAL_S = 30.0  # 512 ranks beating on shared storage: ~17 small writes a second
# NCCL flight recorder: entries kept per process (torch's own default, set so a dump never
# depends on it) and the dump file's prefix in the attempt's health directory.
FLIGHT_RECORDER_ENTRIES = 2000
FLIGHT_RECORDER_PREFIX = "nccl-trace-rank"
_STDLIB = sysconfig.get_paths()["stdlib"]


def health_dir(run_dir: Path, stage: str, epoch: int | None) -> Path:
    """The directory of one stage's heartbeats (and NCCL dumps) for one driver attempt."""
    return Path(run_dir) / HEALTH_DIR / stage / f"attempt-{epoch or 0}"


def beat_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rank-{rank:05d}.json"


def beat_interval(hang_timeout_s: float) -> float:
    return min(MAX_BEAT_INTERVAL_S, hang_timeout_s / BEATS_PER_TIMEOUT)


def flight_recorder_env(prefix: Path) -> dict[str, str]:
    """The environment of a CUDA run's workers that makes each NCCL process group record its
    collectives and, when NCCL's watchdog times one out, dump them to `prefix` + its rank.

    torch 2.13 reads TORCH_FR_BUFFER_SIZE and TORCH_FR_DUMP_TEMP_FILE, with the older names
    TORCH_NCCL_TRACE_BUFFER_SIZE and TORCH_NCCL_DEBUG_INFO_TEMP_FILE as fallbacks (both are set,
    for a cluster image with an older torch); TORCH_NCCL_DUMP_ON_TIMEOUT turns the dump on, and
    ProcessGroupNCCL.hpp asks for its monitoring thread with it."""
    entries, path = str(FLIGHT_RECORDER_ENTRIES), str(prefix)
    return {"TORCH_FR_BUFFER_SIZE": entries, "TORCH_NCCL_TRACE_BUFFER_SIZE": entries,
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_ENABLE_MONITORING": "1",
            "TORCH_FR_DUMP_TEMP_FILE": path, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": path}


def where_waiting(frame) -> tuple[bool, str]:
    """(waits on the other ranks?, 'file:line in function') of a thread's innermost frame
    outside the standard library (a wait on a lock or an event is its caller's wait)."""
    while frame is not None and frame.f_back is not None and _in_stdlib(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return False, "unknown"
    name = frame.f_code.co_filename.replace(os.sep, "/")
    waits = any(p in name for p in WAIT_PLACES) and not any(p in name for p in NOT_WAITS)
    short = "/".join(name.split("/")[-3:])
    return waits, f"{short}:{frame.f_lineno} in {frame.f_code.co_name}"


def _in_stdlib(filename: str) -> bool:
    return filename.startswith(_STDLIB) and "site-packages" not in filename


def process_started(pid: int) -> float:
    """When process `pid` started, in clock ticks after boot (/proc/PID/stat field 22): with
    the pid, it names one process, not whichever reuses the number later. -1 where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1.0
    fields = stat.rpartition(")")[2].split()  # the name, in parentheses, may hold spaces
    return float(fields[19]) if len(fields) > 19 else -1.0


class Heartbeat:
    """A thread that writes this rank's heartbeat every `interval` seconds. The training loop
    calls `mark(phase, step)`: two attribute writes, nothing on the step's path waits."""

    def __init__(self, directory: Path, *, rank: int, world: int, node: str, gpu: int,
                 node_id: str, interval: float, ring_prev: int | None = None):
        self.path = beat_path(directory, rank)
        self.interval = interval
        self.step, self.phase = 0, "start"
        self.ring_prev = ring_prev  # known once the stage's mesh is built
        self._fixed = {"rank": rank, "world": world, "node": node, "gpu": gpu,
                       "pid": os.getpid(), "node_id": node_id,
                       "started": process_started(os.getpid())}
        self._watched = threading.get_ident()  # the training thread: the one that calls this
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ringpilot-heartbeat",
                                        daemon=True)

    def start(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._thread.start()
        return self

    def mark(self, phase: str, step: int | None = None) -> None:
        self.phase = phase
        if step is not None:
            self.step = step

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def beat(self) -> None:
        waiting, where = where_waiting(sys._current_frames().get(self._watched))
        atomic_write(self.path, json.dumps({
            **self._fixed, "ring_prev": self.ring_prev, "step": self.step, "phase": self.phase,
            "beat_at": time.time(),
            "waiting": waiting, "where": where}))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except OSError:  # a full or unreachable disk: the next beat tries again
                continue
