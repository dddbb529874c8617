"""Shared fixtures: one local Ray cluster on 127.0.0.1 for the module, tiny RunSpec files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.support.specs import set_dotted

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def mini_spec(storage: Path, name: str = "mini", **overrides) -> dict:
    """A run small enough for tests: 2 CPU workers in one ring, two short stages."""
    spec = {
        "name": name,
        "model": {"path": None, "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "rope_theta": 10000.0, "pretrain_seq_len": 64, "dtype": "float32"},
        "stages": [
            {"name": "s64", "seq_len": 64, "steps": 6, "batch_size": 2, "lr": 3e-3,
             "ring_degree": 2, "data_parallel_degree": 1},
            {"name": "s128", "seq_len": 128, "steps": 4, "batch_size": 1, "lr": 1e-3,
             "ring_degree": 2, "data_parallel_degree": 1},
        ],
        "resources": {"device": "cpu", "workers": 2, "cpus_per_worker": 1},
        "data": {"seed": 0, "mix": {"passkey": 0.5, "kv_retrieval": 0.5},
                 "tokenizer": {"vocab_size": 512}},
        "eval": {"enabled": False},
        "storage": {"path": str(storage), "checkpoint_every": 3, "keep_last": 2},
        "failure": {"max_failures": 2, "report_every": 2},
    }
    for dotted, value in overrides.items():
        set_dotted(spec, dotted, value)
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def ray_cluster(local_ray):
    """The session's local Ray cluster (tests/conftest.py), by its GCS address."""
    return local_ray
