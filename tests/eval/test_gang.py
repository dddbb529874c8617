"""Evaluation gangs on a local Ray cluster: a tiny Llama at 16K tokens split over 2 and 3 actors
against one process, a killed member, a gang that cannot be placed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_jobs.eval.gang import EvalGang, GangFailed, GangUnplaceable
from ray_jobs.eval.model import greedy_tokens, load_checkpoint, prompt_ids
from ray_jobs.eval.results import load_results
from ray_jobs.eval.scheduler import EvalScheduler
from specs.checkpoint import checkpoint_dir
from specs.ledger import Ledger
from tests.eval.test_scheduler import tiny_run
from tests.support import eval_fixtures as fixtures
from topology.eval_plan import gang_size_for

pytestmark = pytest.mark.ray

LENGTH = 16_384


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory, tokenizer):
    """A tiny Llama (2 layers, grouped-query attention) saved as a committed checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=LENGTH,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    path = checkpoint_dir(tmp_path_factory.mktemp("gang"), "s16k", 1)
    return fixtures.save_checkpoint(LlamaForCausalLM(config), tokenizer, path)


@pytest.mark.parametrize("size", [2, 3])
def test_gang_prefill_and_greedy_tokens_equal_one_process(ray_cluster, long_checkpoint, size):
    """16,384 prompt tokens (with BOS: 16,385, which leaves a remainder over 2P chunks for both
    gang sizes): the gang's logits of every position match one process's SDPA within float
    tolerance, and its greedy tokens equal one process's."""
    model, tokenizer = load_checkpoint(long_checkpoint)
    rng = np.random.default_rng(size)
    ids = prompt_ids(tokenizer, tokenizer.decode(rng.integers(1, len(tokenizer), LENGTH)))
    ids = ids[: LENGTH + 1]
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    ref_tokens = greedy_tokens(model, torch.tensor([ids]), 16, eos=None)
    with EvalGang(size) as gang:
        gang.load(str(long_checkpoint))
        logits = gang.call("prefill_logits", ids)
        tokens = gang.generate(ids, 16, None)
        pids = gang.call("pid")
    assert len(set(pids)) == size  # separate processes
    for member in logits:  # every member ends with the whole sequence's logits
        np.testing.assert_allclose(member, ref, atol=5e-5, rtol=1e-4)
    assert tokens == ref_tokens and len(tokens) == 16


def test_killed_member_fails_the_gang_and_frees_it(ray_cluster, long_checkpoint):
    import ray

    gang = EvalGang(2).start()
    gang.load(str(long_checkpoint))
    ray.kill(gang.members[1])
    with pytest.raises(GangFailed, match="member 1 of 2 failed in generate"):
        gang.generate(list(range(1, 200)), 4, None)
    assert gang.members == [] and gang._pg is None  # torn down: nothing left holding CPUs


def test_gang_that_cannot_be_placed_is_reported_not_hung(ray_cluster):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(GangUnplaceable, match=r"needs 6 CPUs .* the whole cluster has"):
        EvalGang(3, cpus=2).start()  # larger than the cluster: at once
    # Fits the cluster (all its CPUs in one member) but one CPU is taken: reported after the
    # placement timeout.
    hog = placement_group([{"CPU": 1}])
    ray.get(hog.ready(), timeout=60)
    try:
        with pytest.raises(GangUnplaceable, match="could not be placed within 2 s"):
            EvalGang(1, cpus=cpus, place_timeout_s=2).start()
    finally:
        remove_placement_group(hog)
    assert ray.cluster_resources()["CPU"] == cpus


def test_gang_size_from_length_and_member_capacity():
    assert gang_size_for(16_384, 16_384) == 1
    assert gang_size_for(16_385, 16_384) == 2
    assert gang_size_for(1_048_576, 32_768) == 32
    assert gang_size_for(1_048_576, 32_768, configured=8) == 8
    with pytest.raises(ValueError):
        gang_size_for(10, 0)


def test_scheduler_runs_long_contexts_on_a_gang_and_retries_it_whole(ray_cluster, tmp_path,
                                                                     tokenizer):
    """max_tokens_per_evaluator 256: the 512-token context goes to a gang of 2 (derived), whose
    member is killed on the first attempt; the evaluation is retried as a whole and recorded
    with the engine of every length."""
    run = tiny_run(tmp_path, max_retries=1, context_lengths=[256, 512],
                   max_tokens_per_evaluator=256)
    run_dir = tmp_path / run.name
    model = fixtures.build_tiny_model(len(tokenizer), 512)
    path = fixtures.save_checkpoint(model, tokenizer, checkpoint_dir(run_dir, "s192", 2))
    ledger = Ledger(run_dir, run.name)
    ledger.commit_checkpoint("s192", 2, path)
    scheduler = EvalScheduler(run, run_dir,
                              evaluate_fn=fixtures.kill_gang_member_on_first_attempt).start()
    scheduler.stop(wait=True, timeout=300)
    entry = ledger.read().stages["s192"].eval["checkpoints/s192/step-000002"]
    assert (entry.status, entry.attempts) == ("done", 2), entry.error
    results = load_results(run_dir / entry.results)
    assert results.engines == {"256": "one evaluator", "512": "evaluation gang of 2"}
    assert results.gang["size"] == 2 and len(set(results.gang["pids"])) == 2
    assert {c.length for c in results.cells} == {256, 512}
    assert all(c.engine == results.engines[str(c.length)] for c in results.cells)


def test_checkpoint_without_its_stage_rope_is_refused_in_results_and_log(tmp_path, tokenizer,
                                                                         caplog):
    from ray_jobs.eval.pipeline import EvalRequest, check_stage_rope
    from specs.checkpoint import CheckpointError

    model = fixtures.build_tiny_model(len(tokenizer), 512, theta=10_000.0)
    fixtures.save_checkpoint(model, tokenizer, checkpoint_dir(tmp_path, "s1k", 2))
    plain = {"rope_type": "default", "rope_theta": 10_000.0}
    request = EvalRequest(stage="s1k", checkpoint="checkpoints/s1k/step-000002", step=2,
                          run_dir=tmp_path, attempt=1, tasks=("niah_lite",), lengths=(1024,),
                          depths=(0.0,), samples=1, seed=0, gpus=0, max_length=4096, rope=plain)
    check_stage_rope(request)  # the right RoPE passes
    wrong = EvalRequest(**{**request.__dict__, "rope": {**plain, "rope_theta": 283_461_213.0}})
    with pytest.raises(CheckpointError, match="config.json has rope_theta 10000.0, but stage "
                       "'s1k' trains with rope_theta 283461213.0"):
        check_stage_rope(wrong)
    assert "rope_theta 10000.0" in load_results(wrong.out_dir / "results.json").error
    assert "rope_theta 10000.0" in caplog.text
    # the same base under another method is another model's positions
    yarn = {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
            "original_max_position_embeddings": 256}
    other = EvalRequest(**{**request.__dict__, "rope": yarn, "attempt": 2})
    with pytest.raises(CheckpointError, match="trains with rope_type yarn \\(factor 4.0\\)"):
        check_stage_rope(other)


def test_standalone_evaluate_runs_a_gang_and_refuses_one_larger_than_the_cluster(
        ray_cluster, tmp_path, tokenizer, capsys):
    from ray_jobs.eval.cli import main

    ckpt = fixtures.save_checkpoint(fixtures.build_tiny_model(len(tokenizer), 1024), tokenizer,
                                    tmp_path / "llama", ringpilot=False)
    common = ["--checkpoint", str(ckpt), "--tasks", "niah_lite", "--context-lengths", "256", "512",
              "--depths", "50", "--samples", "1", "--max-length", "256"]
    assert main(common + ["--gang-size", "2", "--out", str(tmp_path / "ok")]) == 0
    ok = load_results(tmp_path / "ok" / "results.json")
    assert ok.engines == {"256": "one evaluator", "512": "evaluation gang of 2"}
    assert [c.length for c in ok.cells] == [256, 512] and ok.skipped == []
    assert main(common + ["--gang-size", "9", "--out", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    assert "an evaluation gang of 9 needs 9 CPUs" in err and "lower the gang size" in err
    big = load_results(tmp_path / "big" / "results.json")
    assert [c.length for c in big.cells] == [256]  # what fits one evaluator still ran
    assert [(s.length, s.reason[:40]) for s in big.skipped] == [
        (512, "not run: an evaluation gang of 9 needs 9")]
