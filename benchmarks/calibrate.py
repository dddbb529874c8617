"""Calibration on this machine: the cost model's step time for the tiny run against measured.

    python benchmarks/calibrate.py [--steps 40]

1. `ringpilot calibrate` of configs/clusters/local-cpu.yaml with the tiny run's shapes (two Ray
   Train workers, gloo on loopback): timed as `calibrate_seconds`;
2. the tiny run's four stages trained `--steps` steps each on the same local Ray cluster (the
   shapes, batches and ring of configs/tiny.yaml; eval off);
3. `ringpilot plan --profile --compare`: predicted over measured step time per stage.
Last line: one JSON object with `predicted_over_measured_step` per stage, `worst_ratio` (the
one furthest from 1, either way) and `calibrate_seconds`. Timings are noisy: other processes
share the 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import yaml  # noqa: E402

CLUSTER = REPO / "configs" / "clusters" / "local-cpu.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps trained per stage (40)")
    args = parser.parse_args()
    from ray_jobs.train.driver import main as train
    from ringpilot.cli import main as ringpilot
    from specs.loading import load_model
    from specs.plan import Plan
    from specs.run import RunSpec
    from topology.measured import measured_steps

    tmp = Path(tempfile.mkdtemp(prefix="ringpilot-calibrate-bench-"))
    spec = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    for stage in spec["stages"]:
        stage.update(steps=args.steps, warmup_steps=min(stage.get("warmup_steps", 0), 5))
    spec.update(name="calib", eval={"enabled": False})
    spec["storage"] = {"path": str(tmp / "runs"), "checkpoint_every": args.steps, "keep_last": 1}
    run_file = tmp / "calib.yaml"
    run_file.write_text(yaml.safe_dump(spec, sort_keys=False))

    import ray

    from ray_jobs.ray_setup import start_local_ray

    start_local_ray(4, log_to_driver=False)
    t0 = time.perf_counter()
    profile = tmp / "local-profile.yaml"
    assert ringpilot(["calibrate", "--run", str(run_file), "--cluster", str(CLUSTER),
                      "--out", str(profile)]) == 0
    calibrate_seconds = time.perf_counter() - t0
    assert train(["--run", str(run_file)]) == 0
    ray.shutdown()

    out = tmp / "plan"
    assert ringpilot(["plan", "--run", str(run_file), "--cluster", str(CLUSTER), "--profile",
                      str(profile), "--compare", str(tmp / "runs" / "calib"),
                      "--out", str(out)]) == 0
    plan = Plan.model_validate_json((out / "plan.json").read_text())
    measured = measured_steps(tmp / "runs" / "calib")
    run = load_model(run_file, RunSpec)
    ratios = {s.name: round(p.prediction.step_seconds / measured[s.name].step_seconds, 3)
              for s, p in zip(run.stages, plan.stages)}
    worst = max(ratios.values(), key=lambda r: max(r, 1 / r))
    print(json.dumps({"predicted_over_measured_step": ratios, "worst_ratio": worst,
                      "calibrate_seconds": round(calibrate_seconds, 1),
                      "target": "0.75 <= ratio <= 1.33 for every stage"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
