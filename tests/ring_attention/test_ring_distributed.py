"""Multi-process gloo checks: ring attention and a tiny Llama against single-process references."""

import pytest
import torch
from ring_worlds import (
    ATTENTION_CASES,
    attention_world,
    large_result_world,
    plan_groups_world,
    ring_and_llama_world,
    two_models_world,
)

from tests.support.worlds import run_world

pytestmark = pytest.mark.multiprocess


def test_ring_attention_two_ranks():
    results = run_world(2, attention_world, ATTENTION_CASES)
    assert len(results) == 2 and all(len(r) == len(ATTENTION_CASES) for r in results)


def test_ring_attention_and_tiny_llama_three_ranks():
    world = 3
    results = run_world(world, ring_and_llama_world, ATTENTION_CASES)
    assert all(len(r["attention"]) == len(ATTENTION_CASES) for r in results)
    losses = {round(r["llama"]["loss"], 6) for r in results}
    assert len(losses) == 1, f"every ring rank must report the same global loss, got {losses}"


def test_ring_attention_four_ranks():
    # Half the cases: every dtype, mask and head layout still appears once.
    cases = [c for c in ATTENTION_CASES if (c["heads"] == c["kv_heads"]) == c["causal"]]
    results = run_world(4, attention_world, cases)
    assert len(results) == 4


def test_two_rings_of_two_from_a_plan():
    # Ring order differs from the global numbering on purpose: ring 0 runs 3 -> 0 -> 3.
    rings = [[3, 0], [1, 2]]
    cases = [c for c in ATTENTION_CASES
             if c["heads"] != c["kv_heads"] or c["dtype"] == torch.float32]
    results = run_world(4, plan_groups_world, rings, cases)
    assert [(r["dp_rank"], r["ring_rank"]) for r in results] == [(0, 1), (1, 0), (1, 1), (0, 0)]


def test_two_models_with_different_rings_in_one_process():
    # Each model carries its own ring: A's attention runs around both ranks while B's, in the
    # same processes and the same backward, runs on each rank alone.
    results = run_world(2, two_models_world)
    assert all(set(r) == {"a", "b"} for r in results)


@pytest.mark.timeout(120)
def test_results_larger_than_a_pipe_come_back():
    # Joining the ranks before reading their results deadlocked here: a rank blocks in put()
    # until its 4 MiB result is read.
    results = run_world(2, large_result_world)
    assert [len(r) for r in results] == [(4 << 20) + 1] * 2 and [r[0] for r in results] == [0, 1]
