"""Fixtures of the evaluation tests: a locally trained tokenizer, tiny checkpoints, local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ray_jobs.eval import fixtures
from ray_jobs.eval.model import build_token_counter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tokenizer():
    return fixtures.build_tokenizer()


@pytest.fixture(scope="session")
def count_tokens(tokenizer):
    return build_token_counter(tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return fixtures.build_tiny_model(len(tokenizer), 512)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on loopback for every Ray test of the session."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                           "RAY_USAGE_STATS_ENABLED": "0"}})
    yield ray
    ray.shutdown()
