"""`make demo`: a Ray head on loopback, the run submitted as a Ray job, logs streamed, head stopped.

    python -m ringpilot.launch [--run configs/tiny.yaml] [--fresh] [--calibrate CLUSTER.yaml]

Starts `ray start --head --block` as a child process (so stopping it stops only this head, never
another Ray on the machine), submits `python -m ray_jobs.train --run RUN` with `ray job submit
--working-dir .` (streams the job's output: progress lines and the summary; with --calibrate the
job first measures the cluster's profile and the summary predicts each stage's step), then measures
passkey retrieval at the longest stage's length for the first stage's and the last stage's final
checkpoints, and stops the head, also on failure.

SIGINT, SIGTERM or SIGHUP: one line says what is being stopped; the job is stopped, then the head
(and only the head this launcher started), each within a bounded wait, then whatever is left of
the head's processes is killed by id; exit code 128 + the signal's number, no traceback. A
second Ctrl-C skips the graceful part. Checkpoints are committed atomically, so the run resumes
from the last committed one on the next `make demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ray_jobs.ray_setup import free_port
from ringpilot import processes

LOOPBACK = "127.0.0.1"
EXCLUDES = [".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "runs",
            "out"]


def _port_free(port: int) -> bool:
    """Nothing listens on `port` (connections of a closed server lingering in TIME_WAIT do not
    count: they do not stop a new server from binding it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _wait_dashboard(url: str, alive, timeout: float = 120) -> None:
    """Until the dashboard at `url` answers; `alive()` raises once the head is gone."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive()
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (e.g. 401 with token authentication on)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the Ray dashboard at {url} did not answer within {timeout:.0f} s")


STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGHUP: 129, signal.SIGTERM: 143}  # 128 + number
GRACE_S = {"job": 10.0, "head": 10.0}  # bounded waits of the graceful stop
# Ray's job supervisor writes a header into every job's log, "... INFO job_manager.py:NNN --
# Runtime env is setting up." and "Running entrypoint for job <id>: <command>", with no setting
# to turn it off. The demo, which has just said what it submitted, does not repeat it on the
# console; the saved log keeps it.


def supervisor_header(line: str) -> bool:
    return (line.endswith("-- Runtime env is setting up.")
            or line.startswith("Running entrypoint for job "))


class TransientRayWarning:
    """Drops one warning of Ray Train's from the console: its controller asks Ray's autoscaling
    coordinator for the workers' resources with a 5 s timeout, and on a loaded machine it logs
    the timeout as a warning with a 20-line traceback that says itself it is "safe to ignore"
    (nothing autoscales a private head). A newcomer reads a traceback as a failure. The job's
    whole log (save_job_log) keeps it; any other line, from any process, is shown."""

    START = "Failed to send resource request for "
    END = "GetTimeoutError"

    def __init__(self) -> None:
        self._tag: str | None = None  # the warning's "(TrainController pid=N)" prefix

    def drop(self, line: str) -> bool:
        if self._tag is None:
            if self.START in line and "safe to ignore" in line:
                self._tag = line[: line.index(self.START)]
                return True
            return False
        rest = line[len(self._tag):] if line.startswith(self._tag) else None
        if rest is not None and (rest.startswith(("Traceback", " ")) or self.END in rest):
            if self.END in rest:
                self._tag = None
            return True
        self._tag = None  # the block ended otherwise: show this line
        return False


class Interrupted(Exception):
    """A stop signal arrived while the demo ran."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP while the demo runs: the first raises Interrupted where the
    launcher is (so it stops what it started); once stopping, a signal only asks to hurry (a
    second Ctrl-C skips the graceful part). Restores the previous handlers on exit."""

    def __init__(self):
        self.stopping = False
        self.hurry = False

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame) -> None:
        if self.stopping:
            self.hurry = True
            return
        self.stopping = True
        raise Interrupted(signum)


def say(line: str) -> None:
    """Print a launcher line; a closed terminal (SIGHUP) must not stop the clean-up."""
    try:
        print(line, flush=True)
    except OSError:
        pass


class Demo:
    """What the launcher started (the Ray head and the job) and how to stop it."""

    def __init__(self, ray: str, env: dict[str, str], signals: StopSignals):
        self.ray, self.env, self.signals = ray, env, signals
        self.head: subprocess.Popen | None = None
        self.url: str | None = None
        self.job: str | None = None
        self.gcs_port: int | None = None
        self.head_log: Path | None = None
        self.keep_head_log = False  # it names why the head died
        self.timings: dict[str, float] = {}

    def start_head(self, dashboard_port: int, num_cpus: int) -> None:
        self.url = f"http://{LOOPBACK}:{dashboard_port}"
        # Ray's fixed default ports (agent 52365, ...) collide with any other Ray on the
        # machine, and a head whose agent cannot bind accepts no jobs: every listener gets a
        # free port.
        agent_ports = [f"--{name}={free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "ray-client-server-port")]
        # Its own session: a terminal's Ctrl-C reaches the launcher only, which stops it. No
        # drain on SIGTERM (Ray's default waits up to 30 s for the node to drain, for Serve
        # replicas; this private head runs one job, which the launcher has stopped by then).
        env = {**self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.gcs_port = free_port()
        # `ray start --block` says on its output which of its processes died and where its
        # logs are, then stops the rest: kept, so that a head gone mid-demo can say why.
        fd, log = tempfile.mkstemp(prefix="ringpilot-ray-head-", suffix=".log")
        self.head_log = Path(log)
        self.head = subprocess.Popen(
            [self.ray, "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
             f"--port={self.gcs_port}", "--include-dashboard=true",
             f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}",
             *agent_ports, f"--num-cpus={num_cpus}", "--disable-usage-stats"],
            env=env, stdout=fd, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(fd)
        say(f"demo: Ray head started (pid {self.head.pid}), dashboard {self.url}")
        _wait_dashboard(self.url, self.head_alive)

    def head_alive(self) -> None:
        """Raise, with the end of the head's own output, if the head has exited."""
        if self.head is None or self.head.poll() is None:
            return
        lines = self.head_log.read_text(encoding="utf-8", errors="replace").splitlines()
        said = [line for line in lines if line.strip()][-12:]
        self.keep_head_log = True
        raise RuntimeError(f"the Ray head exited with code {self.head.returncode}; the end of "
                           f"its output ({self.head_log}):\n" + "\n".join(said))

    def submit(self, job: str, run_path: str, calibrate: str | None = None) -> None:
        # No preemption watcher: it guards against cloud nodes being reclaimed, which a
        # private loopback head is not, and each stage's start logs an error-level line about
        # its restart policy that reads like a failure.
        runtime_env = {"excludes": EXCLUDES,
                       "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                    # Ray Train's placement-group cleaner asks the state API
                                    # whether the controller lives; without an address that
                                    # API takes the newest Ray on the machine, and with another
                                    # Ray there it found no controller and removed the
                                    # workers' placement group mid-stage. Name this head.
                                    "RAY_ADDRESS": f"{LOOPBACK}:{self.gcs_port}",
                                    # The job's tables are printed to fit this terminal.
                                    "COLUMNS": str(shutil.get_terminal_size((160, 24)).columns)}}
        submit = [self.ray, "job", "submit", "--address", self.url, "--working-dir", ".",
                  "--no-wait", "--submission-id", job, "--runtime-env-json",
                  json.dumps(runtime_env), "--",
                  sys.executable, "-m", "ray_jobs.train", "--run", run_path]
        if calibrate:
            submit += ["--calibrate", calibrate]
        for attempt in range(30):  # the job agent registers a little after the dashboard answers
            self.head_alive()
            if subprocess.run(submit, env=self.env, capture_output=attempt < 29,
                              start_new_session=True).returncode == 0:
                self.job = job
                return
            time.sleep(2)
        raise RuntimeError(f"ray job submit to {self.url} kept failing")

    def follow(self) -> int:
        """Stream the job's output (through the job SDK: the `ray job logs` CLI adds its own
        banner lines) until it ends; its exit code."""
        import asyncio
        import logging

        from ray.job_submission import JobSubmissionClient

        # the SDK's own INFO lines (its logger sets its level itself)
        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
        client = JobSubmissionClient(self.url)

        transient = TransientRayWarning()

        async def tail() -> None:
            async for chunk in client.tail_job_logs(self.job):
                for line in chunk.rstrip("\n").split("\n"):
                    if not supervisor_header(line) and not transient.drop(line):
                        say(line)

        asyncio.run(tail())
        return _job_exit_code(self.url, self.job)

    def save_job_log(self, run_dir: Path) -> Path | None:
        """The job's whole output as Ray kept it, in the run directory's logs/."""
        from ray.job_submission import JobSubmissionClient

        try:
            text = JobSubmissionClient(self.url).get_job_logs(self.job)
        except Exception:  # the head is gone or never took the job: nothing to save
            return None
        path = run_dir / "logs" / f"{self.job}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def stop(self) -> None:
        """Stop the job (unless hurried) and the head; SIGKILL by id what is
        left of the head's processes after a bounded wait."""
        hurry = lambda: self.signals.hurry  # noqa: E731
        t0 = time.perf_counter()
        if self.job is not None and self.signals.stopping and not hurry():
            _stop_job(self.url, self.job, GRACE_S["job"], hurry)
        self.timings["job"] = time.perf_counter() - t0
        if self.head_log is not None and not self.keep_head_log:
            self.head_log.unlink(missing_ok=True)  # the head's own logs stay in its session dir
        if self.head is None or self.head.poll() is not None:
            return
        t0 = time.perf_counter()
        procs = processes.tree(self.head.pid)  # before the head goes: orphans leave the tree
        # `ray start --block` stops what it started on SIGTERM (sent to it alone: the children
        # are its to stop, in order).
        self.head.terminate()
        left = processes.wait_gone(procs, 0 if hurry() else GRACE_S["head"], hurry)
        self.timings["head"] = time.perf_counter() - t0
        self.timings["killed"] = len(left)
        processes.kill(left)
        self.head.wait()
        processes.kill(processes.wait_gone(procs, 5))  # children of the killed


def _stop_job(url: str, job: str, timeout: float, hurry) -> None:
    """Ask Ray to stop the job (SIGTERM to its driver, SIGKILL after Ray's grace) and wait for
    it up to `timeout` s."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(url)
        client.stop_job(job)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not hurry():
            if client.get_job_status(job) in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                              JobStatus.STOPPED):
                return
            time.sleep(0.5)
    except Exception as e:  # the head may be going already; stopping it ends the job anyway
        say(f"demo: could not stop job {job} through {url} ({e.__class__.__name__}); stopping "
            "the head ends it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringpilot.launch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="configs/tiny.yaml",
                        help="RunSpec YAML (default: the tiny run)")
    parser.add_argument("--num-cpus", type=int, default=4,
                        help="logical CPUs of the head: training workers plus spare ones "
                        "for eval actors")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--fresh", action="store_true", help="delete the run directory first "
                        "(otherwise a finished run is only summarised, an unfinished one resumed)")
    parser.add_argument("--calibrate", metavar="CLUSTER", default=None,
                        help="ClusterSpec YAML of this machine: the job calibrates it first and "
                        "its summary sets the predicted step time beside the measured one")
    args = parser.parse_args(argv)

    from specs.loading import load_or_report
    from specs.run import RunSpec
    run = load_or_report(args.run, RunSpec)
    if run is None:
        return 2
    run_dir = run.run_dir
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)

    # Loopback only, so no token authentication between the CLI and this head.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    if not _port_free(args.dashboard_port):  # never submit to somebody else's Ray
        port = free_port()
        print(f"demo: port {args.dashboard_port} is taken by another process; this head's "
              f"dashboard uses {port}", flush=True)
        args.dashboard_port = port
    t0 = time.perf_counter()
    with StopSignals() as signals:
        demo = Demo(str(Path(sys.executable).parent / "ray"), env, signals)
        try:
            demo.start_head(args.dashboard_port, args.num_cpus)
            demo.submit(f"ringpilot-{run.name}-{int(time.time())}", args.run, args.calibrate)
            say(f"demo: submitted Ray job {demo.job} to {demo.url}; streaming its logs")
            code = demo.follow()
            log = demo.save_job_log(run_dir)
            say(f"demo: job finished with exit code {code} after {time.perf_counter() - t0:.0f} s"
                + (f"; its whole log: {log}" if log else ""))
            _print_tensorboard(run, run_dir)
            if code == 0 and len(run.stages) > 1:
                _print_retrieval(run, run_dir)
        except Interrupted as e:
            code = STOP_SIGNALS[e.signum]
            say(f"\ndemo: {e} received: stopping Ray job {demo.job or '(none submitted)'} and the "
                f"Ray head this demo started (pid {demo.head.pid if demo.head else '-'}); "
                "a second Ctrl-C skips the graceful stop")
        except RuntimeError as e:  # the head or the submission failed: say so, no traceback
            say(f"demo: {e}")
            code = 1
        finally:
            signals.stopping = True  # from here a signal only hurries the clean-up
            t1 = time.perf_counter()
            demo.stop()
        if code in STOP_SIGNALS.values():
            t = demo.timings
            say(f"demo: stopped in {time.perf_counter() - t1:.1f} s (job {t.get('job', 0):.1f} s, "
                f"head {t.get('head', 0):.1f} s, {t.get('killed', 0):.0f} processes killed by "
                f"id). {run_dir} keeps every "
                "committed checkpoint: `make demo` resumes from the last one, `make demo "
                "DEMO_ARGS=--fresh` starts over")
    return code


def _job_exit_code(url: str, job: str) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                          JobStatus.STOPPED):
        time.sleep(1)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _print_tensorboard(run, run_dir: Path) -> None:
    """Where the loss curves are and the one command that opens them (observability)."""
    logdir = run_dir / "tensorboard"
    if not (run.observability.tensorboard and logdir.is_dir()):
        return
    venv_tool = Path(sys.executable).parent / "tensorboard"
    tool = venv_tool if venv_tool.is_file() else Path("tensorboard")
    say(f"demo: TensorBoard curves of every stage on one step axis are in {_short(logdir)}; "
        f"open them with: {_short(tool)} --logdir {_short(logdir)}")


def _short(path: Path) -> str:
    """`path` relative to the working directory when it is inside it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_retrieval(run, run_dir: Path) -> None:
    """Passkey retrieval at the longest length: first stage's model vs the final model."""
    from transformers.utils import logging as hf_logging

    from ray_jobs.eval.retrieval import retrieval_scores
    from specs.checkpoint import final_checkpoint
    from specs.ledger import Ledger

    hf_logging.disable_progress_bar()
    ledger = Ledger(run_dir, run.name)
    first, last = (final_checkpoint(ledger, s.name) for s in (run.stages[0], run.stages[-1]))
    length = run.stages[-1].seq_len
    if first is None or last is None:
        return
    for name, path in ((run.stages[0].name, first), (run.stages[-1].name, last)):
        r = retrieval_scores(path, length)
        print(f"demo: passkey at {length:,} tokens, 32 held-out prompts, stage {name} model: all "
              f"5 digits right {r.exact:.0%}, digits right {r.digits:.0%}, answer-token loss "
              f"{r.loss:.2f} (chance: 10 %, 2.30)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
