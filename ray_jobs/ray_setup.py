"""Joining Ray and keeping its console quiet: shared by the training driver, its workers and
`ringpilot calibrate`."""

from __future__ import annotations

import os

# Ray's and Ray Train's console level on the driver and in the workers. Warnings and errors show;
# INFO lines (connecting, worker-group start, each report) stay in Ray's session log files.
# RINGPILOT_RAY_LOG_LEVEL=INFO shows them again (it is read where the driver and workers start).
RAY_LOG_LEVEL = os.environ.get("RINGPILOT_RAY_LOG_LEVEL", "WARNING").upper()


def connect_ray(address: str | None, local_cpus: int) -> None:
    """Join `address`, RAY_ADDRESS or the job's cluster; else (a laptop without a cluster) start
    a private one on loopback with `local_cpus` CPUs (training's plus spare ones for actors)."""
    import ray

    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True,
                 logging_level=RAY_LOG_LEVEL)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=local_cpus, logging_level=RAY_LOG_LEVEL)


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
