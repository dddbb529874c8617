"""The preflight's command-line arguments and defaults, without torch or Ray: `ringpilot`
registers them at start-up (ringpilot/cli.py), `python -m ray_jobs.preflight` parses them."""

from __future__ import annotations

import argparse
from pathlib import Path

from topology.tomography import FABRIC_FACTOR, SLOW_FACTOR

MAX_BYTES = 64 * 2**20  # a probe's message at most: the 8B recipe's K/V blocks fit under it
REPS = 5  # timed repetitions of every transfer (after one untimed)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The preflight's arguments on parser `p`."""
    p.add_argument("--run", required=True, help="RunSpec YAML: stages, model and resources")
    p.add_argument("--cluster", required=True, help="ClusterSpec YAML of the cluster to probe")
    p.add_argument("--stage", help="probe only this stage's plan (default: every stage)")
    p.add_argument("--out", help="report directory (default: <run dir>/preflight); each "
                   "stage's preflight.json, table.txt and fabric.png go to OUT/<stage>/")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, metavar="N",
                   help=f"largest message a probe moves (default {MAX_BYTES:,}: K/V blocks and "
                   "collectives above it are timed at N bytes)")
    p.add_argument("--reps", type=int, default=REPS, help=f"timed repetitions (default {REPS})")
    p.add_argument("--slow-factor", type=float, default=SLOW_FACTOR, metavar="X",
                   help=f"a hop is slow above X times the round's median ratio of measured to "
                   f"predicted time (default {SLOW_FACTOR:g}; raise it on a noisy fabric)")
    p.add_argument("--fabric-factor", type=float, default=FABRIC_FACTOR, metavar="X",
                   help=f"the fabric as a whole is off its profile when that median ratio is "
                   f"above X or below 1/X (default {FABRIC_FACTOR:g}; a cluster file whose link "
                   "numbers are guesses may warrant more)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, or a private "
                   "local one)")
    p.add_argument("--write-config", type=Path, metavar="FILE",
                   help="only plan and write the ranks' configuration (JSON) for ranks started "
                   "by hand (python -m ray_jobs.preflight.rank), then exit")
    return p


DESCRIPTION = ("Plan the run on the cluster file, then on one worker per planned GPU time every "
               "ring hop at its K/V block size (and, when several explanations fit, a probe "
               "round of GPU pairs), the shard group's and replicas' collectives, and check the "
               "layout's attention against unsharded attention. Names the links or devices "
               "that explain slow hops; writes OUT/<stage>/preflight.json, table.txt and "
               "fabric.png. Exit 0: nothing found; 1: findings (one line each); 2: bad input.")


def add_preflight_parser(subparsers) -> argparse.ArgumentParser:
    """Register `preflight` on the `ringpilot` command's subparsers."""
    p = subparsers.add_parser("preflight", help="time a plan's fabric and check its layout "
                              "before training (names slow links)", description=DESCRIPTION)
    return add_arguments(p)
