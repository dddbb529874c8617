"""Evaluation on GPUs (issue 33): the evaluators' dtype is the plan's, evaluation GPUs are in the
plan and its capacity check, and an evaluation actor lives for one checkpoint only."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray.exceptions
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from ray_jobs.eval import scheduler as scheduler_mod
from ray_jobs.eval.gang import NODE_LABEL, node_selector
from ray_jobs.eval.model import load_arguments, load_checkpoint
from ray_jobs.eval.pipeline import EvalSummary
from ray_jobs.eval.scheduler import EvalScheduler, actor_options
from specs.checkpoint import checkpoint_dir
from specs.ledger import Ledger
from specs.loading import load_model
from specs.plan import EvalPlan, EvalStagePlan
from specs.run import RunSpec
from tests.eval.test_scheduler import tiny_run
from tests.support import eval_fixtures as fixtures
from topology.eval_plan import (
    check_eval_capacity,
    eval_dtype,
    kv_bytes_per_token,
    plan_eval,
    tokens_per_device,
)
from topology.planner import PlanError, Planner
from topology.sources import load_cluster

RECIPE_8B = "configs/llama3-8b-1m.yaml"
CLUSTER_8B = "configs/clusters/l40s-64-leaf-spine.yaml"


# -- the dtype ---------------------------------------------------------------------------------
@settings(max_examples=100, deadline=500)
@given(compute=st.sampled_from(["bfloat16", "float32"]), device=st.sampled_from(["cuda", "cpu"]))
def test_eval_dtype_is_bf16_only_for_a_bf16_run_on_cuda(compute, device):
    expected = "bfloat16" if (compute, device) == ("bfloat16", "cuda") else "float32"
    assert eval_dtype(compute, device) == expected


def test_eval_dtype_refuses_an_unknown_device():
    with pytest.raises(ValueError, match="device_type must be 'cuda' or 'cpu', got 'mps'"):
        eval_dtype("bfloat16", "mps")


def test_cuda_load_arguments_are_bf16_and_load_a_bf16_model(tmp_path):
    """The exact from_pretrained arguments the CUDA path uses, applied on the CPU: the weights
    arrive in bf16, not fp32; a CPU evaluator of the same run keeps fp32."""
    cuda = load_arguments("bfloat16", "cuda")
    assert cuda == {"dtype": torch.bfloat16, "attn_implementation": "sdpa",
                    "local_files_only": True}
    assert load_arguments("bfloat16", "cuda:3")["dtype"] is torch.bfloat16  # a device index
    assert load_arguments("bfloat16", "cpu")["dtype"] is torch.float32
    assert load_arguments("float32", "cuda")["dtype"] is torch.float32
    path = fixtures.save_checkpoint(fixtures.build_tiny_model(1000),
                                    fixtures.build_tokenizer(1000), tmp_path / "ckpt")
    model = LlamaForCausalLM.from_pretrained(str(path), trust_remote_code=False, **cuda)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    on_cpu, _ = load_checkpoint(path, "cpu", "bfloat16")
    assert {p.dtype for p in on_cpu.parameters()} == {torch.float32}


def test_ruler_backend_loads_in_the_runs_compute_dtype(tmp_path, monkeypatch):
    """lm-eval's RULER backend loads its own copy of the checkpoint: with the run's compute
    dtype, so on CUDA it is bf16 like the evaluator's (the pipeline passes it through)."""
    from ray_jobs.eval import model as model_mod
    from ray_jobs.eval.lm_eval.adapter import _CheckpointModel

    seen, real = [], model_mod.load_checkpoint
    monkeypatch.setattr(model_mod, "load_checkpoint", lambda path, device, dtype="float32": (
        seen.append((device, dtype)), real(path, device, dtype))[1])
    path = fixtures.save_checkpoint(fixtures.build_tiny_model(1000),
                                    fixtures.build_tokenizer(1000), tmp_path / "ckpt")
    ckpt = _CheckpointModel(str(path), "cpu", compute_dtype="bfloat16")
    assert seen == [("cpu", "bfloat16")]
    assert next(ckpt.model.parameters()).dtype is torch.float32  # on CPU: fp32, eval_dtype's rule


def _run(path: str, **resources) -> RunSpec:
    run = load_model(path, RunSpec)
    return run.model_copy(update={"resources": run.resources.model_copy(update=resources)})


def test_plan_evaluation_numbers_use_the_evaluators_element_size():
    run = _run(RECIPE_8B)
    assert run.compute_dtype == "bfloat16" and run.model.dtype == "float32"
    ev = plan_eval(Planner(load_cluster(CLUSTER_8B)), run)
    assert ev.dtype == eval_dtype(run.compute_dtype, "cuda") == "bfloat16"
    # 32 layers x 8 K/V heads x 128 x (K and V) x 2 bytes (bf16, as the evaluator loads)
    assert kv_bytes_per_token(run) == 32 * 8 * 128 * 2 * 2
    # The same run evaluated on CPUs loads fp32: 4 bytes an element, and a fp32 8B model
    # (32 GB) beside its KV cache holds far fewer tokens in the same 48 GB.
    cpu = _run(RECIPE_8B, device="cpu")
    assert eval_dtype(cpu.compute_dtype, "cpu") == "float32"
    assert kv_bytes_per_token(cpu) == 32 * 8 * 128 * 2 * 4
    assert tokens_per_device(cpu, 48e9, 3e9) < tokens_per_device(run, 48e9, 3e9) / 4


# -- GPUs in the plan --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plan_8b():
    """The 8B recipe's first stage (8 GPUs) and its 524K stage (all 512) planned on its cluster
    file with evaluation on. The 524K stage's Ulysses degree is pinned to 1, what `auto`
    chooses there (tests/golden/plan-llama3-8b-1m.report.md), to keep the test fast."""
    from ray_jobs.train.placement import only_stages
    from topology.run_plan import plan_run

    run = load_model(RECIPE_8B, RunSpec)
    stages = list(run.stages)
    stages[2] = stages[2].model_copy(update={"ulysses_degree": 1})
    run = only_stages(run.model_copy(update={"stages": stages}), [0, 2])
    return run, plan_run(load_cluster(CLUSTER_8B), run, search_seconds=0.02)


def test_8b_plan_counts_evaluation_gpus_and_its_524k_stage_is_schedulable(plan_8b):
    run, plan = plan_8b
    assert run.eval.enabled
    ev = {s.stage: s for s in plan.eval.stages}
    assert sorted(ev) == ["524k", "65k"]
    # One checkpoint: the evaluator plus a gang of ceil(1,048,576 / 98,304) = 11 members.
    assert {s.gpus for s in ev.values()} == {12}
    first, full = plan.stage("65k"), plan.stage("524k")
    assert len(first.workers) == 8 and len(full.workers) == 512
    # 65K trains on one node: evaluation beside it, on two whole nodes training does not use.
    assert ev["65k"].when == "beside training" and len(ev["65k"].nodes) == 2
    assert not set(ev["65k"].nodes) & {w.node for w in first.workers}
    # 524K trains on every GPU of the cluster: its evaluation waits for the stage boundary.
    assert ev["524k"].when == "at the stage boundary" and ev["524k"].nodes == []
    assert "512 of the 512 GPUs" in ev["524k"].note


def test_capacity_check_refuses_evaluation_on_training_nodes(plan_8b):
    _, plan = plan_8b
    stages = plan.stages
    per_node = {}
    for s in stages[1:]:
        for w in s.workers:
            per_node[w.node] = per_node.get(w.node, 0) + 1
    assert sum(per_node.values()) == 512
    good = plan.eval.stages
    check_eval_capacity(stages, good, per_node)  # the plan as built passes
    on_training = good[0].model_copy(update={"nodes": [stages[0].workers[0].node]})
    with pytest.raises(PlanError, match=r"eval \(65k\): evaluation nodes .* also hold training"):
        check_eval_capacity(stages, [on_training, good[1]], per_node)
    beside_full = good[1].model_copy(update={"when": "beside training", "nodes": ["node-064"]})
    with pytest.raises(PlanError, match=r"eval \(524k\):"):
        check_eval_capacity(stages, [good[0], beside_full], per_node)
    too_big = good[1].model_copy(update={"gpus": 513})
    with pytest.raises(PlanError, match="needs 513 GPUs and the cluster has 512"):
        check_eval_capacity(stages, [good[0], too_big], per_node)


# -- the actor: per checkpoint, off the training nodes -----------------------------------------
def test_actor_options_keep_the_actor_on_the_plans_evaluation_nodes():
    from ray._private.label_utils import validate_label_selector

    from ray_jobs.train.placement import NODE_LABEL as TRAINING_LABEL

    assert NODE_LABEL == TRAINING_LABEL  # the label training workers are pinned by
    run = _run(RECIPE_8B)
    beside = EvalStagePlan(stage="65k", gpus=12, when="beside training",
                           nodes=["node-002", "node-003"])
    options = actor_options(run, beside)
    assert options["label_selector"] == {NODE_LABEL: "in(node-002, node-003)"}
    assert validate_label_selector(options["label_selector"]) is None  # Ray accepts it
    assert (options["num_gpus"], options["num_cpus"]) == (run.eval.gpus, run.eval.cpus)
    boundary = EvalStagePlan(stage="1m", gpus=12, when="at the stage boundary")
    assert "label_selector" not in actor_options(run, boundary)
    assert "label_selector" not in actor_options(run, None)
    assert validate_label_selector(node_selector(["a"])) is None


class FakeActors:
    """The scheduler's actor backend without Ray: records what is created and killed."""

    def __init__(self, fail_first: bool = False):
        self.created, self.killed, self.calls = [], [], []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def create(self, options, threads, offline):
        with self.lock:
            actor = f"actor-{len(self.created)}"
            self.created.append((actor, options))
            return actor

    def submit(self, actor, request, fn):
        self.calls.append((actor, request))
        return (actor, request)

    def ready(self, ref) -> bool:
        return True

    def get(self, ref) -> EvalSummary:
        actor, request = ref
        if self.fail_first and len(self.calls) == 1:
            raise ray.exceptions.RayActorError()
        assert actor not in self.killed, "called an actor already released"
        return EvalSummary(scores={"niah_lite": 1.0}, results=Path(request.run_dir) / "r.json",
                           started_unix=time.time(), pid=0, skipped=0)

    def kill(self, actor) -> None:
        self.killed.append(actor)


def _commit(run_dir: Path, ledger: Ledger, stage: str, step: int) -> None:
    path = checkpoint_dir(run_dir, stage, step)
    fixtures.save_checkpoint(fixtures.build_tiny_model(1000), fixtures.build_tokenizer(1000),
                             path)
    ledger.commit_checkpoint(stage, step, path)


@pytest.fixture()
def fast_poll(monkeypatch):
    monkeypatch.setattr(scheduler_mod, "POLL_SECONDS", 0.01)


def test_actor_is_created_per_checkpoint_and_released_after_it(tmp_path, fast_poll):
    run = tiny_run(tmp_path, max_retries=1)
    run_dir = tmp_path / run.name
    ledger = Ledger(run_dir, run.name)
    plan = EvalPlan(tokens_per_device=1, max_tokens_per_evaluator=1, gpus_per_member=1,
                    answer_tokens=1, lengths=[], checkpoint_hours=0, stages=[
                        EvalStagePlan(stage="s192", gpus=1, when="beside training",
                                      nodes=["n7"])])
    actors = FakeActors(fail_first=True)
    scheduler = EvalScheduler(run, run_dir, plan=plan, actors=actors).start()
    assert actors.created == []  # nothing held before a checkpoint lands
    _commit(run_dir, ledger, "s192", 2)
    _commit(run_dir, ledger, "s192", 4)
    scheduler.stop(wait=True, timeout=10)
    # Two checkpoints, the first actor died: three actors, every one killed after its use.
    assert [a for a, _ in actors.created] == ["actor-0", "actor-1", "actor-2"]
    assert actors.killed == ["actor-0", "actor-1", "actor-2"]
    assert all(o["label_selector"] == {NODE_LABEL: "in(n7)"} for _, o in actors.created)
    assert {r.nodes for _, r in actors.calls} == {("n7",)}
    assert {r.compute_dtype for _, r in actors.calls} == {run.compute_dtype}
    doc = ledger.read().stages["s192"]
    assert sorted((e.status, e.attempts) for e in doc.eval.values()) == [("done", 1),
                                                                         ("done", 2)]


def test_boundary_stage_is_evaluated_after_it_ends_and_the_driver_waits(tmp_path, fast_poll):
    run = tiny_run(tmp_path)
    run_dir = tmp_path / run.name
    ledger = Ledger(run_dir, run.name)
    plan = EvalPlan(tokens_per_device=1, max_tokens_per_evaluator=1, gpus_per_member=1,
                    answer_tokens=1, lengths=[], checkpoint_hours=0, stages=[
                        EvalStagePlan(stage="s192", gpus=1, when="at the stage boundary")])
    actors = FakeActors()
    scheduler = EvalScheduler(run, run_dir, plan=plan, actors=actors,
                              training_nodes={"s192": {"n1"}, "s384": {"n1"}}).start()
    try:
        ledger.start_stage("s192")
        _commit(run_dir, ledger, "s192", 2)
        time.sleep(0.3)
        assert actors.created == []  # held while its stage trains on every GPU
        ledger.finish_stage("s192", "done")
        assert scheduler.make_room("s384", timeout=10) is True  # the driver, between stages
        assert [a for a, _ in actors.created] == ["actor-0"] and actors.killed == ["actor-0"]
        assert "label_selector" not in actors.created[0][1]
        assert ledger.read().stages["s192"].eval[
            "checkpoints/s192/step-000002"].status == "done"
        # A resumed boundary stage (still "running" in the ledger of a driver that died) does
        # not wait for its own checkpoints, which only its end lets start: no deadlock.
        ledger.start_stage("s192")
        _commit(run_dir, ledger, "s192", 4)
        assert scheduler.make_room("s192", timeout=5) is True
        assert len(actors.created) == 1
    finally:
        scheduler.stop(wait=False)


def test_next_stage_waits_only_for_evaluations_on_its_nodes(tmp_path, fast_poll):
    """A checkpoint evaluated beside training on n7 is in the way of a next stage training on
    n7, not of one training on n1; without a plan nothing waits."""
    run = tiny_run(tmp_path)
    plan = EvalPlan(tokens_per_device=1, max_tokens_per_evaluator=1, gpus_per_member=1,
                    answer_tokens=1, lengths=[], checkpoint_hours=0, stages=[
                        EvalStagePlan(stage="s192", gpus=1, when="beside training",
                                      nodes=["n7"])])
    scheduler = EvalScheduler(run, tmp_path, plan=plan, actors=FakeActors(),
                              training_nodes={"s192": {"n1"}, "s384": {"n7", "n8"}})
    assert scheduler._in_the_way("s192", {"n7", "n8"})
    assert not scheduler._in_the_way("s192", {"n1"})
    boundary = plan.model_copy(update={"stages": [EvalStagePlan(
        stage="s192", gpus=1, when="at the stage boundary")]})
    assert EvalScheduler(run, tmp_path, plan=boundary)._in_the_way("s192", {"n1"})
    assert not EvalScheduler(run, tmp_path)._in_the_way("s192", {"n1"})


def test_ray_capacity_counts_evaluation_beside_training(plan_8b, monkeypatch):
    """The driver's check asks Ray for training's GPUs plus what the plan evaluates beside it;
    a stage evaluated at its boundary adds nothing (no Ray started: its answer is faked)."""
    import ray

    from ray_jobs.train.driver import PreflightError, check_ray_capacity
    from topology.eval_plan import eval_gpus_beside

    run, plan = plan_8b
    assert eval_gpus_beside(plan.eval, ["65k"]) == 12
    assert eval_gpus_beside(plan.eval, ["524k"]) == 0
    assert eval_gpus_beside(None, ["65k"]) == 0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4096.0, "GPU": 16.0})
    with pytest.raises(PreflightError, match=r"8 gpu workers need 8 GPU plus 12 for evaluation "
                       r"beside training \(plan.json eval.stages; or set eval.gpus 0\) but the "
                       r"Ray cluster has 16"):
        check_ray_capacity(run, 8, "--stage 65k", eval_gpus_beside(plan.eval, ["65k"]))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4096.0, "GPU": 20.0})
    check_ray_capacity(run, 8, "--stage 65k", eval_gpus_beside(plan.eval, ["65k"]))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4096.0, "GPU": 512.0})
    check_ray_capacity(run, 512, "--stage 524k", eval_gpus_beside(plan.eval, ["524k"]))


def test_scheduler_reads_where_to_evaluate_from_plan_json(tmp_path, plan_8b):
    from ray_jobs.eval.scheduler import read_eval_plan

    _, plan = plan_8b
    assert read_eval_plan(tmp_path) == (None, {})  # no cluster plan: evaluated anywhere
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    ev, training = read_eval_plan(tmp_path)
    assert ev.stage("524k").when == "at the stage boundary"
    assert training["65k"] == {w.node for w in plan.stage("65k").workers}
    (tmp_path / "plan.json").write_text('{"run": 1}')
    with pytest.raises(ValueError, match=r"plan.json: not a plan ringpilot can read .*; delete "
                       "it and restart the driver"):
        read_eval_plan(tmp_path)


def test_standalone_evaluation_loads_in_the_given_compute_dtype(tmp_path, monkeypatch):
    """`python -m ray_jobs.evaluate` loads as the driver's evaluators do: --dtype (bf16 by
    default, the dtype GPU runs compute in) goes to load_checkpoint, which keeps fp32 on CPU."""
    from ray_jobs.eval import cli

    class Loaded(Exception):
        pass

    def fake_load(path, device, dtype="float32"):
        raise Loaded(device, dtype)

    monkeypatch.setattr(cli, "load_checkpoint", fake_load)
    path = fixtures.save_checkpoint(fixtures.build_tiny_model(1000),
                                    fixtures.build_tokenizer(1000), tmp_path / "ckpt")
    for argv, expected in (([], ("cpu", "bfloat16")),
                           (["--device", "cuda", "--dtype", "float32"], ("cuda", "float32"))):
        with pytest.raises(Loaded) as got:
            cli.main(["--checkpoint", str(path), "--lengths", "128", *argv])
        assert got.value.args == expected
