"""The command `python -m ray_jobs.eval.lm_eval`: lm-eval's RULER tasks on one checkpoint.

    python -m ray_jobs.eval.lm_eval --checkpoint DIR --tasks niah_single_1 ruler_vt \\
        --lengths 4096 8192 --limit 25 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence

from ray_jobs.eval.lm_eval.adapter import LmEvalMissing, RulerInputError, offline_environment
from ray_jobs.eval.lm_eval.effective_length import summarize
from ray_jobs.eval.lm_eval.ruler import RULER_TASKS, run_ruler
from specs.checkpoint import CheckpointError


def main(argv: Sequence[str] | None = None) -> int:
    """Print the per-length RULER table of one checkpoint (lm-eval's own output on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.eval.lm_eval",
        description="lm-eval's RULER tasks on one ringpilot checkpoint, per length as RULER "
                    "publishes (tasks whose data must be downloaded are listed when offline)")
    parser.add_argument("--checkpoint", required=True, help="a committed checkpoint directory")
    parser.add_argument("--tasks", nargs="+", default=list(RULER_TASKS),
                        help="lm-eval task names (default: RULER's 13)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096],
                        help="context lengths in tokens (default: 4096)")
    parser.add_argument("--limit", type=int, default=None,
                        help="samples per task and length (default: all 500)")
    parser.add_argument("--out", default="ruler_results",
                        help="folder for lm-eval's results JSON and the table")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--online", action="store_true", help="let lm-eval download what "
                        "tasks need (essay haystacks, QA sets, nltk's punkt); default: offline")
    parser.add_argument("--data-dir", default=None, help="eval.data_dir: what the essay and QA "
                        "tasks would download (`ringpilot eval fetch-data DIR` builds it)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--verbose", action="store_true", help="lm-eval's own log messages")
    args = parser.parse_args(argv)
    if not args.online:  # in effect for modules not imported yet (`python -m` imports none)
        offline_environment()
    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        # lm-eval's generators print progress: keep stdout for the table
        with contextlib.redirect_stdout(sys.stderr):
            report = run_ruler(args.checkpoint, args.tasks, args.lengths, args.out,
                               limit=args.limit, apply_chat_template=args.chat_template,
                               device=args.device, data_dir=args.data_dir)
    except (LmEvalMissing, RulerInputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    doc = {**report.to_dict(), **summarize([r.__dict__ for r in report.rows], args.tasks)}
    print(json.dumps(doc, indent=2) if args.json else report.table() + "\n" + doc["label"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
