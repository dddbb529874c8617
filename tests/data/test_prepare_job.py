"""`python -m ray_jobs.prepare` submitted with `ray job submit` to a private Ray head on loopback
(started and stopped as the demo launcher does: ringpilot.launch.Demo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_jobs.ray_setup import free_port
from ringpilot.launch import EXCLUDES, LOOPBACK, Demo, StopSignals
from tests.data.corpus import documents, write_jsonl, write_parquet
from tests.train.conftest import mini_spec, write_spec

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_prepare_runs_under_ray_job_submit(tmp_path):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", documents(1, 30))
    write_parquet(tmp_path / "corpus" / "b.parquet", documents(2, 30))
    spec = mini_spec(tmp_path / "runs", **{"data.mix": {"documents": 1.0, "passkey": 0,
                                                        "kv_retrieval": 0}})
    spec["data"]["prepared"] = {"path": str(tmp_path / "prepared"), "sources": [
        {"name": "web", "paths": [str(tmp_path / "corpus" / "*")]}]}
    run = write_spec(tmp_path / "run.yaml", spec)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    demo = Demo(str(Path(sys.executable).parent / "ray"), env, StopSignals())
    try:
        demo.start_head(free_port(), 2)
        runtime_env = {"excludes": EXCLUDES, "env_vars": {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": f"{LOOPBACK}:{demo.gcs_port}"}}
        submit = [demo.ray, "job", "submit", "--address", demo.url, "--working-dir", ".",
                  "--runtime-env-json", json.dumps(runtime_env), "--",
                  sys.executable, "-m", "ray_jobs.prepare", "--run", str(run)]
        # The job agent registers a little after the dashboard answers; until it does, a
        # submit fails with one of these (a loaded machine has taken more than 30 s). Retried
        # for up to 2 minutes, as the demo's launcher retries its submit.
        deadline = time.monotonic() + 120
        while True:
            done = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=240)
            said = done.stdout + done.stderr
            if time.monotonic() > deadline or not any(
                    m in said for m in ("Failed to connect", "No available agent")):
                break
            time.sleep(2)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "succeeded" in output and "prepare: stage s64:" in output
        manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
        assert manifest["sources"][0]["documents"] == 60
        assert manifest["stages"]["s64"]["sequences"] > 0
    finally:
        demo.stop()
