"""Benchmark: lm-eval's RULER tasks through the ringpilot backend on a tiny local checkpoint.

    python benchmarks/ruler.py [--length 4096] [--oracle-samples 5] [--online]

Builds a tiny Llama (1 layer, hidden 32) with a byte-level BPE trained locally on RULER-like
text, lets lm-eval generate its 13 RULER tasks for it at `--length`, and reports:
`ruler_tasks_offline` (how many of the 13 made their data here: the others download essays or QA
sets, see `unavailable`), `ruler_oracle_score` (the test-only oracle that reads answers from the
prompts, through lm_eval.simple_evaluate: 100 expected) and `ruler_seconds_per_sample_4k` (the
ringpilot backend, one process, one thread, one sample per task: RULER's generation budgets of
30-128 tokens). With a data folder made on the spot in the real files' schemas (synthetic
essays, SQuAD- and HotpotQA-format JSON, BABILong save_to_disk; tests/support/offline_data.py):
`ruler_tasks_offline_with_data` (RULER tasks whose data lm-eval made from it: 13 expected),
`babilong_tasks_offline_with_data` (BABILong's long-context tasks qa1-qa5 loaded from it: 5) and
`ruler_oracle_score_with_data` (the oracle on all of them). Unless `--online`, HF_HUB_OFFLINE=1
makes tasks that need the hub fail at once rather than after retries. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--oracle-samples", type=int, default=5)
    parser.add_argument("--online", action="store_true")
    args = parser.parse_args()
    if not args.online:  # before huggingface_hub, datasets and nltk are imported
        from ray_jobs.eval.lm_eval.adapter import offline_environment

        offline_environment()

    import torch

    from ray_jobs.eval.lm_eval import ruler
    from tests.support import eval_fixtures as fixtures
    from tests.support.eval_fixtures import ruler_tokenizer
    from tests.support.lm_eval_backends import ORACLE_NAME, register_test_backends

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = ruler_tokenizer()
        model = fixtures.build_tiny_model(len(tokenizer), args.length)
        ckpt = fixtures.save_checkpoint(model, tokenizer, Path(tmp) / "step-1")
        t = time.perf_counter()
        prepared = ruler.prepare_tasks(ckpt, ruler.RULER_TASKS, [args.length])
        prepare_s = time.perf_counter() - t
        register_test_backends()
        oracle = ruler.evaluate_prepared(prepared, Path(tmp) / "oracle",
                                         limit=args.oracle_samples, model=ORACLE_NAME)
        tiny = ruler.evaluate_prepared(prepared, Path(tmp) / "tiny", limit=1)
        from ray_jobs.eval.lm_eval import babilong
        from ray_jobs.eval.lm_eval.offline_data import babilong_config
        from tests.support.offline_data import write_data_dir

        data = write_data_dir(Path(tmp) / "data", (babilong_config(args.length),))
        t = time.perf_counter()
        with_data = ruler.prepare_tasks(ckpt, ruler.RULER_TASKS, [args.length], data_dir=data)
        prepare_data_s = time.perf_counter() - t
        bab = babilong.prepare_babilong(ckpt, [args.length], data_dir=data)
        oracle_data = ruler.evaluate_prepared(with_data, Path(tmp) / "oracle-data",
                                              limit=args.oracle_samples, model=ORACLE_NAME)
    (row,) = tiny.rows
    result = {
        "ruler_oracle_score": round(oracle.rows[0].score, 2),
        "ruler_tasks_offline": len(prepared.tasks),
        "ruler_seconds_per_sample_4k": round(tiny.seconds / row.samples, 3),
        "length": args.length,
        "oracle_samples": oracle.rows[0].samples,
        "tiny_model_score": round(row.score, 2),
        "tasks_run": sorted(prepared.tasks),
        "unavailable": {k: v.split(";")[0] for k, v in prepared.unavailable.items()},
        "prepare_seconds": round(prepare_s, 1),
        "ruler_tasks_offline_with_data": len(with_data.tasks),
        "babilong_tasks_offline_with_data": sum(len(t) for t in bab.tasks.values()),
        "ruler_oracle_score_with_data": round(oracle_data.rows[0].score, 2),
        "unavailable_with_data": sorted(with_data.unavailable) + sorted(bab.unavailable),
        "prepare_seconds_with_data": round(prepare_data_s, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
