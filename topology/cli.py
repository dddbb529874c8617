"""`ringpilot plan`: plan a run on a cluster and write the planning report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specs.atomic import writable_dir_problem

EXIT_USER_ERROR = 2


def run_plan(args: argparse.Namespace) -> int:
    """`ringpilot plan`: plan, write the report, print its headline."""
    from specs.loading import load_model
    from specs.run import RunSpec
    from topology.cost import StageDoesNotFit
    from topology.documents import with_corpus_document_lengths
    from topology.exclusions import (
        Exclusions,
        apply_exclusions,
        degrade_excluded,
        parse_exclusions,
    )
    from topology.graph import TopologyError, apply_degrade_link, build_graph
    from topology.planner import PlanError
    from topology.report import render_report
    from topology.run_plan import plan_run
    from topology.sources import load_cluster

    run = load_model(args.run, RunSpec)
    problem = writable_dir_problem(args.out)
    if problem:  # before minutes of planning, not after
        print(f"ringpilot plan: --out {args.out}: cannot create or write it ({problem}); give a "
              "directory you can write",
              file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        if args.from_k8s:
            from topology.k8s import build_cluster_from_kube_context

            spec = build_cluster_from_kube_context()
        else:
            cluster = args.cluster or (str(Path(args.run).parent / run.resources.cluster)
                                       if run.resources.cluster else None)
            if cluster is None:
                print("ringpilot plan: give --cluster FILE (or --from-k8s); the run has no "
                      "resources.cluster", file=sys.stderr)
                return EXIT_USER_ERROR
            spec = load_cluster(cluster)
        profile, notes = None, None
        if args.profile:  # measured numbers replace the datasheet's before anything is planned
            from topology.calibration import CalibratedProfile, apply_profile

            spec, profile, notes = apply_profile(spec, load_model(args.profile,
                                                                  CalibratedProfile))
        compare = [float(x) for x in args.compare_minutes.split(",")] if args.compare_minutes \
            else None
        ex, base_graph = Exclusions(), None
        if args.exclude:  # the plan itself goes around what a preflight found
            ex = parse_exclusions(spec, build_graph(spec), args.exclude)
            spec = apply_exclusions(spec, ex)
            base_graph = build_graph(spec)
            degrade_excluded(base_graph, ex)
            notes = [*(notes or []), ex.describe()]
        whatif, label, graph, changed = None, [], None, spec
        if args.without_node or args.degrade_link:  # checked before the (slower) planning
            changed = spec.without_nodes(args.without_node) if args.without_node else spec
            graph = build_graph(changed)
            degrade_excluded(graph, ex)
            for text in args.degrade_link:
                a, b, f = apply_degrade_link(graph, text)
                label.append(f"link {a} - {b} at {f:g}x bandwidth")
            label += [f"node {n} lost" for n in args.without_node]
        base_rope = run.base_rope(Path(args.run).parent)  # a base model's own rule, if any
        # the prepared corpus's document lengths, when its manifest exists, over the run file's
        run, lengths_notes = with_corpus_document_lengths(run, Path(args.run).parent)
        notes = [*(notes or []), *lengths_notes] or None
        plan = plan_run(spec, run, graph=base_graph, excluded=ex.names, relax=bool(ex.names),
                        profile=profile, notes=notes,
                        search_seconds=args.search_seconds, base_rope=base_rope)
        if graph is not None:
            whatif = plan_run(changed, run, graph=graph, excluded=[*ex.names, *args.without_node],
                              relax=True, profile=profile, notes=notes,
                              search_seconds=args.search_seconds, base_rope=base_rope)
        table = None
        if args.compare:
            from topology.measured import compare_rows, measured_steps

            table = compare_rows(plan, measured_steps(args.compare))
        files = render_report(plan, spec, args.out, whatif=whatif, whatif_label="; ".join(label),
                              compare_minutes=compare, measured=table)
    except (TopologyError, PlanError, StageDoesNotFit, ValueError, FileNotFoundError) as e:
        print(f"ringpilot plan: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print((Path(args.out) / "report.md").read_text().split("\n## Where")[0])
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "plan", help="plan ring placement on a cluster and write a planning report",
        description="Choose ring x data-parallel degrees and ring order per stage from the "
        "cluster's network, predict step time, memory and wall minutes, and compare with Ray's "
        "default order. Writes plan.json, report.md, report.html and PNG plots.")
    p.add_argument("--run", required=True, help="RunSpec YAML (e.g. configs/llama3-8b-1m.yaml)")
    p.add_argument("--cluster", help="ClusterSpec YAML (default: the run's resources.cluster)")
    p.add_argument("--from-k8s", action="store_true", help="read node labels from the current "
                   "kube context instead of --cluster (needs an API server)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--exclude", action="append", default=[], metavar="X[,Y]",
                   help="plan around what a preflight found: a node (host1), a GPU "
                   "(host1/gpu0), a device (host1/nic0) or a link as findings print it "
                   "(host1/nic0->leaf0); nodes and GPUs are not placed, links and devices are "
                   "priced at near zero bandwidth so rings go around them (repeatable)")
    p.add_argument("--without-node", action="append", default=[], metavar="NAME",
                   help="what-if: re-plan without this node (repeatable)")
    p.add_argument("--degrade-link", action="append", default=[], metavar="A-B=FACTOR",
                   help="what-if: scale the bandwidth of link A-B, e.g. "
                   "node-000/cpu0-node-000/cpu1=0.5 (repeatable)")
    p.add_argument("--compare-minutes", help="comma-separated published wall minutes per stage, "
                   "shown beside the predictions")
    p.add_argument("--compare", metavar="RUN_DIR", help="put the step times a run measured "
                   "(its run directory) beside the predictions, with the ratio")
    p.add_argument("--profile", metavar="FILE", help="a calibrated profile (ringpilot "
                   "calibrate): its measured link bandwidths and throughputs replace the "
                   "datasheet numbers")
    p.add_argument("--search-seconds", type=float, default=0.25, metavar="S",  # as the planner
                   help="time budget of the placement search per stage layout (default 0.25; it "
                   "stops sooner when no move helps; must be > 0)")
    p.set_defaults(func=run_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ringpilot-plan")
    sub = parser.add_subparsers(dest="command", required=True)
    add_plan_parser(sub)
    args = parser.parse_args(["plan", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
