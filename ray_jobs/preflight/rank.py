"""One preflight rank started by hand, where Ray cannot start it (torchrun, network namespaces).

    python -m ray_jobs.preflight.rank --config ranks.json --node host1 [--local 0]

`--config` is a PreflightConfig as JSON (`ringpilot preflight ... --write-config FILE` writes it);
the rendezvous is torch.distributed's env:// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, as
torchrun sets them; gloo binds where GLOO_SOCKET_IFNAME says). --node and --local say which
planned worker this process is (defaults: RINGPILOT_NODE and LOCAL_RANK). Rank 0 writes the
report, prints one line per finding and exits 1 when there is one; the other ranks exit 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ray_jobs.preflight.probe import check_device
from ray_jobs.preflight.run import PreflightConfig, preflight_ranks

TIMEOUT = timedelta(minutes=10)


def worker_device(kind: str, local: int) -> torch.device:
    """The device a rank works on, built as the trainer builds it: the CPU, or its own GPU
    torch.device("cuda", local rank)."""
    return check_device(torch.device("cuda", local) if kind == "cuda" else torch.device("cpu"))


def process_group_kwargs(device: torch.device) -> dict:
    """init_process_group's arguments for `device`: gloo on the CPU; NCCL bound to the rank's
    own GPU (device_id must carry an index: torch refuses torch.device("cuda"))."""
    device = check_device(device)
    if device.type == "cuda":
        return {"backend": "nccl", "device_id": device, "timeout": TIMEOUT}
    return {"backend": "gloo", "timeout": TIMEOUT}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.preflight.rank",
                                description="One rank of a preflight (env:// rendezvous).")
    p.add_argument("--config", required=True, type=Path, help="PreflightConfig JSON")
    p.add_argument("--node", default=os.environ.get("RINGPILOT_NODE"),
                   help="this worker's node in the cluster file (default: RINGPILOT_NODE)")
    p.add_argument("--local", type=int, default=int(os.environ.get("LOCAL_RANK", "0")),
                   help="this worker's device index on its node (default: LOCAL_RANK, or 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo) or cuda (NCCL, the GPU of --local)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this rank (1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if not args.node:
        print("--node: give this worker's node name in the cluster file (or RINGPILOT_NODE)",
              file=sys.stderr)
        return 2
    config = PreflightConfig.from_json(args.config.read_text())
    device = worker_device(args.device, args.local)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(**process_group_kwargs(device))
    try:
        results = preflight_ranks(config, args.node, args.local, device)
        dist.barrier()  # every rank past its last transfer before any closes its connections
    finally:
        dist.destroy_process_group()
    if results is None:
        return 0
    for result in results:
        print(f"[{result.stage}]", *result.lines, sep="\n  ")
    return max((r.code for r in results), default=0)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not the interpreter's finalization: gloo's threads can still release tensors there and
    # abort the process (pytorch/pytorch#179291; tests/support/worlds.py leaves the same way).
    os._exit(code)
