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


def _first_stage_plan(cluster: str, **eval_fields):
    """The 8B recipe's 65K stage (ring 8) planned on `cluster`, evaluation on."""
    from ray_jobs.train.placement import only_stages
    from topology.run_plan import plan_run

    run = only_stages(_run("configs/llama3-8b-1m.yaml", **eval_fields), [0])
    return plan_run(load_cluster(cluster), run, search_seconds=0.02)


def test_evaluation_beside_training_gets_whole_nodes_training_leaves():
    plan = _first_stage_plan(CLUSTER_8B, gang_size=3)  # 1 evaluator + a gang of 3: 4 GPUs
    (ev,) = plan.eval.stages
    training = {w.node for w in plan.stages[0].workers}
    assert (ev.stage, ev.gpus, ev.when) == ("65k", 4, "beside training")
    assert len(ev.nodes) == 1 and not set(ev.nodes) & training
    # 1 + the default gang of 11: 12 GPUs, two whole nodes (the same training stages)
    default = plan_eval(Planner(load_cluster(CLUSTER_8B)),
                        _run("configs/llama3-8b-1m.yaml"), plan.stages).stages[0]
    assert (default.gpus, len(default.nodes)) == (12, 2) and not set(default.nodes) & training


def test_evaluation_waits_for_the_boundary_when_training_touches_every_node():
    """On two 8-GPU nodes the planner spreads the 65K ring over both (4 + 4 GPUs): no node is
    free of training, so even a 4-GPU evaluation waits for the stage boundary rather than share
    a node with training workers."""
    plan = _first_stage_plan("configs/clusters/l40s-2node-leaf.yaml", gang_size=3)
    (ev,) = plan.eval.stages
    assert {w.node for w in plan.stages[0].workers} == {"node-000", "node-001"}
    assert (ev.gpus, ev.when, ev.nodes) == (4, "at the stage boundary", [])
    assert "training uses 8 of the 16 GPUs and nodes without training workers hold 0" in ev.note


def test_a_gang_larger_than_the_cluster_reserves_the_evaluator_alone():
    """A gang that cannot start on the cluster leaves its contexts not run (GangUnplaceable),
    so the plan counts only the evaluator, and says so, instead of refusing the run."""
    plan = _first_stage_plan("configs/clusters/l40s-2node-leaf.yaml", gang_size=16)
    (ev,) = plan.eval.stages
    assert ev.gpus == 1
    assert "(17 GPUs with the evaluator) does not fit the cluster's 16" in ev.note


def test_without_evaluation_nothing_is_reserved():
    two = "configs/clusters/l40s-2node-leaf.yaml"
    plan = _first_stage_plan(two, gpus=0)
    assert (plan.eval.stages[0].gpus, plan.eval.stages[0].nodes) == (0, [])
    off = _run("configs/llama3-8b-1m.yaml", enabled=False)
    assert plan_eval(Planner(load_cluster(two)), off, plan.stages).stages == []
