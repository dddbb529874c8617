"""Benchmark: data preparation throughput, and a worker's fetch time and memory at 1M tokens.

    python benchmarks/data.py [--docs 4000] [--files 8] [--fetch-tokens 16777216]

1. Preparation: a generated jsonl corpus (`--files` files, `--docs` documents in all) is
   tokenized by a plain single-process loop (read each file, the run's fast tokenizer on batches
   of 256 texts) and by the preparation job on Ray Data (ray_jobs.data.prepare, engine "ray", on
   this machine's cores; its time from the first task to the manifest, without Ray's start).
   `prepare_tokens_per_s_ratio_vs_single` = Ray Data's tokens/s over the loop's.
2. Reads: prepared directories of `--fetch-tokens` and 10x as many tokens (token shards of the
   prepared format filled with random ids, so that a 10x corpus needs no 10x tokenization
   here). In a fresh process per size (as a training worker), SampleStream for a stage of
   1,048,576 tokens fetches sequences by address: `sample_fetch_ms_1m` is the median time of
   one batch of one sequence (memory-mapped read, labels, tensor; `..._rank_of_32`: only the
   zigzag shard a rank of a ring of 32 reads), `worker_rss_mb_1m` the
   process's peak resident memory (VmHWM, reset before) over its resident memory before opening
   the data: the data path's own memory, the mapped shard pages it touched included.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402

from specs.run import RunSpec  # noqa: E402
from tests.data.corpus import documents, write_jsonl  # noqa: E402
from tests.train.conftest import mini_spec  # noqa: E402

SEQ_1M = 1 << 20


def run_spec(tmp: Path, prepared: Path, sources: list[dict], seq_len: int = 64,
             steps: int = 4) -> RunSpec:
    spec = mini_spec(tmp / "runs", **{"data.mix": {"documents": 1.0, "passkey": 0,
                                                   "kv_retrieval": 0}})
    spec["stages"] = [{"name": "s", "seq_len": seq_len, "steps": steps, "batch_size": 1,
                       "lr": 1e-3, "ring_degree": 2, "data_parallel_degree": 1}]
    spec["model"]["pretrain_seq_len"] = seq_len
    spec["data"]["prepared"] = {"path": str(prepared), "sources": sources, "dedup": False}
    return RunSpec.model_validate(spec)


def single_process(files: list[Path], tokenizer: str) -> tuple[int, float]:
    from ray_jobs.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    t0, total = time.perf_counter(), 0
    for path in files:
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        for i in range(0, len(texts), 256):
            total += sum(len(x) + 1 for x in tok(texts[i:i + 256],
                                                 add_special_tokens=False)["input_ids"])
    return total, time.perf_counter() - t0


def bench_prepare(tmp: Path, n_docs: int, n_files: int) -> dict:
    import ray

    from ray_jobs.data.inputs import tokenizer_files
    from ray_jobs.data.prepare import prepare
    from ray_jobs.ray_setup import start_local_ray

    per = n_docs // n_files
    files = [write_jsonl(tmp / "corpus" / f"part-{i:03d}.jsonl",
                         documents(100 + i, per, lo=100, hi=1500)) for i in range(n_files)]
    run = run_spec(tmp, tmp / "prepared", [{"name": "web", "paths": [str(tmp / "corpus" /
                                                                           "*.jsonl")]}])
    tokenizer, _ = tokenizer_files(run, run.run_dir, tmp)
    single_tokens, single_s = single_process(files, str(tokenizer))
    cpus = os.cpu_count() or 2
    start_local_ray(cpus, log_to_driver=False, env_vars={"PYTHONPATH": str(ROOT)})
    try:
        manifest = prepare(run, tmp, run.run_dir, engine="ray", log=lambda line: None)
    finally:
        ray.shutdown()
    ray_tokens = manifest["raw_tokens"] + manifest["documents"]  # with the EOS, like the loop
    assert ray_tokens == single_tokens, (ray_tokens, single_tokens)
    single_rate, ray_rate = single_tokens / single_s, ray_tokens / manifest["seconds"]
    print(f"prepare: {single_tokens:,} tokens in {n_files} files on {cpus} cores: single "
          f"process {single_rate:,.0f} tokens/s ({single_s:.1f} s), Ray Data {ray_rate:,.0f} "
          f"tokens/s ({manifest['seconds']:.1f} s): ratio {ray_rate / single_rate:.2f}",
          flush=True)
    return {"tokens": single_tokens, "single_tokens_per_s": single_rate,
            "ray_tokens_per_s": ray_rate, "ratio": ray_rate / single_rate}


def write_fake_prepared(out: Path, total: int, shard_tokens: int = 1 << 24) -> None:
    """A prepared directory of `total` random tokens (documents of 50,000 tokens)."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for i, lo in enumerate(range(0, total, shard_tokens)):
        n = min(shard_tokens, total - lo)
        name = f"tokens-{i:05d}.npy"
        np.save(out / name, rng.integers(3, 500, n, dtype=np.uint32))
        shards.append({"file": name, "tokens": n})
    np.save(out / "doc_starts.npy", np.arange(0, total, 50_000, dtype=np.int64))
    (out / "manifest.json").write_text(json.dumps({
        "total_tokens": total, "eos_token_id": 1, "shards": shards, "has_mask": False}))


def fetch_worker(prepared: str, tmp: str) -> None:
    """Child process: a worker's data path at 1M tokens (prints one JSON line)."""
    import torch  # noqa: F401  (the worker has it loaded already)

    from ray_jobs.data.samples import SampleStream
    from ray_jobs.data.tokenizer import build_tokenizer

    steps = 8  # the same reads at every corpus size (each touches 4 MB of mapped pages)
    run = run_spec(Path(tmp), Path(prepared), [{"name": "x", "paths": ["unused"]}],
                   seq_len=SEQ_1M, steps=steps)
    tok = build_tokenizer(run, run.run_dir)

    def status_mb(key: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith(key)) / 1024

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
    before = status_mb("VmRSS")
    stream = SampleStream(run, 0, tok, spec_dir=Path(tmp))
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        inputs = stream.batch(step, 0, range(1)).inputs
        times.append((time.perf_counter() - t0) * 1000)
        assert inputs.shape == (1, SEQ_1M)
    # what a worker of a ring of 32 reads: its zigzag shard only (two runs of 16K tokens)
    from ray_jobs.ring_attention.ulysses import sequence_position_ids

    pos = sequence_position_ids(SEQ_1M, 0, 32, 0, 1)
    rank_times = []
    for step in range(steps):
        t0 = time.perf_counter()
        inputs = stream.batch(step, 0, range(1), pos).inputs
        rank_times.append((time.perf_counter() - t0) * 1000)
        assert inputs.shape == (1, SEQ_1M // 32)
    print(json.dumps({"fetch_ms": statistics.median(times[1:]), "first_ms": times[0],
                      "rank_of_32_ms": statistics.median(rank_times),
                      "rss_mb": status_mb("VmHWM") - before, "rss_total_mb": status_mb("VmRSS")}))


def bench_fetch(tmp: Path, tokens: int) -> dict:
    out = {}
    for n in (tokens, tokens * 10):
        prepared = tmp / f"fake-{n}"
        write_fake_prepared(prepared, n)
        res = subprocess.run([sys.executable, __file__, "--fetch-worker", str(prepared),
                              str(tmp / f"w-{n}")], capture_output=True, text=True, check=True)
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"fetch: corpus of {n:,} tokens: one 1M-token sequence in "
              f"{out[n]['fetch_ms']:.1f} ms (median; first {out[n]['first_ms']:.1f} ms; "
              f"a ring-of-32 rank's shard {out[n]['rank_of_32_ms']:.2f} ms), worker "
              f"peak RSS +{out[n]['rss_mb']:.0f} MB over its start", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--fetch-tokens", type=int, default=1 << 24)
    parser.add_argument("--fetch-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fetch_worker:
        fetch_worker(*args.fetch_worker)
        return
    with tempfile.TemporaryDirectory(prefix="ringpilot-data-bench-") as d:
        tmp = Path(d)
        prep = bench_prepare(tmp, args.docs, args.files)
        fetch = bench_fetch(tmp, args.fetch_tokens)
    small, large = sorted(fetch)
    print(json.dumps({
        "prepare_tokens_per_s_ratio_vs_single": round(prep["ratio"], 3),
        "prepare_tokens": prep["tokens"],
        "prepare_single_tokens_per_s": round(prep["single_tokens_per_s"]),
        "prepare_ray_data_tokens_per_s": round(prep["ray_tokens_per_s"]),
        "cores": os.cpu_count(),
        "sample_fetch_ms_1m": {f"{n}_tokens": round(fetch[n]["fetch_ms"], 2)
                               for n in (small, large)},
        "sample_fetch_ms_1m_rank_of_32": {f"{n}_tokens": round(fetch[n]["rank_of_32_ms"], 3)
                                          for n in (small, large)},
        "worker_rss_mb_1m": {f"{n}_tokens": round(fetch[n]["rss_mb"], 1)
                             for n in (small, large)},
    }))


if __name__ == "__main__":
    main()
