"""Benchmark of the trainer (ray_jobs.train): throughput, recovery, the demo, retrieval learned.

    python benchmarks/train.py [--skip-demo]
    python benchmarks/train.py --observability   # only 5., a few minutes

1. tokens/s of the tiny model on 2 Ray Train workers with ring attention (one ring of 2) vs a
   plain single-process Hugging Face training loop (SDPA, 2 threads: the same cores) on the same
   samples and the same total tokens, at the 1K stage's shape;
2. recovery: a worker killed mid-stage (os._exit) -> seconds until the first step after restart;
   of them, recovery_spawn_seconds until Ray Train had spawned the new worker processes and
   recovery_start_up_seconds from there to their first step (imports, process group, model,
   checkpoint);
3. the whole embedded default as `make demo` runs it (ray start, ray job submit, ray stop),
   without the calibration `make demo` runs first (`--calibrate`, about 40 s here);
4. passkey exact match at the longest length (4K) on held-out prompts: the first stage's final
   model (niah_before) vs the last stage's (niah_after), their digit accuracy and answer-token loss;
5. observability_overhead: the same run with every sink on (TensorBoard, MLflow pointed at a
   tracking server that does not exist, W&B offline, Prometheus) over the run with them off, in
   seconds per step as the workers measure it (each run's median step after the first, the two
   orders alternating), minus 1; and the warnings
   each run with them on printed (observability_warnings: the MLflow one, once, is expected);
   observability_cpu_share: the driver's extra CPU seconds with every sink on (its threads and
   W&B's service process) over the workers' seconds in steps, which a busy machine cannot blur;
   observability_cpu_ms_per_step: what the four sinks cost the driver per step once running
   (their start-up left out), each sink handed a real step's metrics 200 times (--observability
   only); observability_step_share_bound: that over the off runs' median step, the most the
   sinks could add to a step if every CPU millisecond they take came off the step's critical
   path (--observability only). observability_overhead is the median over rounds of each
   round's on / off - 1 (--rounds; one round in the full benchmark).
6. --layouts (only that, ~4 min): tokens/s of the tiny default's short stages (64 and 256
   tokens) data-parallel over the 2 workers (ring x dp 1 x 2) over the same stage as one ring
   of 2 (2 x 1), 40 steps of each: dp_vs_ring_tokens_per_s_s64 and
   dp_vs_ring_tokens_per_s_s256.
Last line: one JSON object. Timings are noisy: other processes share the 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray workers start from this environment: they import the crash hook from tests.support.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import yaml  # noqa: E402

from specs.loading import load_model  # noqa: E402
from specs.run import RunSpec  # noqa: E402
from tests.support.faults import CrashOnce, CrashOnceTimed, crash_marker, worker_starts  # noqa: E402

STEPS = 24


def _bench_spec(storage: Path, stage_index: int = 2, steps: int = STEPS) -> dict:
    spec = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    stage = {**spec["stages"][stage_index], "steps": steps, "warmup_steps": 0}
    spec.update(name="bench", stages=[stage], eval={"enabled": False})
    spec["storage"] = {"path": str(storage), "checkpoint_every": steps // 2, "keep_last": 2}
    spec["failure"] = {"max_failures": 2, "report_every": 4}
    return spec


def _run_ray(spec: dict, tmp: Path, crash: CrashOnce | None = None) -> Path:
    from ray_jobs.train.driver import main

    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["--run", str(path)], before_step=crash) == 0
    return Path(spec["storage"]["path"]) / spec["name"]


def ray_tokens_per_s(run_dir: Path, stage: str) -> float:
    """Steady-state tokens/s: the reports after the first (which includes start-up)."""
    recs = [r for x in (run_dir / "progress" / f"{stage}.jsonl").read_text().splitlines()
            if "tokens_per_s" in (r := json.loads(x))]  # not ring-health findings' lines
    return sum(r["tokens_per_s"] for r in recs[1:]) / len(recs[1:])


def single_process_tokens_per_s(spec: dict, tmp: Path) -> float:
    """The same stage, same samples, plain HF loop in one process."""
    import torch

    from ray_jobs.data.samples import SampleStream
    from ray_jobs.data.tokenizer import build_tokenizer
    from ray_jobs.train.model import build_model

    torch.set_num_threads(2)
    run = RunSpec.model_validate(spec)
    tok = build_tokenizer(run, tmp / "single")
    model = build_model(run, 0, None, seed=0, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=run.stages[0].lr)
    stream = SampleStream(run, 0, tok)
    stage = run.stages[0]
    start = None
    for step in range(stage.steps):
        if step == 4:  # same as the Ray side: the first report interval is not counted
            start = time.perf_counter()
        x, y, *_ = stream.batch(step, 0, range(stage.batch_size))
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                 ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return (stage.steps - 4) * stage.tokens_per_step / (time.perf_counter() - start)


def recovery_seconds(run_dir: Path, stage: str, crash_step: int) -> dict[str, float]:
    """From the crash (its marker is written just before os._exit) to the end of the first step
    of the restarted workers (records carry rank 0's process id, new after a restart), and where
    those seconds went (the workers' own records, CrashOnceTimed): `spawn`, until Ray Train had
    noticed, stopped the group and spawned its new worker processes (the last of them);
    `start_up`, from there until every new worker reached its first step (Ray Train's worker
    start-up, the imports, the process group, the model and its checkpoint); `step`, that step."""
    crashed = crash_marker(run_dir, stage, crash_step).stat().st_mtime
    recs = [json.loads(x)
            for x in (run_dir / "metrics" / f"{stage}.jsonl").read_text().splitlines()]
    restart = next(r for r in recs if r["pid"] != recs[0]["pid"])
    new = [w for w in worker_starts(run_dir, stage) if w["first_step"] > crashed]
    # a worker process Ray had started before the death (an idle one it reused) counts from it
    spawned = max(max(w["spawned"], crashed) for w in new)
    first_step = max(w["first_step"] for w in new)
    return {"total": restart["time"] - crashed, "spawn": spawned - crashed,
            "start_up": first_step - spawned, "step": restart["time"] - first_step}


def demo() -> tuple:
    from ray_jobs.eval.retrieval import retrieval_scores
    from specs.checkpoint import final_checkpoint
    from specs.ledger import Ledger

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ringpilot.launch", "--fresh"], cwd=REPO, check=True)
    seconds = time.perf_counter() - t0
    run = load_model(REPO / "configs" / "tiny.yaml", RunSpec)
    ledger = Ledger(run.run_dir, run.name)
    length = run.stages[-1].seq_len
    before = retrieval_scores(final_checkpoint(ledger, run.stages[0].name), length)
    after = retrieval_scores(final_checkpoint(ledger, run.stages[-1].name), length)
    return seconds, before, after


def layout_ratios(tmp: Path, steps: int = 40) -> dict[str, float]:
    """6.: each short stage (seq_len at most the pretraining length) data-parallel over the
    same stage as one ring of 2; the same samples and steps, one run after the other."""
    run = load_model(REPO / "configs" / "tiny.yaml", RunSpec)
    out = {}
    for index, stage in enumerate(run.stages):
        if stage.seq_len > run.model.pretrain_seq_len:
            continue
        rates = {}
        for ring, dp in ((1, 2), (2, 1)):
            spec = _bench_spec(tmp / f"{stage.name}-{ring}x{dp}", index, steps)
            spec["stages"][0].update(ring_degree=ring, data_parallel_degree=dp)
            spec["name"] = f"layout-{ring}x{dp}"
            rates[ring, dp] = ray_tokens_per_s(_run_ray(spec, tmp), stage.name)
        print(f"{stage.name}: 1 x 2 {rates[1, 2]:,.0f} tokens/s, ring of 2 {rates[2, 1]:,.0f}",
              flush=True)
        out[f"dp_vs_ring_tokens_per_s_{stage.name}"] = round(rates[1, 2] / rates[2, 1], 3)
    return out


def median_step_seconds(run_dir: Path, stage: str) -> float:
    """Median of the workers' own step times, the first step (warm-up) left out."""
    import statistics

    lines = (run_dir / "metrics" / f"{stage}.jsonl").read_text().splitlines()
    return statistics.median(json.loads(x)["step_s"] for x in lines[1:])


def driver_cpu_seconds() -> float:
    """CPU seconds of this process (the driver: its threads, the sinks' included) and of W&B's
    service processes, running or exited (not Ray's, which are children too: the workers')."""
    import resource

    import psutil

    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            if "wandb" in " ".join(child.cmdline()):
                times = child.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    exited = resource.getrusage(resource.RUSAGE_CHILDREN)  # Ray's stay up for the whole run
    return total + exited.ru_utime + exited.ru_stime


def worker_step_seconds(run_dir: Path, stage: str, world: int = 2) -> float:
    """Seconds the workers spent in optimizer steps: each step's time (rank 0's record) times
    the ranks that computed it."""
    lines = (run_dir / "metrics" / f"{stage}.jsonl").read_text().splitlines()
    return world * sum(json.loads(x)["step_s"] for x in lines)


SINKS = ("tensorboard", "mlflow", "wandb", "prometheus")


def sinks_block(sinks: tuple[str, ...]) -> dict:
    """The RunSpec's observability block with `sinks` on (MLflow at a loopback port nothing
    listens on, W&B offline) and the others off."""
    from ray_jobs.ray_setup import free_port

    block: dict = {"tensorboard": "tensorboard" in sinks, "prometheus": "prometheus" in sinks}
    if "wandb" in sinks:
        block["wandb"] = {"project": "bench"}
    if "mlflow" in sinks:
        block["mlflow"] = {"tracking_uri": f"http://127.0.0.1:{free_port()}"}
    return block


def sink_cpu_ms_per_step(tmp: Path, rec: dict, steps: int = 200) -> dict[str, float]:
    """Each sink's CPU milliseconds per optimizer step on the driver, steady state: `rec`, a
    step record a real run wrote (its metrics as ray_jobs.train.observe.step_metrics makes them),
    handed to each sink `steps` times,
    flushed every 6 (the Observer polls every 2 s; a step takes about 0.3 s here), after the
    sink was built and its stage started. MLflow on a local file store here (an unreachable
    server drops the sink at its first call, costing nothing after); W&B offline; Prometheus
    through Ray's metrics API (needs ray.init). What a long run pays per step, without the
    start-up (imports, W&B's service, the MLflow client) that a 36-step run's CPU share
    includes."""
    from ray_jobs.train import sinks
    from ray_jobs.train.observe import flatten, step_metrics
    from specs.loading import load_model
    from specs.run import MlflowSinkSpec, RunSpec, WandbSinkSpec

    run = load_model(REPO / "configs" / "tiny.yaml", RunSpec)
    metrics = step_metrics(rec, rec["step_s"])
    params, state = flatten(run.model_dump(mode="json")), {}
    built = {
        "tensorboard": sinks.TensorBoardSink(tmp),
        "mlflow": sinks.MlflowSink(MlflowSinkSpec(tracking_uri=f"file://{tmp}/mlruns"), tmp,
                                   run, params, state),
        "wandb": sinks.WandbSink(WandbSinkSpec(project="bench"), tmp, run, params, state),
        "prometheus": sinks.PrometheusSink(run),
    }
    out = {}
    for name, sink in built.items():
        getattr(sink, "start_stage", lambda *a: None)("s1k", 0, {"seq_len": "1024"})
        cpu = time.process_time()
        for step in range(1, steps + 1):
            sink.log_step("s1k", step, metrics, time.time())
            if step % 6 == 0:
                sink.flush()
        out[name] = (time.process_time() - cpu) * 1000 / steps
        sink.close("done")
    return out


def observability_overhead(tmp: Path, rounds: int = 3, sinks: tuple[str, ...] = SINKS,
                           steps: int = STEPS) -> dict:
    """Alternating runs of the same spec with `sinks` on and off (the order swapped each round, so
    a slow spell of the shared cores hits both sides). Returns `overhead`: the median over rounds
    of (on / off - 1) in the workers' median seconds per step (paired: a round's two runs are
    minutes apart, the rounds may be far apart in load); `warnings` per run with the sinks on;
    `cpu_share`: the driver's extra CPU seconds with them on (its threads, W&B's service) over the
    workers' step seconds, the largest round's, start-up included; `step_s`: the off runs'
    median step; `record`: a step record the last run with them on wrote."""
    import contextlib
    import io
    import statistics

    off, on, warnings = [], [], 0
    cpu = {True: [], False: []}
    record = None
    for i in range(rounds):
        for side in ((False, True) if i % 2 == 0 else (True, False)):
            spec = _bench_spec(tmp / f"obs-{i}-{side}", steps=steps)
            spec["name"] = f"obs-{int(side)}"
            spec["observability"] = sinks_block(sinks if side else ())
            err = io.StringIO()
            cpu0 = driver_cpu_seconds()
            with contextlib.redirect_stderr(err):
                run_dir = _run_ray(spec, tmp)
            stage = spec["stages"][0]["name"]
            cpu[side].append((driver_cpu_seconds() - cpu0, worker_step_seconds(run_dir, stage)))
            warnings += sum("observability:" in line for line in err.getvalue().splitlines())
            (on if side else off).append(median_step_seconds(run_dir, stage))
            if side:
                lines = (run_dir / "metrics" / f"{stage}.jsonl").read_text().splitlines()
                record = json.loads(lines[len(lines) // 2])
    extra = [c_on - c_off for (c_on, _), (c_off, _) in zip(cpu[True], cpu[False])]
    share = max(extra) / min(w for _, w in cpu[True])
    paired = [a / b - 1 for a, b in zip(on, off)]
    print(f"observability: s/step with {'+'.join(sinks)} on {' / '.join(f'{x:.4f}' for x in on)}, "
          f"off {' / '.join(f'{x:.4f}' for x in off)}; per round on/off - 1: "
          f"{' / '.join(f'{x:+.3f}' for x in paired)} (median {statistics.median(paired):+.4f}, "
          f"fastest on over fastest off {min(on) / min(off) - 1:+.4f}); driver CPU s on "
          f"{' / '.join(f'{c:.2f}' for c, _ in cpu[True])}, off "
          f"{' / '.join(f'{c:.2f}' for c, _ in cpu[False])}, workers' step s "
          f"{' / '.join(f'{w:.1f}' for _, w in cpu[True])}; {warnings} warning(s) in {rounds} "
          f"run(s) with them on; load average {os.getloadavg()[0]:.1f}", flush=True)
    return {"overhead": statistics.median(paired), "warnings": warnings / rounds,
            "cpu_share": share, "step_s": statistics.median(off), "record": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-demo", action="store_true", help="skip the full demo run (3.-4.)")
    parser.add_argument("--observability", action="store_true",
                        help="measure only the sinks' overhead (5.)")
    parser.add_argument("--sinks", default=",".join(SINKS),
                        help="with --observability: the sinks to turn on (comma-separated; "
                        "default all), to tell which one costs")
    parser.add_argument("--rounds", type=int, default=6,
                        help="with --observability: rounds of on/off runs (default 6)")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"with --observability: steps per run (default {STEPS})")
    parser.add_argument("--layouts", action="store_true",
                        help="measure only the short stages' layouts (6.)")
    args = parser.parse_args()
    result = {}
    if args.layouts:
        import ray

        from ray_jobs.ray_setup import start_local_ray
        with tempfile.TemporaryDirectory(prefix="ringpilot-bench-") as d:
            start_local_ray(4, log_to_driver=False)
            result = layout_ratios(Path(d))
            ray.shutdown()
        print(json.dumps(result))
        return
    if args.observability:
        import ray

        from ray_jobs.ray_setup import start_local_ray
        with tempfile.TemporaryDirectory(prefix="ringpilot-bench-") as d:
            start_local_ray(4, log_to_driver=False)
            sinks = tuple(x for x in args.sinks.split(",") if x)
            unknown = set(sinks) - set(SINKS)
            if unknown:
                parser.error(f"--sinks: {', '.join(sorted(unknown))} unknown; give any of "
                             f"{', '.join(SINKS)}")
            obs = observability_overhead(Path(d), args.rounds, sinks, args.steps)
            per_step = sink_cpu_ms_per_step(Path(d) / "per-step", obs["record"])
            ray.shutdown()
        cpu_ms = sum(per_step.values())
        print("observability: driver CPU per step, steady state: " + ", ".join(
            f"{k} {v:.2f} ms" for k, v in per_step.items()) + f"; {cpu_ms:.2f} ms in all over "
            f"a {obs['step_s'] * 1000:.0f} ms step", flush=True)
        print(json.dumps({"observability_overhead": round(obs["overhead"], 4),
                          "observability_warnings": obs["warnings"],
                          "observability_cpu_share": round(obs["cpu_share"], 4),
                          "observability_cpu_ms_per_step": round(cpu_ms, 2),
                          "observability_step_share_bound": round(
                              cpu_ms / 1000 / obs["step_s"], 4)}))
        return
    with tempfile.TemporaryDirectory(prefix="ringpilot-bench-") as d:
        tmp = Path(d)
        import ray

        from ray_jobs.ray_setup import start_local_ray
        spec = _bench_spec(tmp / "runs")
        # The single-process baseline runs before Ray starts and after the Ray run; the faster
        # one counts (other processes share the cores; Ray's own start-up would disturb it).
        singles = [single_process_tokens_per_s(spec, tmp)]
        start_local_ray(4, log_to_driver=False)
        ring = ray_tokens_per_s(_run_ray(spec, tmp), spec["stages"][0]["name"])
        time.sleep(5)  # let the finished workers exit
        singles.append(single_process_tokens_per_s(spec, tmp))
        single = max(singles)
        print(f"tokens/s: ring of 2 Ray workers {ring:,.0f}, single process "
              f"{' / '.join(f'{x:,.0f}' for x in singles)} (before / after)", flush=True)
        crash = _bench_spec(tmp / "crash")
        name = crash["stages"][0]["name"]
        rec = recovery_seconds(_run_ray(crash, tmp, CrashOnceTimed(name, STEPS // 2 + 2)), name,
                               STEPS // 2 + 2)
        print(f"recovery: {rec['total']:.1f} s from a worker's death to the first step after "
              f"restart: {rec['spawn']:.1f} s until Ray Train had spawned the new workers, "
              f"{rec['start_up']:.1f} s of their start-up (imports, process group, model, "
              f"checkpoint) to the first step, {rec['step']:.1f} s that step", flush=True)
        obs = observability_overhead(tmp, rounds=1)
        ray.shutdown()
        result.update(tokens_per_s_ratio_vs_single=round(ring / single, 3),
                      recovery_seconds=round(rec["total"], 1),
                      recovery_spawn_seconds=round(rec["spawn"], 1),
                      recovery_start_up_seconds=round(rec["start_up"], 1),
                      observability_overhead=round(obs["overhead"], 4),
                      observability_warnings=obs["warnings"],
                      observability_cpu_share=round(obs["cpu_share"], 4))
    if args.skip_demo:
        result.update(demo_seconds=None, niah_before=None, niah_after=None)
    else:
        seconds, before, after = demo()
        print(f"passkey at 4K, 32 held-out prompts: exact match {before.exact:.2f} -> "
              f"{after.exact:.2f}, digits right {before.digits:.2f} -> {after.digits:.2f}, "
              f"answer-token loss {before.loss:.3f} -> {after.loss:.3f} (chance 2.303)", flush=True)
        result.update(demo_seconds=round(seconds, 1), niah_before=before.exact,
                      niah_after=after.exact,
                      digits_before=round(before.digits, 3), digits_after=round(after.digits, 3),
                      answer_loss_before=round(before.loss, 3),
                      answer_loss_after=round(after.loss, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
