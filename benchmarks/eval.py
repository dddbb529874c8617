"""Benchmark: checkpoint-committed -> evaluation-actor-running latency, training slowdown, and
evaluation gangs at 16K tokens.

    python benchmarks/eval.py [--steps 1200] [--every 300] [--gang-length 16384] [--gang-only]

A real (tiny) training loop runs as a Ray task with 1 CPU and checkpoints like the trainer
(save, COMMITTED, ledger). It runs three times: without evaluation, with the EvalScheduler's
actor (its own CPU) evaluating every checkpoint, and without again; the baseline is the mean of
the two runs without.

Gangs: a small Llama (4 layers, hidden 256) prefills a `--gang-length` prompt in one Ray actor
(one thread, SDPA: the single-evaluator path) and on a gang of 2 actors (one thread each: ring
prefill), in the same command; `gang_prefill_efficiency_p2_16k` = single / (2 x gang) (1.0:
perfect scaling), `gang_decode_ms_per_token_p2_16k` the gang's sequence-parallel decoding, and
`gang_exact_match` the share of NIAH prompts whose greedy answer from the gang equals one
process's. RULER: the `ruler_*` keys of benchmarks/ruler.py (lm-eval's RULER tasks through the
ringpilot backend; run in its own interpreter, offline), unless `--no-ruler`. Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from ray_jobs.eval.scheduler import EvalScheduler  # noqa: E402
from specs.checkpoint import checkpoint_dir  # noqa: E402
from specs.run import RunSpec  # noqa: E402
from tests.support import eval_fixtures as fixtures  # noqa: E402

SEQ = 512


def build_run(root: str, steps: int, every: int) -> RunSpec:
    return RunSpec.model_validate({
        "name": "bench",
        "model": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
                      pretrain_seq_len=SEQ, dtype="float32"),
        "stages": [dict(name="s512", seq_len=SEQ, steps=steps, lr=1e-3, ring_degree=1,
                        data_parallel_degree=1)],
        "resources": dict(device="cpu", workers=1),
        "data": {"tokenizer": {"vocab_size": 1000}},
        "eval": dict(tasks=["niah_lite", "vt_lite"], depths=[0, 50, 100], samples=2, cpus=1),
        "storage": dict(path=root, checkpoint_every=every),
    })


def train_once(ray, run: RunSpec, with_eval: bool) -> tuple[dict, list[dict]]:
    run_dir = Path(tempfile.mkdtemp(prefix="ringpilot-bench-")) / run.name
    scheduler = EvalScheduler(run, run_dir).start() if with_eval else None
    task = ray.remote(num_cpus=1)(fixtures.train_with_checkpoints)
    stage = run.stages[0]
    out = ray.get(task.remote(str(run_dir), run.name, [(stage.name, stage.seq_len, stage.steps)],
                              run.storage.checkpoint_every))
    history = []
    if scheduler is not None:
        scheduler.stop(wait=True, timeout=600)
        history = scheduler.history
    return out, history


class _Single:
    """One evaluator (a Ray actor, one thread): the checkpoint with SDPA, prefill timed."""

    def __init__(self, checkpoint: str):
        import torch

        from ray_jobs.eval.model import load_checkpoint

        torch.set_num_threads(1)
        self.model, self.tokenizer = load_checkpoint(checkpoint)

    def prefill_seconds(self, prompt: list[int]) -> float:
        import time

        import torch

        ids = torch.tensor([prompt])
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        import torch

        from ray_jobs.eval.model import greedy_tokens

        return [greedy_tokens(self.model, torch.tensor([p]), new, self.tokenizer.eos_token_id)
                for p in prompts]


def gang_benchmark(ray, length: int, repeats: int = 3) -> dict:
    """Single-evaluator vs gang-of-2 prefill at `length`, decoding, and answer agreement."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_jobs.eval import tasks as task_lib
    from ray_jobs.eval.gang import EvalGang
    from ray_jobs.eval.model import build_token_counter, prompt_ids

    tok = fixtures.build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=length,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    ckpt = fixtures.save_checkpoint(LlamaForCausalLM(config), tok,
                                    checkpoint_dir(tempfile.mkdtemp(), "s", 1))
    rng = random.Random(0)
    prompt = [rng.randrange(1, len(tok)) for _ in range(length)]
    samples = [s for depth in (0.0, 50.0, 100.0) for s in task_lib.build_samples(
        "niah_lite", length, depth, 2, 0, build_token_counter(tok))]
    prompts = [prompt_ids(tok, s.prompt) for s in samples]
    new = 8
    single = ray.remote(num_cpus=1)(_Single).remote(str(ckpt))
    single_s = min(ray.get(single.prefill_seconds.remote(prompt)) for _ in range(repeats))
    single_answers = ray.get(single.generate.remote(prompts, new))
    ray.kill(single)
    with EvalGang(2) as gang:
        gang.load(str(ckpt))
        timings = [gang.call("timed", prompt, 16) for _ in range(repeats)]
        gang_s = min(max(t["prefill_s"] for t in run) for run in timings)
        decode = min(max(t["decode_s_per_token"] for t in run) for run in timings)
        gang_answers = [gang.generate(p, new, tok.eos_token_id) for p in prompts]
    same = sum(a == b for a, b in zip(single_answers, gang_answers))
    print(f"prefill of {length:,} tokens: one evaluator {single_s:.2f} s, gang of 2 "
          f"{gang_s:.2f} s; gang decoding {decode * 1000:.1f} ms/token; greedy answers equal "
          f"on {same}/{len(prompts)} NIAH prompts")
    key = f"{length // 1024}k"
    return {f"gang_prefill_efficiency_p2_{key}": round(single_s / (2 * gang_s), 3),
            f"gang_prefill_seconds_p2_{key}": round(gang_s, 3),
            f"single_prefill_seconds_{key}": round(single_s, 3),
            f"gang_decode_ms_per_token_p2_{key}": round(decode * 1000, 2),
            "gang_exact_match": round(same / len(prompts), 3),
            "gang_exact_match_prompts": len(prompts)}


def ruler_keys() -> dict:
    """benchmarks/ruler.py's keys (its own interpreter: it sets up offline mode before lm-eval,
    huggingface_hub and nltk are imported, which this process already did)."""
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ruler.py")], check=True,
                         capture_output=True, text=True).stdout
    keys = json.loads(out.strip().splitlines()[-1])
    return {k: v for k, v in keys.items() if k.startswith("ruler_")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--every", type=int, default=300)
    p.add_argument("--gang-length", type=int, default=16_384)
    p.add_argument("--gang-only", action="store_true", help="only the gang measurements")
    p.add_argument("--no-ruler", action="store_true", help="skip the RULER keys")
    args = p.parse_args()
    import ray

    from ray_jobs.ray_setup import start_local_ray

    start_local_ray(4, log_to_driver=False,
                    env_vars={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    gang = gang_benchmark(ray, args.gang_length)
    if not args.no_ruler:
        gang.update(ruler_keys())
    if args.gang_only:
        ray.shutdown()
        print(json.dumps({**gang, "cpu_cores": os.cpu_count()}))
        return
    run = build_run(tempfile.mkdtemp(), args.steps, args.every)
    base1, _ = train_once(ray, run, with_eval=False)
    evald, history = train_once(ray, run, with_eval=True)
    base2, _ = train_once(ray, run, with_eval=False)
    ray.shutdown()

    commits = dict(evald["commits"])
    latencies, idle_latencies, detect, dispatch = [], [], [], []
    previous_finish = 0.0
    for h in sorted(history, key=lambda h: h.submitted_unix):
        committed = commits[h.path]
        latency = h.started_unix - committed
        latencies.append(latency)
        if committed >= previous_finish:  # the evaluator was idle when it landed
            idle_latencies.append(latency)
            detect.append(h.submitted_unix - committed)
            dispatch.append(h.started_unix - h.submitted_unix)
        previous_finish = h.finished_unix
        print(f"{h.path}: {h.status}, committed -> actor running {latency:.2f} s, "
              f"evaluation {h.finished_unix - h.started_unix:.1f} s")
    # Same run, same moment's machine load: steps that overlapped an evaluation vs the others.
    windows = [(h.started_unix, h.finished_unix) for h in history]
    inside, outside = [], []
    for begin, end, tokens in evald["step_spans"]:
        overlaps = any(begin < w_end and end > w_start for w_start, w_end in windows)
        (inside if overlaps else outside).append((end - begin, tokens))
    rate = lambda spans: sum(t for _, t in spans) / sum(d for d, _ in spans)  # noqa: E731
    name = run.stages[0].name
    baseline = statistics.fmean([base1["tokens_per_s"][name], base2["tokens_per_s"][name]])
    with_eval = evald["tokens_per_s"][name]
    print(f"training tokens/s: without eval {base1['tokens_per_s'][name]:,.0f} and "
          f"{base2['tokens_per_s'][name]:,.0f}, with eval {with_eval:,.0f}")
    print(json.dumps({
        "ckpt_to_eval_seconds": round(statistics.median(idle_latencies), 3),
        "ckpt_to_eval_seconds_all": [round(x, 3) for x in latencies],
        "detect_seconds_median": round(statistics.median(detect), 3),
        "dispatch_seconds_median": round(statistics.median(dispatch), 3),
        "train_tokens_per_s_without_eval": round(baseline),
        "train_tokens_per_s_with_eval": round(with_eval),
        "train_slowdown_with_eval": round(1 - with_eval / baseline, 4),
        "train_slowdown_while_evaluating_same_run": round(1 - rate(inside) / rate(outside), 4),
        "train_steps_overlapping_eval": len(inside),
        "checkpoints_evaluated": len(history),
        **gang,
        "cpu_cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
