"""What does a tiny curriculum teach? Its stages replayed in one process, scored at the last length.

    python benchmarks/curriculum.py [RUN.yaml] [--set stages.3.lr=1e-3 ...] [--samples 48]
                                    [--threads 2]

The stages of RUN.yaml (default configs/tiny.yaml) as the trainer runs them (its model, RoPE per
stage, samples, AdamW, warm-up then cosine, clipping: benchmarks/rope.py's train_stage), one
after the other in this process, on SDPA over the whole sequence (what a ring computes exactly),
not on Ray: a curriculum costs minutes here instead of the demo's quarter hour, and the same
spec gives the same model every time (a ring's model is another draw of the same training).
After each stage: passkey retrieval (teacher-forced exact match of every answer digit, held-out
prompts at evenly spread depths) at the stage's own length and at the last stage's, and there
the keys with a repeated digit apart from the others: copying "3 7 3 1 9" asks the model which
"3" it is after, which a copy head matching one token cannot tell.

`--set PATH=VALUE` changes the spec first (dotted path, YAML value), to try a variant without a
file. Last line: one JSON object: curriculum_exact, curriculum_digits, curriculum_exact_repeat,
curriculum_exact_distinct (the last stage's model at the last length), curriculum_seconds, and
per stage its scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import yaml  # noqa: E402

from specs.run import RunSpec  # noqa: E402
from tests.support.specs import set_dotted  # noqa: E402


def split_scores(model, tok, seq_len: int, samples: int, seed: int = 20_000) -> dict:
    """Exact match, digits right, and exact match of keys with / without a repeated digit."""
    from ray_jobs.eval.retrieval import prompt_results

    hits = {True: [0, 0], False: [0, 0]}  # repeated digit -> [right, prompts]
    digits = 0.0
    for s, right, _ in prompt_results(model, tok, seq_len, samples, seed):
        key = s.answer.split()
        repeat = len(set(key)) < len(key)
        hits[repeat][0] += bool(right.all())
        hits[repeat][1] += 1
        digits += right.float().mean().item()

    def share(h):
        return round(h[0] / h[1], 3) if h[1] else None

    return {"exact": round((hits[True][0] + hits[False][0]) / samples, 3),
            "digits": round(digits / samples, 3), "exact_repeat": share(hits[True]),
            "exact_distinct": share(hits[False]), "repeat_prompts": hits[True][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--samples", type=int, default=48, help="prompts per length")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from rope import train_stage

    from ray_jobs.data.tokenizer import build_tokenizer
    from ray_jobs.ring_attention.rope import apply_exact_rope
    from ray_jobs.train.model import build_model

    torch.set_num_threads(args.threads)
    spec = yaml.safe_load(Path(args.run).read_text())
    for assignment in args.set:
        path, _, value = assignment.partition("=")
        set_dotted(spec, path, yaml.safe_load(value))
    run = RunSpec.model_validate(spec)
    last = run.stages[-1].seq_len
    t0, stages = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(run, Path(tmp))
        model = build_model(run, 0, None, seed=run.data.seed, attn_implementation="sdpa")
        for i, stage in enumerate(run.stages):
            t = time.perf_counter()
            losses = train_stage(model, run, i, tok)
            seconds = time.perf_counter() - t
            apply_exact_rope(model)  # as an evaluator reads the checkpoint
            own = split_scores(model, tok, stage.seq_len, args.samples)
            at_last = own if stage.seq_len == last else split_scores(model, tok, last,
                                                                     args.samples)
            stages[stage.name] = {"seconds": round(seconds, 1), "own": own, "last": at_last,
                                  "loss": round(sum(losses[-10:]) / len(losses[-10:]), 4)}
            print(f"{stage.name}: {stage.steps} x {stage.batch_size} at {stage.seq_len} tokens, "
                  f"{seconds:.0f} s, final loss {stages[stage.name]['loss']:.3f}; exact at "
                  f"{stage.seq_len} {own['exact']:.2f}, at {last} {at_last['exact']:.2f} "
                  f"(repeated digit {at_last['exact_repeat']}, distinct "
                  f"{at_last['exact_distinct']}), digits {at_last['digits']:.2f}", flush=True)
    final = stages[run.stages[-1].name]["last"]
    print(json.dumps({"curriculum_exact": final["exact"], "curriculum_digits": final["digits"],
                      "curriculum_exact_repeat": final["exact_repeat"],
                      "curriculum_exact_distinct": final["exact_distinct"],
                      "curriculum_seconds": round(time.perf_counter() - t0, 1),
                      "set": args.set, "stages": stages}))


if __name__ == "__main__":
    main()
