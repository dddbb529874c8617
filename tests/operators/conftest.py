"""Shared builders for the operator tests: StagedTraining, RayJob and Node objects as dicts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)


def make_training(config: str = "configs/tiny.yaml", *, name: str = "tiny", generation: int = 1,
                  status: dict | None = None, **spec_overrides) -> dict:
    spec = yaml.safe_load((REPO / config).read_text())
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
