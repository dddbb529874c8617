"""`ringpilot manifests ...`: print Kubernetes objects for a RunSpec, and the generated CRD."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from operators.render import render_crd, render_ray_cluster, render_staged_training
from operators.resource import DEFAULT_IMAGE


def _labels(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (e.g. "
                                         "nvidia.com/gpu.product=NVIDIA-L40S)")
    return key, value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="RunSpec YAML (e.g. configs/tiny.yaml)")
    p.add_argument("--namespace", help="metadata.namespace (default: none, kubectl's current)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="container image with ringpilot")
    p.add_argument("--node-selector", type=_labels, action="append", default=[],
                   metavar="KEY=VALUE", help="labels of the nodes training may use (repeatable)")
    p.add_argument("--storage-claim", help="PVC mounted at storage.path in the Ray pods")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per worker pod (default 8)")


def _command(args: argparse.Namespace) -> str:
    """The canonical command line for these arguments, printed in the object's header."""
    words = ["ringpilot", "manifests", args.manifests_command, "--run", args.run]
    for flag in ("name", "namespace", "ray_cluster", "storage_claim", "gpus_per_node"):
        value = getattr(args, flag, None)
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", str(value)]
    if args.image != DEFAULT_IMAGE:
        words += ["--image", args.image]
    for key, value in args.node_selector:
        words += ["--node-selector", f"{key}={value}"]
    return shlex.join(words)


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"namespace": args.namespace, "image": args.image,
            "node_selector": dict(args.node_selector), "storage_claim": args.storage_claim,
            "gpus_per_node": args.gpus_per_node, "command": _command(args)}


def _render(args: argparse.Namespace) -> int:
    sys.stdout.write(render_staged_training(args.run, name=args.name, ray_cluster=args.ray_cluster,
                                            **_kwargs(args)))
    return 0


def _raycluster(args: argparse.Namespace) -> int:
    sys.stdout.write(render_ray_cluster(args.run, name=args.name, **_kwargs(args)))
    return 0


def _crd(args: argparse.Namespace) -> int:
    sys.stdout.write(render_crd())
    return 0


def add_manifests_parser(subparsers: argparse._SubParsersAction) -> None:
    manifests = subparsers.add_parser(
        "manifests", help="print Kubernetes objects (StagedTraining, RayCluster, CRD)",
        description="Print Kubernetes objects for a RunSpec; samples under manifests/samples/ are "
        "exactly this output.")
    sub = manifests.add_subparsers(dest="manifests_command", required=True, metavar="WHAT")
    render = sub.add_parser("render", help="the StagedTraining object for a RunSpec")
    _common(render)
    render.add_argument("--name", help="metadata.name (default: the run's name)")
    render.add_argument("--ray-cluster", metavar="NAME",
                        help="run every stage on this existing RayCluster instead of one per stage")
    render.set_defaults(func=_render)
    cluster = sub.add_parser("raycluster", help="a RayCluster sized for a RunSpec")
    _common(cluster)
    cluster.add_argument("--name", required=True, help="metadata.name of the RayCluster")
    cluster.set_defaults(func=_raycluster)
    crd = sub.add_parser("crd", help="the StagedTraining CustomResourceDefinition")
    crd.set_defaults(func=_crd)


def main(argv: list[str] | None = None) -> int:
    """`python -m operators.cli render --run ...` without the ringpilot entry point."""
    parser = argparse.ArgumentParser(prog="ringpilot")
    add_manifests_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
