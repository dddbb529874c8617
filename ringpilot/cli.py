"""The `ringpilot` command: validate specs, plan placements, render manifests and reports.

Each subcommand belongs to the folder it drives: `plan` to topology/, `manifests` to operators/,
`eval report` to the evaluation reports of ray_jobs/eval/; this module only composes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from operators.cli import add_manifests_parser
from ray_jobs.preflight.cli import add_preflight_parser
from specs.atomic import atomic_write
from specs.loading import SpecError, load_model
from specs.plan import Plan
from specs.run import RunSpec
from topology.cli import add_plan_parser, run_plan
from topology.sources import load_cluster

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
    validate.add_argument("--cluster",
                          help="ClusterSpec YAML (default: the run's resources.cluster)")
    validate.set_defaults(func=_validate)
    plan = add_plan_parser(sub)
    plan.add_argument("--verify-memory", action="store_true",
                      help="trace a training step of each stage's planned layout (FSDP2 memory "
                      "tracker on fake tensors; a few layers on a ring of at most 8, "
                      "extrapolated per layer: minutes for 70B), print predicted vs traced peak "
                      "memory per GPU with a verdict, and exit 2 unless every stage fits with "
                      "its margin")
    plan.add_argument("--trace-layers", type=int, metavar="N",
                      help="with --verify-memory: trace (and model) only N decoder layers, for a "
                      "quick check of the machinery; the fit verdict then covers that model only")
    plan.add_argument("--trace-exact", action="store_true",
                      help="with --verify-memory: trace every layer on the planned ring instead "
                      "of extrapolating (hours for 70B; for checking the extrapolation)")
    plan.set_defaults(func=_plan)
    calibrate = sub.add_parser(
        "calibrate", help="measure the cost model's numbers on a cluster (a profile for plan)",
        description="Start two Ray Train workers of the run's resources on one node and measure "
        "point-to-point and collective bandwidth, dense and attention-block throughput at the "
        "run's longest stage, with the trainer's own kernels and process group. Writes a "
        "calibrated profile for `ringpilot plan --profile`.")
    calibrate.add_argument("--run", required=True, help="RunSpec YAML: shapes and resources")
    calibrate.add_argument("--cluster", required=True, help="ClusterSpec YAML of the cluster "
                           "measured (e.g. configs/clusters/local-cpu.yaml here)")
    calibrate.add_argument("--out", required=True, help="profile file to write (YAML)")
    calibrate.add_argument("--node-type", help="node type measured (default: the first)")
    calibrate.add_argument("--repeats", type=int, default=5, help="repeats per number (5)")
    calibrate.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, or a "
                           "private local one)")
    calibrate.set_defaults(func=_calibrate)
    add_preflight_parser(sub).set_defaults(func=_preflight)
    _add_eval_parser(sub)
    add_manifests_parser(sub)
    return parser


def _calibrate(args: argparse.Namespace) -> int:
    """`ringpilot calibrate`: measure, validate as a CalibratedProfile, write, summarise."""
    import yaml

    from topology.calibration import CalibratedProfile, CalibrationError, apply_profile

    run, spec = load_model(args.run, RunSpec), load_cluster(args.cluster)
    if args.repeats < 1:
        raise SpecError("ringpilot calibrate", ["--repeats: give at least 1"])
    from ray_jobs.train.calibrate import calibrate  # torch and Ray: only when asked

    try:
        doc = calibrate(run, spec, node_type=args.node_type, repeats=args.repeats,
                        address=args.address)
        profile = CalibratedProfile.model_validate(doc)
        apply_profile(spec, profile)  # physical bounds and fit to the cluster, before writing
    except (CalibrationError, ValueError) as e:
        print(f"ringpilot calibrate: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    atomic_write(args.out, yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
    for name, link in profile.links.items():
        print(f"link {name}: {link.bandwidth_gb_s.value:.2f} GB/s "
              f"(spread {link.bandwidth_gb_s.spread:.0%}), "
              f"{link.latency_us.value if link.latency_us else float('nan'):.1f} us")
    for name, m in profile.collectives.items():
        print(f"{name}: {m.value:.2f} GB/s bus bandwidth (spread {m.spread:.0%})")
    for name in ("dense_flops", "attention_flops"):
        m = getattr(profile, name)
        print(f"{name}: {m.value / 1e9:.1f} GFLOP/s per worker (spread {m.spread:.0%})")
    print(f"attention backward / forward: {profile.attention_bwd_over_fwd.value:.2f}")
    print(f"wrote {args.out}; plan with: ringpilot plan --run {args.run} --cluster "
          f"{args.cluster} --profile {args.out} --out DIR")
    return 0


def _preflight(args: argparse.Namespace) -> int:
    """`ringpilot preflight`: ray_jobs/preflight/job.py's run_preflight."""
    from ray_jobs.preflight.job import run_preflight  # torch and Ray: only when asked

    return run_preflight(args)


def _plan(args: argparse.Namespace) -> int:
    """`ringpilot plan`, then with --verify-memory the trace of every planned stage."""
    given = [flag for flag, value in (("--trace-layers", args.trace_layers is not None),
                                      ("--trace-exact", args.trace_exact)) if value]
    if given and not args.verify_memory:
        raise SpecError("ringpilot plan", [f"{given[0]}: only with --verify-memory (got it "
                                           "without; add --verify-memory or drop it)"])
    if args.trace_layers is not None and args.trace_layers < 1:
        raise SpecError("ringpilot plan", [f"--trace-layers: give 1 or more decoder layers "
                                           f"(got {args.trace_layers})"])
    code = run_plan(args)
    if code or not args.verify_memory:
        return code
    from ray_jobs.train.memory import (  # torch: only when asked
        TRACE_DEPTHS,
        TRACE_RING,
        describe_tracing,
        render_checks,
        verify_plan_memory,
    )

    run = load_model(args.run, RunSpec)
    plan = Plan.model_validate_json((Path(args.out) / "plan.json").read_text())
    depths, max_ring = (None, None) if args.trace_exact else (TRACE_DEPTHS, TRACE_RING)
    if args.trace_layers is not None:
        depths = None
    print(f"\nverify-memory: tracing {len(plan.stages)} stages. "
          f"{describe_tracing(depths, max_ring)}", flush=True)
    try:
        checks = verify_plan_memory(run, plan, layers=args.trace_layers, depths=depths,
                                    max_ring=max_ring,
                                    progress=lambda line: print(f"verify-memory: {line}",
                                                                flush=True))
    except ValueError as e:  # a layout the tracer cannot follow yet
        print(f"ringpilot plan --verify-memory: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print("\nMemory per GPU: the cost model's prediction against a trace of the trainer's own "
          "parallelize(). The verdict takes the larger of the two plus the reserve (CUDA "
          "context, NCCL, fragmentation: what a trace cannot see), and wants room for the "
          "margin above it (the larger of 10% and the stage's own trace-vs-model error); within "
          "the margin of the GPU is 'at the limit'.")
    print(render_checks(checks))
    atomic_write(Path(args.out) / "memory.json", json.dumps(
        [{**asdict(c), "error": c.error, "peak_bytes": c.peak_bytes,
          "margin_bytes": c.margin_bytes, "verdict": c.verdict, "fits": c.fits}
         for c in checks], indent=1) + "\n")
    misfits = [c.stage for c in checks if c.verdict == "does not fit"]
    tight = [c.stage for c in checks if c.verdict == "at the limit"]
    if misfits:
        print(f"ringpilot plan: stages {misfits} do not fit in the traced memory; raise their "
              "ring_degree or shard_degree", file=sys.stderr)
    if tight:
        print(f"ringpilot plan: stages {tight} are at the limit: the GPU holds their peak but "
              "not the margin of the trace's error; raise their ring_degree or shard_degree, or "
              "use a checkpointing policy that keeps less", file=sys.stderr)
    return EXIT_USER_ERROR if misfits or tight else 0


def _eval_report(args: argparse.Namespace) -> int:
    from ray_jobs.eval.report import render_run_report  # matplotlib: only when asked for
    from ray_jobs.eval.results import ResultsError
    from specs.ledger import LedgerError
    from specs.names import UnsafePath

    try:
        md, page = render_run_report(args.run_dir)
    except (FileNotFoundError, LedgerError, ResultsError, UnsafePath) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return EXIT_USER_ERROR
    print(f"wrote {md} and {page}")
    return 0


def _eval_fetch_data(args: argparse.Namespace) -> int:
    from ray_jobs.eval.lm_eval.offline_data import (
        BABILONG_CONFIGS,
        DataDirError,
        fetch_data_dir,
    )

    try:
        dest = fetch_data_dir(args.dest, args.babilong_configs or tuple(BABILONG_CONFIGS))
    except DataDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"wrote {dest}: give it as eval.data_dir (or --data-dir)")
    return 0


def _add_eval_parser(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="checkpoint evaluation reports",
                               description="Reports of the evaluation actors' results.")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    report = sub.add_parser("report", help="render the run's evaluation report (Markdown + HTML)",
                            description="Write RUN_DIR/eval/report.md and report.html: a table "
                            "of every evaluated checkpoint, score-vs-step plots and heatmaps.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="run directory (<storage.path>/<name>)")
    report.set_defaults(func=_eval_report)
    fetch = sub.add_parser(
        "fetch-data", help="download what RULER's essay/QA tasks and BABILong need (eval.data_dir)",
        description="On a machine with internet: write DIR with Paul Graham's essays, SQuAD's "
        "and HotpotQA's dev sets, nltk's punkt_tab and BABILong's configs, checked, for "
        "eval.data_dir on a cluster without it. DIR must not exist; it appears complete or not "
        "at all.")
    fetch.add_argument("dest", metavar="DIR", help="the folder to create")
    fetch.add_argument("--babilong-configs", nargs="+", default=None, metavar="CONFIG",
                       help="BABILong configs to fetch (default: all, 0k .. 128k)")
    fetch.set_defaults(func=_eval_fetch_data)


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
    except OSError as e:  # a file it was told to read or write: the user's to fix, one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"ringpilot {args.command}: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
