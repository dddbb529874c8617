"""`make demo`: a Ray head on loopback, the run submitted as a Ray job, logs streamed, head stopped.

    python -m ringpilot.launch [--run configs/tiny.yaml] [--fresh]

Starts `ray start --head --block` as a child process (so stopping it stops only this head, never
another Ray on the machine), submits `python -m ray_jobs.train --run RUN` with `ray job submit
--working-dir .` (streams the job's output: progress lines and the summary), then measures
passkey retrieval at the longest stage's length for the first stage's and the last stage's final
checkpoints, and stops the head, also on failure or Ctrl-C.
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
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"
EXCLUDES = [".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "runs",
            "out"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _wait_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode} before the dashboard "
                               "came up")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (e.g. 401 with token authentication on)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the Ray dashboard at {url} did not answer within {timeout:.0f} s")


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
    args = parser.parse_args(argv)

    from specs.loading import SpecError, load_model
    from specs.run import RunSpec
    try:
        run = load_model(args.run, RunSpec)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return 2
    run_dir = run.run_dir
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)

    # Loopback only, so no token authentication between the CLI and this head.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    ray = str(Path(sys.executable).parent / "ray")
    if not _port_free(args.dashboard_port):  # never submit to somebody else's Ray
        port = _free_port()
        print(f"demo: port {args.dashboard_port} is taken by another process; this head's "
              f"dashboard uses {port}", flush=True)
        args.dashboard_port = port
    url = f"http://{LOOPBACK}:{args.dashboard_port}"
    # Ray's fixed default ports (agent 52365, ...) collide with any other Ray on the machine, and
    # a head whose agent cannot bind accepts no jobs: give every listener a free port.
    agent_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
         f"--port={_free_port()}", "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
         f"--dashboard-port={args.dashboard_port}",
         *agent_ports, f"--num-cpus={args.num_cpus}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    try:
        _wait_dashboard(url, head)
        runtime_env = {"excludes": EXCLUDES,
                       "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}}
        job = f"ringpilot-{run.name}-{int(time.time())}"
        submit = [ray, "job", "submit", "--address", url, "--working-dir", ".", "--no-wait",
                  "--submission-id", job, "--runtime-env-json", json.dumps(runtime_env), "--",
                  sys.executable, "-m", "ray_jobs.train", "--run", args.run]
        for attempt in range(30):  # the job agent registers a little after the dashboard answers
            if subprocess.run(submit, env=env, capture_output=attempt < 29).returncode == 0:
                break
            time.sleep(2)
        else:
            raise RuntimeError(f"ray job submit to {url} kept failing")
        print(f"demo: submitted Ray job {job} to {url}; streaming its logs", flush=True)
        subprocess.call([ray, "job", "logs", "--address", url, "--follow", job], env=env)
        code = _job_exit_code(url, job)
        print(f"demo: job finished with exit code {code} after {time.perf_counter() - t0:.0f} s",
              flush=True)
        if code == 0 and len(run.stages) > 1:
            _print_retrieval(run, run_dir)
        return code
    finally:
        # `ray start --block` tears down the processes it started on SIGTERM: only this head.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _job_exit_code(url: str, job: str) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                          JobStatus.STOPPED):
        time.sleep(1)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _print_retrieval(run, run_dir: Path) -> None:
    """Passkey retrieval at the longest length: first stage's model vs the final model."""
    from transformers.utils import logging as hf_logging

    from ray_jobs.checkpoint import final_checkpoint
    from ray_jobs.model import retrieval_scores
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
