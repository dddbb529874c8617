"""The `ringpilot` command: validate specs, plan placements, render manifests and reports."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ray_jobs.spec import RunSpec
from ray_jobs.specfile import SpecError, load_model

EXIT_USER_ERROR = 2


def _validate(args: argparse.Namespace) -> int:
    if args.run is None and args.cluster is None:
        raise SpecError("ringpilot validate", ["give a RunSpec file, --cluster FILE, or both"])
    problems: list[SpecError] = []
    if args.run is not None:
        try:
            run = load_model(args.run, RunSpec)
            print(run.summary())
            if run.resources.cluster and args.cluster is None:
                args.cluster = str(Path(args.run).parent / run.resources.cluster)
        except SpecError as e:
            problems.append(e)
    if args.cluster is not None:
        from topology.cluster import load_cluster  # the topology seam, only when asked for

        try:
            cluster = load_cluster(args.cluster)  # node-type files resolve next to the YAML
            print(cluster.summary())
        except SpecError as e:
            problems.append(e)
    for e in problems:
        print(e.render(), file=sys.stderr)
    return EXIT_USER_ERROR if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringpilot",
        description="Plan, launch and evaluate long-context ring-attention training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    validate = sub.add_parser(
        "validate", help="check a RunSpec and/or ClusterSpec file and summarise it",
        description="Print a summary of each file, or every problem as "
        "`path.to.field: problem (got X; hint)` and exit 2.",
    )
    validate.add_argument("run", nargs="?", help="RunSpec YAML (e.g. configs/tiny.yaml)")
    validate.add_argument("--cluster", help="ClusterSpec YAML (default: the run's resources.cluster)")
    validate.set_defaults(func=_validate)
    from topology.cli import add_plan_parser  # `ringpilot plan`: the topology planner's report

    add_plan_parser(sub)
    from ray_jobs.eval.cli import add_eval_parser  # `ringpilot eval report`: evaluation

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `ringpilot ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
