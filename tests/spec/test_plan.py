"""StagePlan carries one ParallelDims; plan.json keeps the degree keys it always had."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from specs.degrees import ParallelDims
from specs.plan import Plan, StagePlan

# A stage of a plan.json written before StagePlan held a ParallelDims (null shard_degree: the
# ring's GPUs shard the model), and one of a plan older still, without ulysses_degree.
OLD_STAGES = [
    {"name": "s64", "seq_len": 64, "rope_theta": 10000.0, "ring_degree": 2, "dp_degree": 2,
     "shard_degree": None, "ulysses_degree": 1,
     "rings": [[{"node": "a", "gpu": 0}, {"node": "a", "gpu": 1}],
               [{"node": "b", "gpu": 0}, {"node": "b", "gpu": 1}]],
     "bottleneck_links": [], "prediction": None, "alternatives": [], "notes": []},
    {"name": "s128", "seq_len": 128, "rope_theta": 20000.0, "ring_degree": 1, "dp_degree": 2,
     "shard_degree": 2,
     "rings": [[{"node": "a", "gpu": 0}, {"node": "a", "gpu": 1}],
               [{"node": "b", "gpu": 0}, {"node": "b", "gpu": 1}]]},
]
OLD_PLAN = {"run": "mini", "cluster": None, "profile": None, "stages": OLD_STAGES}


def test_an_old_plan_json_loads_into_parallel_dims():
    plan = Plan.model_validate_json(json.dumps(OLD_PLAN))
    assert plan.stage("s64").dims == ParallelDims(dp_replicate=2, ring=2)
    assert plan.stage("s128").dims == ParallelDims(dp_shard=2, ring=1)  # one shard group of 2


def test_dumping_writes_the_degree_keys_in_their_old_place():
    stage = StagePlan.model_validate(OLD_STAGES[0])
    doc = json.loads(stage.model_dump_json())
    assert list(doc)[:8] == ["name", "seq_len", "rope_theta", "ring_degree", "dp_degree",
                             "shard_degree", "ulysses_degree", "rings"]
    assert "dims" not in doc
    assert (doc["ring_degree"], doc["dp_degree"], doc["shard_degree"],
            doc["ulysses_degree"]) == (2, 2, 2, 1)
    assert stage.model_dump() == doc  # python and JSON dumps agree
    again = StagePlan.model_validate_json(stage.model_dump_json())
    assert again == stage and again.dims is not stage.dims


def test_a_hybrid_layout_round_trips_exactly():
    dims = ParallelDims(dp_replicate=2, dp_shard=2, ring=2, ulysses=2)
    rings = [[{"node": f"n{i}", "gpu": g} for g in range(4)] for i in range(4)]
    stage = StagePlan(name="s", seq_len=64, rope_theta=1.0, dims=dims, rings=rings)
    doc = json.loads(stage.model_dump_json())
    assert (doc["ring_degree"], doc["dp_degree"], doc["shard_degree"],
            doc["ulysses_degree"]) == (2, 4, 8, 2)
    assert StagePlan.model_validate(doc).dims == dims


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("dp_degree"), r"dp_degree missing: a stage plan gives ring_degree and "
                                   r"dp_degree"),
    (lambda d: d.update(shard_degree=3), r"shard_degree \(3\) must be a multiple of "
                                         r"ring_degree \(2\)"),
    (lambda d: d.update(ring_degree=0), r"ring_degree \(0\).* must be a whole number of GPUs"),
])
def test_bad_degrees_name_the_field(change, message):
    doc = json.loads(json.dumps(OLD_STAGES[0]))
    change(doc)
    with pytest.raises(ValidationError, match=message):
        StagePlan.model_validate(doc)


def test_plans_record_each_stages_attention_and_old_plans_read_causal():
    """plan.json carries stages[].attention and position_ids as the RunSpec sets them; a plan
    written before they existed reads today's behaviour (causal, continuous)."""
    from specs.run import RunSpec
    from tests.spec.test_runspec import run_with
    from topology.run_plan import plan_from_workers

    old = Plan.model_validate_json(json.dumps(OLD_PLAN)).stage("s64")
    assert (old.attention, old.position_ids) == ("causal", "continuous")
    run = RunSpec.model_validate(run_with(**{"stages.2.attention": "document",
                                             "stages.2.position_ids": "per_document"}))
    plan = plan_from_workers({"local": 2}, run)
    doc = json.loads(plan.model_dump_json())
    assert [(s["name"], s["attention"], s["position_ids"]) for s in doc["stages"]] == [
        ("s64", "causal", "continuous"), ("s256", "causal", "continuous"),
        ("s1k", "document", "per_document"), ("s4k", "causal", "continuous")]
    assert Plan.model_validate(doc).stage("s1k").attention == "document"
    with pytest.raises(ValidationError, match=r"attention\n  Input should be 'causal' or "
                                              r"'document'"):
        StagePlan.model_validate({**OLD_STAGES[0], "attention": "full"})
