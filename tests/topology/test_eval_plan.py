"""The plan's evaluation section: how many context tokens one GPU holds, which lengths run on a
gang, and the predicted cost of a checkpoint's grid (cost model)."""

from __future__ import annotations

import pytest

from specs.loading import load_model
from specs.run import RunSpec
from topology.eval_plan import gang_size_for, kv_bytes_per_token, plan_eval, tokens_per_device
from topology.planner import Planner
from topology.sources import load_cluster

GB = 1e9
CLUSTER_8B = "configs/clusters/l40s-64-leaf-spine.yaml"


def _run(path: str, **eval_fields) -> RunSpec:
    run = load_model(path, RunSpec)
    return run.model_copy(update={"eval": run.eval.model_copy(update=eval_fields)})


def test_llama3_8b_kv_cache_and_capacity_by_hand():
    run = _run("configs/llama3-8b-1m.yaml")
    # 32 layers x 8 K/V heads x 128 x (K and V) x 2 bytes: 128 KiB per token, 128 GiB at 1M.
    assert kv_bytes_per_token(run) == 131_072
    # 48 GB less 3 GB reserve less 16.06 GB of bf16 weights, over 128 KiB of KV cache plus the
    # prefill's live activations per token ((4 x 4096 + 3 x 14336 + 48 x 128) x 2 = 131,072 B).
    assert tokens_per_device(run, 48 * GB, 3 * GB) == int((45 * GB - 8_030_261_248 * 2)
                                                           // (131_072 + 131_072))
    assert tokens_per_device(_run("configs/llama3-70b-1m.yaml"), 48 * GB, 3 * GB) == 0


def test_eval_section_of_the_8b_plan_runs_long_contexts_on_one_gang():
    run = _run("configs/llama3-8b-1m.yaml")
    ev = plan_eval(Planner(load_cluster(CLUSTER_8B)), run)
    by = {r.length: r for r in ev.lengths}
    assert sorted(by) == [65536, 131072, 262144, 524288, 1048576]  # up to the longest stage
    assert ev.tokens_per_device > ev.max_tokens_per_evaluator == 98_304
    assert by[65536].engine == "one evaluator" and by[65536].gang_size == 1
    # One gang for every longer context, sized for 1M: ceil(1,048,576 / 98,304) = 11 members.
    assert {by[n].gang_size for n in by if n > 98_304} == {11}
    assert by[1048576].tokens_per_member == 95_326 <= ev.max_tokens_per_evaluator
    assert len(by[1048576].ring) == 11 and len({(w.node, w.gpu) for w in by[1048576].ring}) == 11
    # Prefill grows with the length at a fixed gang (attention is quadratic); the grid sums up.
    assert by[131072].prefill_seconds < by[262144].prefill_seconds < by[1048576].prefill_seconds
    assert ev.checkpoint_hours == pytest.approx(sum(r.checkpoint_hours for r in ev.lengths))
    prompts = (6 * 11 + 2) * 4  # 5 NIAH tasks and vt x 11 depths + cwe, fwe; 4 samples each
    assert {r.prompts for r in ev.lengths} == {prompts}
    assert ev.notes == []


def test_eval_section_says_what_cannot_be_evaluated():
    run = _run("configs/llama3-8b-1m.yaml", max_tokens_per_evaluator=262_144)
    ev = plan_eval(Planner(load_cluster(CLUSTER_8B)), run)
    assert "is more than one" in ev.notes[0] and "lower it" in ev.notes[0]
    big = _run("configs/llama3-70b-1m.yaml")
    ev = plan_eval(Planner(load_cluster(CLUSTER_8B)), big)
    assert ev.lengths == [] and "do not fit one" in ev.notes[0]


def test_gang_size_rule():
    assert gang_size_for(98_304, 98_304) == 1
    assert gang_size_for(1_048_576, 98_304) == 11
    assert gang_size_for(1_048_576, 98_304, configured=16) == 16


def test_prompts_per_checkpoint_agree_with_the_evaluation():
    """The estimate counts, per length, the prompts the evaluation's grid really runs: every
    task of eval.tasks, depth tasks at each depth, the others once."""
    from ray_jobs.eval.runner import evaluate
    from specs.eval_tasks import SPEC_TASKS

    run = _run("configs/llama3-8b-1m.yaml", tasks=list(SPEC_TASKS), depths=[0.0, 50.0, 100.0],
               samples=2)
    ev = plan_eval(Planner(load_cluster(CLUSTER_8B)), run)
    # any generator and token counter (here: words) run the same grid
    res = evaluate(lambda prompt, max_new: "", lambda text: len(text.split()), checkpoint="x",
                   tasks=run.eval.tasks,
                   lengths=[2048], depths=run.eval.depths, samples=run.eval.samples, seed=0)
    assert not res.skipped
    assert {r.prompts for r in ev.lengths} == {len(res.outputs)} == {(7 * 3 + 2) * 2}
