"""Which RoPE extension method extends the model best? The tiny default, each method, same data.

    python benchmarks/rope.py [--seeds 2] [--samples 32] [--methods theta,yarn]

1. The tiny model (configs/tiny.yaml) is trained once at its native length: the stages up to
   model.pretrain_seq_len (64, then 256 tokens, plain RoPE).
2. From that same model, each method extends it over the same later stage (the 1K stage: 4x the
   native length, same steps, learning rate and samples), as the stage's `rope` block would
   (ray_jobs.train.model.apply_rope: its auto values, transformers' frequencies, fixed at the
   stage's length while training). Each method once per data seed (`--seeds`): the spread.
3. Passkey retrieval (exact match of every answer digit, teacher-forced, held-out prompts at
   evenly spread depths) at 4x and 16x the native length, with the model read as an evaluator
   reads its checkpoint (length-dependent rules follow each prompt's length), and before any
   extension.

Training runs in one process on the CPU (the trainer's model, RoPE and samples; not its ring):
the comparison is between methods, and a ring computes the same steps. LongRoPE's factors come
from a search in its paper; here they are a ramp (1 for the fastest frequencies up to the
extension factor for the slowest), said in the table. A 0.5M-parameter model on a synthetic
task decides nothing about an 8B model: the machinery is what a team runs on its own.
Last line: one JSON object (`rope_methods`, per-method scores, `rope_before`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from specs.run import RunSpec  # noqa: E402

METHODS = ("theta", "linear", "dynamic", "yarn", "llama3", "longrope")


def longrope_ramp(head_dim: int, factor: float) -> list[float]:
    """LongRoPE-shaped factors without its search: 1 for the fastest frequency, `factor` for the
    slowest, geometric in between (the paper searches them per model)."""
    n = head_dim // 2
    return [factor ** (i / (n - 1)) for i in range(n)]


def rope_block(method: str, run: RunSpec, seq_len: int) -> dict:
    if method != "longrope":
        return {"method": method}
    factor = seq_len / run.model.pretrain_seq_len
    ramp = longrope_ramp(run.model.head_dim, factor)
    return {"method": "longrope", "short_factor": [1.0] * len(ramp), "long_factor": ramp}


def train_stage(model, run: RunSpec, index: int, tok) -> list[float]:
    """One stage as the trainer runs it (AdamW, warm-up then cosine, clipping, the stage's
    samples), in this process; the losses per step."""
    from ray_jobs.data.samples import IGNORE, SampleStream
    from ray_jobs.train.loop import lr_factor
    from ray_jobs.train.model import apply_rope

    stage = run.stages[index]
    apply_rope(model, run.stage_rope(index), seq_len=stage.seq_len,
               pretrain_seq_len=run.model.pretrain_seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, stage.warmup_steps, stage.steps))
    stream, losses = SampleStream(run, index, tok), []
    model.train()
    for step in range(stage.steps):
        x, y, *_ = stream.batch(step, 0, range(stage.batch_size))
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                 ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.training.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def as_evaluator(model):
    """The model as an evaluator loads its checkpoint: length-dependent rules (dynamic,
    longrope) follow each prompt's own length."""
    from ray_jobs.ring_attention.rope import apply_exact_rope

    apply_exact_rope(model)
    return model


def scores(model, tok, native: int, samples: int) -> dict:
    from ray_jobs.eval.retrieval import model_retrieval_scores

    out = {}
    for times in (4, 16):
        s = model_retrieval_scores(model, tok, times * native, samples)
        out[f"exact_{times}x"], out[f"digits_{times}x"] = round(s.exact, 3), round(s.digits, 3)
    return out


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="data seeds per method")
    parser.add_argument("--samples", type=int, default=32, help="prompts per length")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} unknown; choose from {', '.join(METHODS)}")

    from ray_jobs.data.tokenizer import build_tokenizer
    from ray_jobs.train.model import build_model

    torch.set_num_threads(2)
    spec = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    run = RunSpec.model_validate(spec)
    native = run.model.pretrain_seq_len
    native_stages = [i for i, s in enumerate(run.stages) if s.seq_len <= native]
    extend = next(i for i, s in enumerate(run.stages) if s.seq_len > native)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(run, Path(tmp))
        model = build_model(run, 0, None, seed=run.data.seed, attn_implementation="sdpa")
        for i in native_stages:
            losses = train_stage(model, run, i, tok)
            print(f"native {run.stages[i].name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}",
                  flush=True)
        pretrained = {k: v.clone() for k, v in model.state_dict().items()}
        before = scores(as_evaluator(model), tok, native, args.samples)
        print(f"before extension: {before}", flush=True)
        results: dict[str, list[dict]] = {}
        for method in methods:
            for seed in range(args.seeds):
                stage = {**spec["stages"][extend], "rope": rope_block(
                    method, run, run.stages[extend].seq_len)}
                stage.pop("rope_theta", None)
                variant = RunSpec.model_validate({
                    **spec, "data": {**spec["data"], "seed": seed},
                    "stages": spec["stages"][:extend] + [stage]})
                model.load_state_dict(pretrained)
                t = time.perf_counter()
                losses = train_stage(model, variant, extend, tok)
                result = scores(as_evaluator(model), tok, native, args.samples)
                result.update(loss=round(statistics.mean(losses[-10:]), 4),
                              rope=variant.stage_rope_words(extend))
                results.setdefault(method, []).append(result)
                print(f"{method} seed {seed}: {result} ({time.perf_counter() - t:.0f} s)",
                      flush=True)
    stage = run.stages[extend]
    print(f"\nRoPE methods, tiny model: native {native} tokens, extended over stage "
          f"{stage.name} ({stage.seq_len} tokens, {stage.steps} steps), {args.seeds} data "
          f"seed(s), {args.samples} passkey prompts per length; mean (min-max)")
    print(f"| method | rope_parameters | exact {4 * native} (4x) | exact {16 * native} (16x) "
          f"| digits 16x | final loss |")
    print("|---|---|---|---|---|---|")
    print(f"| before extension | plain, theta {run.model.rope_theta:g} | "
          f"{before['exact_4x']:.2f} | {before['exact_16x']:.2f} | {before['digits_16x']:.2f} "
          "| - |")
    for method, rs in results.items():
        note = " (ramp, not searched)" if method == "longrope" else ""
        print(f"| {method} | {rs[0]['rope']}{note} | "
              f"{spread([r['exact_4x'] for r in rs])} | {spread([r['exact_16x'] for r in rs])} "
              f"| {spread([r['digits_16x'] for r in rs])} | "
              f"{spread([r['loss'] for r in rs])} |")
    print(json.dumps({"rope_methods": list(results), "rope_scores": results,
                      "rope_before": before, "native_seq_len": native,
                      "rope_seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
