"""Benchmark: checkpoint-committed -> evaluation-actor-running latency, and training slowdown.

    python benchmarks/eval.py [--steps 1200] [--every 300]

A real (tiny) training loop runs as a Ray task with 1 CPU and checkpoints like the trainer
(save, COMMITTED, ledger). It runs three times: without evaluation, with the EvalScheduler's
actor (its own CPU) evaluating every checkpoint, and without again; the baseline is the mean of
the two runs without. Last line: one JSON object.
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
        "eval": dict(tasks=["niah", "vt"], depths=[0, 50, 100], samples=2, cpus=1),
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--every", type=int, default=300)
    args = p.parse_args()
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT),
                                                            "OMP_NUM_THREADS": "1"}})
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
        "cpu_cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
