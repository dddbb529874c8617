"""`ringpilot manifests ...`: print Kubernetes objects for a RunSpec, and the generated CRD."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Any

from operators.admission import parse_image
from operators.render import render_crd, render_ray_cluster, render_staged_training
from operators.resource import DEFAULT_IMAGE, K8S_NAME, MAX_GPUS_PER_NODE
from specs.loading import SpecError

# Every value below lands in a rendered manifest (and the command line in its header comment):
# each is checked for its Kubernetes syntax, so none can carry a newline into the output.
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?\Z")


def _k8s_name(text: str) -> str:
    if len(text) > 253 or not re.match(K8S_NAME, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Kubernetes name (lowercase letters, digits, '-' and '.', at "
            "most 253, starting and ending with a letter or digit; e.g. tiny-run)")
    return text


def _image(text: str) -> str:
    try:
        parse_image(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if text != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has surrounding whitespace; remove it")
    return text


def _path(text: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise argparse.ArgumentTypeError(f"{text!r} contains control characters (a newline?); "
                                         "give the file's path")
    return text


def _gpus(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_GPUS_PER_NODE:
        raise argparse.ArgumentTypeError(f"expected a whole number 1..{MAX_GPUS_PER_NODE}, got "
                                         f"{text!r}")
    return value


def _labels(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (e.g. "
                                         "nvidia.com/gpu.product=NVIDIA-L40S)")
    if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Kubernetes label (KEY=VALUE, e.g. "
                                         "nvidia.com/gpu.product=NVIDIA-L40S; values at most 63 "
                                         "letters, digits, '-', '_' or '.')")
    return key, value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=_path,
                   help="RunSpec YAML (e.g. configs/tiny.yaml)")
    p.add_argument("--namespace", type=_k8s_name,
                   help="metadata.namespace (default: none, kubectl's current)")
    p.add_argument("--image", default=DEFAULT_IMAGE, type=_image,
                   help="container image with ringpilot")
    p.add_argument("--node-selector", type=_labels, action="append", default=[],
                   metavar="KEY=VALUE", help="labels of the nodes training may use (repeatable)")
    p.add_argument("--storage-claim", type=_k8s_name,
                   help="PVC mounted at storage.path in the Ray pods")
    p.add_argument("--gpus-per-node", type=_gpus, help="GPUs per worker pod (default 8)")


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
    return _write(lambda: render_staged_training(args.run, name=args.name,
                                                 ray_cluster=args.ray_cluster, **_kwargs(args)))


def _raycluster(args: argparse.Namespace) -> int:
    return _write(lambda: render_ray_cluster(args.run, name=args.name, **_kwargs(args)))


def _write(render: Any) -> int:
    """The rendered text on stdout; a spec problem is its one message on stderr, exit 2."""
    try:
        text = render()
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return 2
    sys.stdout.write(text)
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
    render.add_argument("--name", type=_k8s_name,
                        help="metadata.name (default: the run's name)")
    render.add_argument("--ray-cluster", metavar="NAME", type=_k8s_name,
                        help="run every stage on this existing RayCluster instead of one per stage")
    render.set_defaults(func=_render)
    cluster = sub.add_parser("raycluster", help="a RayCluster sized for a RunSpec")
    _common(cluster)
    cluster.add_argument("--name", required=True, type=_k8s_name,
                         help="metadata.name of the RayCluster")
    cluster.set_defaults(func=_raycluster)
    crd = sub.add_parser("crd", help="the StagedTraining CustomResourceDefinition")
    crd.set_defaults(func=_crd)


def main(argv: list[str] | None = None) -> int:
    """`python -m operators.cli render --run ...` without the ringpilot entry point."""
    parser = argparse.ArgumentParser(prog="ringpilot")
    add_manifests_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
