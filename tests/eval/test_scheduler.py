"""Evaluation actors on a local Ray cluster, beside a real (tiny) training loop."""

from pathlib import Path

import pytest

from ray_jobs.eval.results import load_results
from ray_jobs.eval.scheduler import EvalScheduler
from specs.checkpoint import checkpoint_dir
from specs.ledger import Ledger, mark_committed
from specs.run import RunSpec
from tests.support import eval_fixtures as fixtures

pytestmark = pytest.mark.ray

STAGES = [("s192", 192, 4), ("s384", 384, 4)]


def tiny_run(tmp_path: Path, **eval_fields) -> RunSpec:
    return RunSpec.model_validate({
        "name": "evtest",
        "model": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
                      pretrain_seq_len=192, dtype="float32"),
        # the RoPE base the fixtures' checkpoints carry (evaluation refuses any other)
        "stages": [dict(name=n, seq_len=s, steps=k, lr=1e-3, ring_degree=1, rope_theta=10000.0,
                        data_parallel_degree=1) for n, s, k in STAGES],
        "resources": dict(device="cpu", workers=1),
        "eval": dict(tasks=["niah_lite", "vt_lite"], depths=[0, 100], samples=1, cpus=1,
                     **eval_fields),
        "data": {"tokenizer": {"vocab_size": 1000}},
        "storage": dict(path=str(tmp_path), checkpoint_every=2),
    })


def train(ray, run: RunSpec, run_dir: Path, stages=STAGES, **kw):
    task = ray.remote(num_cpus=1)(fixtures.train_with_checkpoints)
    return task.remote(str(run_dir), run.name, stages, run.storage.checkpoint_every, **kw)


def test_checkpoints_landing_during_training_get_evaluated(ray_cluster, tmp_path):
    run = tiny_run(tmp_path, seed=3)
    run_dir = tmp_path / run.name
    scheduler = EvalScheduler(run, run_dir).start()
    trained = ray_cluster.get(train(ray_cluster, run, run_dir, wait_for_first_eval=120))
    scheduler.stop(wait=True, timeout=300)
    assert trained["first_eval_during_training"] == "done"  # evaluated while training waited
    doc = Ledger(run_dir).read()
    for stage, seq_len, _ in STAGES:
        entry = doc.stages[stage]
        assert [c.step for c in entry.checkpoints] == [2, 4]
        for ckpt in entry.checkpoints:
            ev = entry.eval[ckpt.path]
            # vt does not fit 192 tokens with this tiny tokenizer: skipped, with the reason.
            tasks = ["niah_lite", "vt_lite"] if stage == "s384" else ["niah_lite"]
            assert (ev.status, ev.attempts, sorted(ev.scores)) == ("done", 1, tasks)
            results = run_dir / ev.results
            assert results == run_dir / "eval" / stage / Path(ckpt.path).name / "results.json"
            assert results.is_file() and (results.parent / "heatmap_niah_lite.png").is_file()
    # Default lengths: the checkpoint's stage seq_len and the shorter stages'.
    last = load_results(run_dir / doc.stages["s384"].eval["checkpoints/s384/step-000004"].results)
    assert last.lengths == [192, 384]
    assert [(s.task, s.length) for s in last.skipped] == [("vt_lite", 192)]
    assert "192 is too short" in last.skipped[0].reason


def test_killed_evaluation_actor_is_retried_and_training_goes_on(ray_cluster, tmp_path):
    run = tiny_run(tmp_path, max_retries=1, context_lengths=[200])
    run_dir = tmp_path / run.name
    scheduler = EvalScheduler(run, run_dir, evaluate_fn=fixtures.crash_on_first_attempt).start()
    trained = ray_cluster.get(train(ray_cluster, run, run_dir, stages=STAGES[:1]))
    scheduler.stop(wait=True, timeout=300)
    assert trained["steps"] == {"s192": 4}  # training unaffected
    doc = Ledger(run_dir).read()
    assert doc.stages["s192"].state == "done"
    assert [c.step for c in doc.stages["s192"].checkpoints] == [2, 4]
    evals = list(doc.stages["s192"].eval.values())
    assert len(evals) == 2
    assert all((ev.status, ev.attempts) == ("done", 2) for ev in evals)  # each died once


def test_gives_up_after_max_retries_and_refuses_an_incomplete_checkpoint(ray_cluster, tmp_path,
                                                                          tiny_model, tokenizer):
    run = tiny_run(tmp_path, max_retries=0, context_lengths=[200])
    run_dir = tmp_path / run.name
    ledger = Ledger(run_dir, run.name)
    good = fixtures.save_checkpoint(tiny_model, tokenizer, checkpoint_dir(run_dir, "s192", 2))
    ledger.commit_checkpoint("s192", 2, good)
    # Committed, then its directory lost a file: the actor refuses it, without retrying.
    broken = fixtures.save_checkpoint(tiny_model, tokenizer, checkpoint_dir(run_dir, "s384", 2))
    ledger.commit_checkpoint("s384", 2, broken)
    (broken / "tokenizer.json").unlink()
    # Written but never committed: not in the ledger, so never evaluated.
    fixtures.save_checkpoint(tiny_model, tokenizer, checkpoint_dir(run_dir, "s384", 4),
                             commit=False)
    scheduler = EvalScheduler(run, run_dir, evaluate_fn=fixtures.crash_on_first_attempt).start()
    scheduler.stop(wait=True, timeout=300)
    doc = ledger.read()
    crashed = doc.stages["s192"].eval["checkpoints/s192/step-000002"]
    assert (crashed.status, crashed.attempts) == ("failed", 1)
    assert "evaluation actor died" in crashed.error and "eval.max_retries = 0" in crashed.error
    refused = doc.stages["s384"].eval["checkpoints/s384/step-000002"]
    assert (refused.status, refused.attempts) == ("failed", 1)
    assert "lacks tokenizer.json" in refused.error
    assert "checkpoints/s384/step-000004" not in doc.stages["s384"].eval
    mark_committed(checkpoint_dir(run_dir, "s384", 4))  # marker alone is not enough
    assert ("s384", "checkpoints/s384/step-000004", 4) not in EvalScheduler(run, run_dir).pending()


def test_stop_cancels_an_evaluation_that_outlives_its_timeout(ray_cluster, tmp_path, tiny_model,
                                                             tokenizer):
    import time

    run = tiny_run(tmp_path, context_lengths=[200])
    run_dir = tmp_path / run.name
    ledger = Ledger(run_dir, run.name)
    path = fixtures.save_checkpoint(tiny_model, tokenizer, checkpoint_dir(run_dir, "s192", 2))
    ledger.commit_checkpoint("s192", 2, path)
    scheduler = EvalScheduler(run, run_dir, evaluate_fn=fixtures.hang).start()
    deadline = time.monotonic() + 60
    while not scheduler.busy and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scheduler.busy
    scheduler.stop(wait=True, timeout=1)
    entry = ledger.read().stages["s192"].eval["checkpoints/s192/step-000002"]
    assert entry.status == "failed"
    assert entry.error.startswith("cancelled: the scheduler was stopped")
