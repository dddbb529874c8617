"""`ringpilot eval report RUN_DIR`: the subcommand, registered by ray_jobs.cli."""

from __future__ import annotations

import argparse
import sys


def _report(args: argparse.Namespace) -> int:
    from ray_jobs.eval.report import render_run_report

    try:
        md, page = render_run_report(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {md} and {page}")
    return 0


def add_eval_parser(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="checkpoint evaluation reports",
                               description="Reports of the evaluation actors' results.")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    report = sub.add_parser("report", help="render the run's evaluation report (Markdown + HTML)",
                            description="Write RUN_DIR/eval/report.md and report.html: a table "
                            "of every evaluated checkpoint, score-vs-step plots and heatmaps.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="run directory (<storage.path>/<name>)")
    report.set_defaults(func=_report)
