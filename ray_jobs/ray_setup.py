"""Joining Ray and keeping its console quiet: shared by the training driver, its workers and
`ringpilot calibrate`; and the one way this project picks a port for a server it starts."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

# Ray's and Ray Train's console level on the driver and in the workers. Warnings and errors show;
# INFO lines (connecting, worker-group start, each report) stay in Ray's session log files.
# RINGPILOT_RAY_LOG_LEVEL=INFO shows them again (it is read where the driver and workers start).
RAY_LOG_LEVEL = os.environ.get("RINGPILOT_RAY_LOG_LEVEL", "WARNING").upper()
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients look first


def connect_ray(address: str | None, local_cpus: int) -> None:
    """Join `address`, RAY_ADDRESS or the job's cluster; else (a laptop without a cluster) start
    a private one on loopback with `local_cpus` CPUs (training's plus spare ones for actors)."""
    import ray

    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        # a driver started beside a cluster that start_local_ray made (tests, benchmarks: its
        # environment has state_api_env()) passes the State API on to its own job's actors
        api = os.environ.get(STATE_API_ENV)
        extra = ({"runtime_env": {"env_vars": {STATE_API_ENV: api}}}
                 if api and not ray.is_initialized() else {})
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True,
                 logging_level=RAY_LOG_LEVEL, **extra)
    else:
        start_local_ray(local_cpus, logging_level=RAY_LOG_LEVEL)


_local_state_api: str | None = None  # the State API of the cluster start_local_ray started


def state_api_env() -> dict[str, str]:
    """The environment a driver started in a subprocess beside the cluster start_local_ray
    started here needs (its connect_ray hands the State API on to its own job's actors); empty
    when this process started none."""
    return {STATE_API_ENV: _local_state_api} if _local_state_api else {}


def start_local_ray(num_cpus: int, *, env_vars: dict[str, str] | None = None, **options) -> str:
    """Start a private Ray on loopback with `num_cpus` CPUs (the one way the trainer, the tests
    and the benchmarks start one); every actor of this driver gets `env_vars` and
    RAY_API_SERVER_ADDRESS, the State API of this cluster. Returns the GCS address.

    Why the State API: Ray Train's placement-group cleaner (an actor each TorchTrainer.fit
    starts) asks it every second whether the controller still lives, and stopping the cleaner
    waits for that check. A cluster that ray.init starts leaves an actor no way to find its API
    server, so each check waited 40 s for a GCS it could not discover and every fit's shutdown
    waited out the cleaner's 12 s stop timeout: 16 s from a stage's last report to fit
    returning, 5 s with the address given (benchmarks/RESULTS.md). The dashboard serves the
    State API; it listens on loopback, on a free port."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    global _local_state_api
    port = free_port()
    # Only the job's actors get it, never this process's environment: a `ray job submit` or a
    # launcher started from here would follow it to this cluster instead of its own --address.
    _local_state_api = f"http://127.0.0.1:{port}"
    env = {STATE_API_ENV: _local_state_api, **(env_vars or {})}
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus,
             include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": env}, **options)
    return ray.get_runtime_context().gcs_address


def quiet_run_config() -> dict:
    """RunConfig arguments that keep Ray Train's own INFO lines (worker-group start, every
    report) in its log files, not on the console (none on a Ray before LoggingConfig)."""
    try:
        from ray.train import LoggingConfig
    except ImportError:
        return {}
    return {"logging_config": LoggingConfig(log_level=RAY_LOG_LEVEL)}


def quiet_worker_logs() -> None:
    """The driver prints one progress line per report; keep per-report and per-file chatter out.

    RunConfig's LoggingConfig quiets the `ray.train` loggers, but Ray Train logs each report
    from a worker through a logger named by its source file path, outside `ray.train`: it
    reaches the console through the root logger, whose level is lowered here (the records of
    `ray.train` itself still reach Ray's system log files at every level)."""
    import logging

    import transformers

    logging.getLogger().setLevel(RAY_LOG_LEVEL)
    transformers.utils.logging.disable_progress_bar()


# Ports for the servers this project starts (a Ray head's listeners, a process group's store) come
# from above Ray's worker ports (its default --max-worker-port) and below the kernel's ephemeral
# range. A port from the ephemeral range (what binding port 0 returns) is free only for the
# moment it was asked: until the server binds it, every outgoing connection and every port-0
# server on the machine may take it (a Ray head starting opens hundreds), and then the server
# dies at bind. Below the ephemeral range the kernel hands out nothing by itself.
RAY_MAX_WORKER_PORT = 19999
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_given: set[int] = set()
_random = random.SystemRandom()  # not the process's seeded generator: forked ranks share it


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host`, outside the kernel's ephemeral range, and not one
    this process handed out before."""
    try:
        ephemeral_low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    low, high = RAY_MAX_WORKER_PORT + 1, ephemeral_low - 1
    for _ in range(1000 if high - low >= 100 else 0):
        port = _random.randint(low, high)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _given.add(port)
        return port
    # an unusual kernel setting leaves no room below the ephemeral range: ask the kernel
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
