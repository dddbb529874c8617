"""The preflight on Ray: one Ray Train worker per planned GPU, each running preflight_ranks.

`main` is `python -m ray_jobs.preflight` (a Ray job's entrypoint) and `ringpilot preflight`.
Stages whose plans use the same GPUs share one worker group; workers are pinned to their
planned nodes by the label the trainer uses (`ringpilot.io/node`), so a worker finds its place
from its node and local rank as a training worker does. A cluster file of one node may run on
a Ray cluster whose node carries no such label (this machine): the workers then are that
node's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from ray_jobs.preflight.cli import DESCRIPTION, add_arguments
from ray_jobs.preflight.run import (
    PreflightConfig,
    StageResult,
    plan_preflight,
    preflight_ranks,
)
from ray_jobs.train.placement import NODE_LABEL
from specs.loading import SpecError, load_model
from specs.run import RunSpec
from topology.graph import split_gpu_vertex
from topology.sources import load_cluster

EXIT_USER_ERROR = 2


class PlacementError(RuntimeError):
    """The planned workers cannot be pinned to their nodes on this Ray cluster."""


def _worker(config: dict) -> None:
    """A Ray Train worker: its place, then preflight_ranks on its stages."""
    import ray
    import ray.train
    import torch

    from ray_jobs.ray_setup import quiet_worker_logs

    quiet_worker_logs()
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    node = ray.get_runtime_context().get_node_labels().get(NODE_LABEL) or config["node"]
    device = ray.train.torch.get_device() if config["gpu"] else torch.device("cpu")
    preflight_ranks(config["preflight"], node, ctx.get_local_rank(), device)


def node_labels_ready(nodes: set[str]) -> bool:
    """Whether every planned node is a live Ray node labelled ringpilot.io/node=<its name>."""
    import ray

    labelled = {(n.get("Labels") or {}).get(NODE_LABEL) for n in ray.nodes() if n["Alive"]}
    return nodes <= labelled


def run_on_ray(config: PreflightConfig, run: RunSpec, address: str | None = None) -> None:
    """Start one worker group per set of planned GPUs and run its stages (rank 0 writes the
    reports). PlacementError when a multi-node plan meets Ray nodes without their labels."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_jobs.ray_setup import connect_ray, quiet_run_config

    res = run.resources
    groups: dict[tuple[str, ...], list] = {}
    for probe in config.stages:
        groups.setdefault(tuple(probe.gpus), []).append(probe)
    connect_ray(address, max(len(g) for g in groups) * res.cpus_per_worker)
    gpu = res.device == "gpu"
    for gpus, stages in groups.items():
        workers = [split_gpu_vertex(g) for g in gpus]
        nodes = {n for n, _ in workers}
        if node_labels_ready(nodes):
            selector, node = [{NODE_LABEL: n} for n, _ in workers], None
        elif len(nodes) == 1:
            selector, node = None, next(iter(nodes))
        else:
            raise PlacementError(f"the plan places workers on nodes {sorted(nodes)}, but Ray's "
                               f"nodes do not all carry the label {NODE_LABEL}=<node>: start "
                               f"each with `ray start --labels {NODE_LABEL}=<its name>`")
        scaling = ScalingConfig(num_workers=len(gpus), use_gpu=gpu, label_selector=selector,
                                resources_per_worker={"CPU": res.cpus_per_worker,
                                                      **({"GPU": 1} if gpu else {})})
        mine = dataclasses.replace(config, stages=stages)
        with tempfile.TemporaryDirectory(prefix="ringpilot-preflight-") as storage:
            TorchTrainer(_worker, train_loop_config={"preflight": mine, "node": node, "gpu": gpu,
                                                     "threads": res.cpus_per_worker},
                         scaling_config=scaling,
                         run_config=RunConfig(name="ringpilot-preflight", storage_path=storage,
                                              **quiet_run_config())).fit()


def read_results(config: PreflightConfig) -> list[StageResult]:
    """Each stage's lines and status from the reports rank 0 wrote."""
    import json

    out = []
    for probe in config.stages:
        doc = json.loads((Path(config.out_dir) / probe.stage / "preflight.json").read_text())
        out.append(StageResult(stage=probe.stage, code=doc["exit_code"],
                               lines=[f["text"] for f in doc["findings"]]))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m ray_jobs.preflight`: the arguments of ray_jobs/preflight/cli.py."""
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.preflight", description=DESCRIPTION)
    return run_preflight(add_arguments(parser).parse_args(argv))


def run_preflight(args: argparse.Namespace) -> int:
    """Plan, probe on Ray (or write the ranks' config), print the findings; 0 when nothing was
    found, 1 with findings, 2 for bad input."""
    try:
        run, spec = load_model(args.run, RunSpec), load_cluster(args.cluster)
        out = Path(args.out) if args.out else run.run_dir / "preflight"
        config = plan_preflight(run, spec, out.absolute(), stage=args.stage,
                                max_bytes=args.max_bytes, reps=args.reps,
                                slow_factor=args.slow_factor,
                                fabric_factor=args.fabric_factor)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as e:
        print(f"ringpilot preflight: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.write_config:
        args.write_config.write_text(config.to_json())
        print(f"wrote {args.write_config}: start one `python -m ray_jobs.preflight.rank "
              f"--config {args.write_config}` per planned GPU")
        return 0
    for probe in config.stages:
        travels = any(len(ring) > 1 for ring in probe.kv_rings())
        hops = (f"ring hops of {probe.kv_bytes / 2**20:.2f} MiB" if travels
                else "no ring hops (ring_degree 1)")
        print(f"[{probe.stage}] {len(probe.gpus)} workers: {hops}, {args.reps} repetitions",
              flush=True)
    try:
        run_on_ray(config, run, args.address)
    except PlacementError as e:
        print(f"ringpilot preflight: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    results = read_results(config)
    for r in results:
        print(f"[{r.stage}] " + "\n  ".join(r.lines))
    print(f"wrote {', '.join(str(Path(config.out_dir) / r.stage) for r in results)}")
    return max(r.code for r in results)
