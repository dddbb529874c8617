"""`make demo` interrupted: the launcher stops the job and the head it started, and only those.

Each test starts the real launcher (`python -m ringpilot.launch`: a Ray head on loopback, the run
submitted with `ray job submit`) on a two-stage mini run in a process group of its own, waits for
the first committed checkpoint, sends a signal as a terminal or a process manager would, and
checks: the conventional exit code, no traceback, every process of the head (snapshotted by id
just before the signal) gone, the dashboard port free, clean-up within 30 s, and a ledger that
lists only committed checkpoints. After SIGINT the launcher runs again and resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ray_jobs.ray_setup import free_port
from ringpilot import processes
from ringpilot.launch import STOP_SIGNALS, Interrupted, StopSignals, _port_free
from specs.checkpoint import locate
from specs.ledger import Ledger, is_committed
from tests.train.conftest import mini_spec, write_spec

ROOT = Path(__file__).resolve().parents[1]
CLEANUP_S = 30


class Launcher:
    """The launcher in its own session, its output collected line by line in a thread."""

    def __init__(self, spec: Path, port: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ringpilot.launch", "--run", str(spec), "--num-cpus", "3",
             "--dashboard-port", str(port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def head_pid(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith("demo: Ray head started (pid "):
                    return int(line.split("(pid ")[1].split(")")[0])
            assert self.proc.poll() is None, self.output
            time.sleep(0.2)
        raise AssertionError(f"no head pid line:\n{self.output}")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        """After a failed check: let the launcher clean up (SIGTERM), then make sure, by id,
        that nothing it started survives the test (a SIGKILLed launcher would orphan its head)."""
        head = next((int(line.split("(pid ")[1].split(")")[0]) for line in self.lines
                     if line.startswith("demo: Ray head started (pid ")), None)
        procs = processes.tree(head) if head else set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=CLEANUP_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        processes.kill(procs)


def committed_checkpoints(run_dir: Path, stage: str) -> list[Path]:
    doc = Ledger(run_dir, "mini").read()
    entry = doc.stages.get(stage)
    return [run_dir / c.path for c in (entry.checkpoints if entry else [])]


@pytest.fixture
def mini_run(tmp_path):
    spec = mini_spec(tmp_path / "runs", **{"stages.0.steps": 150, "stages.1.steps": 3})
    return write_spec(tmp_path / "run.yaml", spec), tmp_path / "runs" / "mini"


def interrupt(mini_run, signum: int, whole_group: bool) -> tuple[str, float]:
    """Run the launcher until stage s64 committed a checkpoint, then send `signum` (to the
    launcher's process group, as a terminal's Ctrl-C does, or to the launcher alone, as `kill`
    does); check everything the issue asks of the clean-up. Returns (output, clean-up s)."""
    spec, run_dir = mini_run
    port = free_port()
    launcher = Launcher(spec, port)
    try:
        head = launcher.head_pid()
        deadline = time.monotonic() + 300
        # a committed checkpoint, and the first progress lines streamed to the terminal
        while not (committed_checkpoints(run_dir, "s64") and "[s64] step" in launcher.output):
            assert launcher.proc.poll() is None, launcher.output
            assert time.monotonic() < deadline, launcher.output
            time.sleep(0.5)
        procs = processes.tree(head)
        assert len(procs) > 3  # the head, GCS, raylet, workers, the job's driver ...
        t0 = time.monotonic()
        if whole_group:
            os.killpg(launcher.proc.pid, signum)
        else:
            launcher.proc.send_signal(signum)
        code = launcher.wait(timeout=CLEANUP_S + 30)
        cleanup = time.monotonic() - t0
    finally:
        launcher.stop()
    out = launcher.output
    assert code == STOP_SIGNALS[signum], out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert f"demo: {signal.Signals(signum).name} received: stopping Ray job" in out
    assert processes.alive(procs) == set(), f"left running: {processes.alive(procs)}"
    assert _port_free(port), f"dashboard port {port} still taken"
    assert cleanup < CLEANUP_S, f"clean-up took {cleanup:.1f} s"
    listed = committed_checkpoints(run_dir, "s64")
    assert listed and all(is_committed(p) for p in listed), listed
    print(f"{signal.Signals(signum).name}: cleaned up in {cleanup:.1f} s")
    return out, cleanup


@pytest.mark.ray
def test_ctrl_c_stops_job_and_head_and_the_next_run_resumes(mini_run):
    interrupt(mini_run, signal.SIGINT, whole_group=True)
    spec, run_dir = mini_run
    last = Ledger(run_dir, "mini").latest_committed("s64")
    # The rerun finishes the stage six steps after the checkpoint it resumes from (150 steps were
    # there only to keep the first run busy until the signal; training the rest was 40 s of this
    # test) and saves only at the end of each stage: a spec's steps and storage may change
    # between runs.
    resume_at = locate(last).step
    write_spec(spec, mini_spec(run_dir.parent, **{"stages.0.steps": resume_at + 6,
                                                 "stages.1.steps": 3,
                                                 "storage.checkpoint_every": 150,
                                                 "failure.report_every": 3}))
    again = Launcher(spec, free_port())
    try:
        code = again.wait(timeout=600)
    finally:
        again.stop()
    assert code == 0, again.output
    # what a newcomer sees: the project's lines, and none of Ray's INFO chatter
    out = again.output
    for line in ("demo: Ray head started", "run mini: Llama", "[s64] step", "[s128] step",
                 "final loss", "demo: job finished with exit code 0",
                 "demo: TensorBoard curves of every stage", "--logdir"):
        assert line in out, f"{line!r} missing from:\n{out}"
    for noise in ("Reporting training result", "TrainingReport(", "PreemptionWatcher",
                  "Started training worker group", "Setting up process group",
                  "Connecting to existing Ray cluster", "WebSocket closed", "SUCC cli.py",
                  "Runtime env is setting up", "Running entrypoint", "Traceback"):
        assert noise not in out, f"{noise!r} in:\n{out}"
    assert f"[s64] seq_len 64, rope theta 10,000; resuming from {last.name}" in again.output
    doc = Ledger(run_dir, "mini").read()
    assert doc.stages["s64"].state == "done" and doc.stages["s128"].state == "done"


@pytest.mark.ray
def test_sigterm_stops_job_and_head(mini_run):
    interrupt(mini_run, signal.SIGTERM, whole_group=False)


@pytest.mark.parametrize("signum", sorted(STOP_SIGNALS))
def test_every_stop_signal_interrupts_with_its_exit_code(signum):
    """SIGHUP (a closed terminal) takes the launcher's one path that the end-to-end tests above
    follow for SIGINT and SIGTERM: the handler raises Interrupted with the signal, whose exit
    code is 128 + its number."""
    with StopSignals():
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs before this returns
    assert e.value.signum == signum and STOP_SIGNALS[signum] == 128 + signum


def test_first_signal_interrupts_a_second_only_hurries():
    """The launcher's handler, in this process: the first signal raises where the code is, a
    signal during the clean-up must not abort it, only ask it to hurry."""
    # What was there before (default_int_handler, or one that Ray Train's trainer left behind
    # in this process when an earlier test ran it in-process) is what must come back.
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs before this returns
        assert e.value.signum == signal.SIGTERM and not signals.hurry
        os.kill(os.getpid(), signal.SIGINT)  # no exception: stopping already
        time.sleep(0.1)
        assert signals.hurry
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_the_demo_says_where_the_tensorboard_files_are(tmp_path, capsys, monkeypatch):
    from ringpilot.launch import _print_tensorboard
    from specs.run import RunSpec

    monkeypatch.chdir(tmp_path)
    run = RunSpec.model_validate(mini_spec(Path("runs")))
    _print_tensorboard(run, Path("runs") / "mini")
    assert capsys.readouterr().out == ""  # no event files yet: nothing to open
    (tmp_path / "runs" / "mini" / "tensorboard" / "s64").mkdir(parents=True)
    _print_tensorboard(run, Path("runs") / "mini")
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("demo: TensorBoard curves of every stage")
    assert line.endswith("tensorboard --logdir runs/mini/tensorboard"), line
    off = run.model_copy(update={"observability": run.observability.model_copy(
        update={"tensorboard": False})})
    _print_tensorboard(off, Path("runs") / "mini")
    assert capsys.readouterr().out == ""


def test_rays_transient_resource_request_warning_stays_off_the_console():
    """On a loaded machine Ray Train's controller logs a timed-out request to the autoscaling
    coordinator as a warning with a traceback ("safe to ignore"): dropped, and only it."""
    from ringpilot.launch import TransientRayWarning

    tag = "\x1b[36m(TrainController pid=7421)\x1b[0m "
    block = [tag + "Failed to send resource request for train-b32d. If this only happens "
             "transiently during network partition or CPU being overloaded, it's safe to ignore "
             "this error. If this error persists, file a GitHub issue.",
             tag + "Traceback (most recent call last):",
             tag + '  File "ray/train/v2/autoscaling_coordinator_client.py", line 58, in send',
             tag + "    ray.get(",
             tag + "    ^^^^^^^^",
             tag + "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready."]
    lines = (["[s64] seq_len 64, rope theta 10,000; starting"] + block
             + ["[s64] step    50/150  loss 2.4132", tag + "Traceback (most recent call last):",
                tag + "  File \"x.py\", line 1", tag + "ValueError: ours"])
    transient = TransientRayWarning()
    shown = [line for line in lines if not transient.drop(line)]
    assert shown == [lines[0]] + lines[len(block) + 1:]  # our own traceback stays
    # a block cut short by another line ends there: that line and what follows are shown
    transient = TransientRayWarning()
    cut = block[:2] + ["[s64] step 3/150", tag + "  File \"y.py\", line 2"]
    assert [line for line in cut if not transient.drop(line)] == cut[2:]
