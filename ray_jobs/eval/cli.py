"""Evaluate one checkpoint without Ray: `python -m ray_jobs.evaluate --checkpoint PATH`.

PATH is a committed ringpilot checkpoint (checkpoints/<stage>/step-NNNNNN/) or any Hugging Face
Llama directory saved with its tokenizer. Examples:
    python -m ray_jobs.evaluate --checkpoint /tmp/ringpilot/runs/tiny/checkpoints/s1k/step-000060
    python -m ray_jobs.evaluate --checkpoint ./my-llama --tasks niah_lite vt_lite \
        --lengths 1024 4096 --out ev
    python -m ray_jobs.evaluate --checkpoint ./my-llama --lengths 16384 --max-length 4096 \
        --gang-size 2      # contexts over 4,096 tokens on a gang of 2 Ray actors (local Ray)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray_jobs.eval import tasks as task_lib
from ray_jobs.eval.gang import LongContexts
from ray_jobs.eval.model import (
    build_generate,
    build_token_counter,
    load_checkpoint,
    max_model_length,
)
from ray_jobs.eval.runner import MAX_TOKENS_PER_EVALUATOR, evaluate, plan_lengths
from specs.checkpoint import (
    CheckpointError,
    check_checkpoint,
    eval_dir,
    is_trainer_checkpoint,
    locate,
    read_state,
)
from specs.eval_tasks import ALL_TASKS
from specs.loading import SpecError, load_model
from specs.names import UnsafePath
from specs.run import EvalSpec, KamradtSpec, RunSpec
from specs.trust import check_checkpoint_is_data
from topology.eval_plan import gang_size_for

_DEFAULTS = EvalSpec()


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.evaluate",
                                description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--tasks", nargs="+", default=list(_DEFAULTS.tasks), choices=ALL_TASKS,
                   metavar="TASK", help=f"tasks, from {', '.join(ALL_TASKS)} "
                   f"(default: {' '.join(_DEFAULTS.tasks)})")
    p.add_argument("--lengths", "--context-lengths", nargs="+", type=int, default=None,
                   metavar="TOKENS",
                   help="context lengths (default: with --run, the checkpoint's stage length and "
                   "the shorter stages'; else the trainer state's seq_len; else the model's "
                   "max_position_embeddings and its quarter)")
    p.add_argument("--run", type=Path, default=None,
                   help="the run's RunSpec YAML, for the default lengths of a ringpilot checkpoint")
    p.add_argument("--depths", nargs="+", type=float, default=list(_DEFAULTS.depths),
                   metavar="PERCENT", help="needle depths in percent")
    p.add_argument("--samples", type=int, default=_DEFAULTS.samples, help="samples per cell")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed of the prompts")
    p.add_argument("--max-length", type=int, default=MAX_TOKENS_PER_EVALUATOR,
                   help="longest context to run on this one device; longer ones are skipped")
    p.add_argument("--gang-size", type=int, default=None, metavar="P",
                   help="contexts longer than --max-length run on an evaluation gang of P Ray "
                   "actors (ring-attention prefill, sequence-parallel decoding) on the Ray "
                   "cluster of RAY_ADDRESS, else a local one; 0: the fewest members that each "
                   "hold at most --max-length tokens. Default: no gang, longer contexts skipped")
    p.add_argument("--gang-cpus", type=float, default=1.0, help="CPUs per gang member")
    p.add_argument("--gang-gpus", type=float, default=0.0, help="GPUs per gang member")
    p.add_argument("--gang-place-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long the gang waits for its resources before the long contexts "
                   "are reported as not run")
    p.add_argument("--haystack", nargs="+", default=None, metavar="FILE",
                   help="also run Kamradt's needle-in-a-haystack test (niah_kamradt) with these "
                   "local text files (or globs) as the haystack")
    k = KamradtSpec.model_fields
    p.add_argument("--needle", default=k["needle"].default, help="Kamradt's needle")
    p.add_argument("--question", default=k["question"].default, help="the question about it")
    p.add_argument("--key-phrases", nargs="+", default=None, metavar="PHRASE",
                   help="phrases a right answer contains (default: 'eat a sandwich' and "
                   "'Dolores Park')")
    p.add_argument("--kamradt-depths", type=int, default=k["depth_intervals"].default,
                   metavar="N", help="Kamradt's depth grid: N depths from 0 to 100 %%")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="the run's compute dtype: bfloat16 loads bf16 on CUDA, as the training "
                        "driver's evaluators do (the gang's ring needs it); on CPU the model "
                        "is always loaded in float32")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: <run>/eval/<stage>/<step-dir> for a ringpilot "
                   "checkpoint, else ./eval-<checkpoint name>)")
    return p


def default_out_dir(checkpoint: Path) -> Path:
    place = locate(checkpoint)
    if place is not None:
        return eval_dir(*place)
    return Path(f"eval-{checkpoint.resolve().name}")


def default_lengths(checkpoint: Path, run_file: Path | None) -> list[int]:
    place = locate(checkpoint)
    stage = place.stage if place is not None else None
    if run_file is not None:
        run = load_model(run_file, RunSpec)
        names = [s.name for s in run.stages]
        if stage not in names:
            raise SpecError(str(run_file), [f"stages: no stage named {stage!r} (the checkpoint's "
                                             f"stage); stages are {names}"])
        return plan_lengths([s.seq_len for s in run.stages], names.index(stage),
                            run.eval.context_lengths)
    seq_len = read_state(checkpoint).seq_len if is_trainer_checkpoint(checkpoint) else 0
    if seq_len:
        return [seq_len]
    longest = max_model_length(checkpoint) or 4096
    return sorted({longest, max(longest // 4, 128)})


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        check_checkpoint_is_data(check_checkpoint(args.checkpoint))
        out = args.out or default_out_dir(args.checkpoint)  # a stage folder must be a name
    except (CheckpointError, UnsafePath) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        lengths = args.lengths or default_lengths(args.checkpoint, args.run)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kamradt, files = None, []
    if args.haystack:
        try:
            files = [str(f) for f in task_lib.haystack_files(args.haystack, Path.cwd())]
            kamradt = task_lib.Kamradt(
                haystack=task_lib.read_haystack(files), needle=args.needle,
                question=args.question, key_phrases=tuple(
                    args.key_phrases or KamradtSpec.model_fields["key_phrases"].default_factory()))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {str(e).replace('eval.kamradt.haystack', '--haystack')}",
                  file=sys.stderr)
            return 2
    model, tokenizer = load_checkpoint(args.checkpoint, args.device, args.dtype)
    place = locate(args.checkpoint)  # the standalone command has no ledger to ask
    long, status = LongContexts(), 0
    if args.gang_size is not None:
        from ray_jobs.eval.gang import start_long_contexts
        from ray_jobs.ray_setup import connect_ray

        over = [n for n in lengths if n > args.max_length]
        if over:
            size = gang_size_for(max(over), args.max_length, args.gang_size)
            connect_ray(None, local_cpus=max(2, int(size * args.gang_cpus)))
        long = start_long_contexts(over, args.max_length, args.gang_size, str(args.checkpoint),
                                   tokenizer, cpus=args.gang_cpus, gpus=args.gang_gpus,
                                   place_timeout_s=args.gang_place_timeout,
                                   compute_dtype=args.dtype)
        if long.unavailable:
            print(f"error: {long.unavailable}", file=sys.stderr)
            status = 2
        elif long.gang is not None:
            print(f"{long.engine} started for {', '.join(map(str, over))} tokens")
    try:
        results = evaluate(build_generate(model, tokenizer), build_token_counter(tokenizer),
                           checkpoint=str(args.checkpoint), stage=place.stage if place else None,
                           step=place.step if place else None, tasks=args.tasks, lengths=lengths,
                           depths=args.depths, samples=args.samples, seed=args.seed,
                           max_length=args.max_length, out_dir=out,
                           on_cell=lambda c: print(
                               f"{c.task:<16} {c.length:>8,} "
                               f"{'' if c.depth is None else f'{c.depth:g}%':>5} {c.score:.2f}"
                               f"  ({c.engine})", flush=True),
                           long_generate=long.generate, long_engine=long.engine,
                           long_unavailable=long.unavailable, gang=long.info,
                           kamradt=kamradt, kamradt_intervals=args.kamradt_depths,
                           haystack_files=files)
    finally:
        long.shutdown()
    for s in results.skipped:
        print(f"skipped {s.task} at {s.length:,}: {s.reason}")
    print("scores: " + ", ".join(f"{t} {v:.3f}" for t, v in results.scores.items()))
    print(f"wrote {out}/results.json, tables.md and heatmaps")
    return status

