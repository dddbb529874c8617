"""Shared builders for the operator tests: StagedTraining, RayJob and Node objects as dicts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)
# The operator tests pin their own three stages, so the demo's curriculum in configs/tiny.yaml
# can change without rewriting them.
STAGES = [
    {"name": "s256", "seq_len": 256, "steps": 100, "batch_size": 8, "lr": 1.0e-3,
     "ring_degree": 2, "data_parallel_degree": 1},
    {"name": "s1k", "seq_len": 1024, "steps": 60, "batch_size": 2, "lr": 5.0e-4,
     "ring_degree": 2, "data_parallel_degree": 1},
    {"name": "s4k", "seq_len": 4096, "steps": 20, "batch_size": 1, "lr": 3.0e-4,
     "ring_degree": 2, "data_parallel_degree": 1},
]


def tiny_spec(config: str = "configs/tiny.yaml") -> dict:
    """A RunSpec dict from `config`; the tiny default's stages replaced by STAGES."""
    spec = yaml.safe_load((REPO / config).read_text())
    if spec["name"] == "tiny":
        spec["stages"] = [dict(s) for s in STAGES]
    return spec


def make_training(config: str = "configs/tiny.yaml", *, name: str = "tiny", generation: int = 1,
                  status: dict | None = None, **spec_overrides) -> dict:
    spec = tiny_spec(config)
    spec.update(spec_overrides)
    obj = {"apiVersion": "ringpilot.io/v1alpha1", "kind": "StagedTraining",
           "metadata": {"name": name, "namespace": "ml", "uid": "uid-1", "generation": generation},
           "spec": spec}
    if status is not None:
        obj["status"] = status
    return obj


def make_job(name: str, job_status: str = "RUNNING", deployment: str = "Running",
             end: str | None = None) -> dict:
    status = {"jobStatus": job_status, "jobDeploymentStatus": deployment}
    if end:
        status["endTime"] = end
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "namespace": "ml"}, "status": status}


def make_node(name: str, ready: bool = True, cordoned: bool = False, labels: dict | None = None
              ) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name,
                         "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": {"unschedulable": True} if cordoned else {},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


@pytest.fixture
def repo() -> Path:
    return REPO
