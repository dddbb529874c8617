"""Staged long-context training on Ray Train: `python -m ray_jobs.train --run RUN.yaml`.

Submitted to a Ray cluster with
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m ray_jobs.train --run RUN.yaml
With no --run it trains the embedded default, configs/tiny.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray_jobs.spec import RunSpec
from ray_jobs.specfile import SpecError, load_model

DEFAULT_RUN = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN,
                        help="RunSpec YAML (default: the embedded tiny run)")
    parser.add_argument("--stage", default=None,
                        help="train only this stage (by name), resuming from the ledger; the "
                        "Kubernetes operator runs one stage per RayJob this way")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        run = load_model(args.run, RunSpec)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return 2
    print(run.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
