"""Sequence-parallel inference (ring prefill, sharded KV cache, log-sum-exp merged decoding)
against one process running the same model with SDPA and HF's KV cache."""

from __future__ import annotations

import pytest
import torch
from inference_worlds import single_process  # tests/ring_attention is on sys.path (conftest)

from tests.support.worlds import run_world


@pytest.mark.parametrize("world,length", [(2, 1024), (3, 1031), (2, 1027)])
def test_gang_matches_one_process(world, length):
    """Prefill logits within float tolerance and identical greedy tokens, for prompts that split
    evenly (1024 over 2 ranks) and that leave a remainder for the decoding path (1031 over 3
    ranks leaves 5 tokens, 1027 over 2 leaves 3)."""
    new_tokens = 12
    ref_logits, ref_tokens = single_process(length, new_tokens)
    results = run_world(world, _body, length, new_tokens)
    for r in results:
        torch.testing.assert_close(torch.from_numpy(r["logits"]), ref_logits, atol=2e-5, rtol=1e-4)
        assert r["tokens"] == ref_tokens
    # The cache stays balanced: prompt + nothing decoded yet, held tokens differ by at most one.
    held = results[0]["held"]
    assert sum(held) == length and max(held) - min(held) <= 1
    assert [r["local"] for r in results] == held
    # A session binds its cache to the model only while it runs it: no prompt's K/V outlive it.
    assert [r["caches_left"] for r in results] == [0] * world


def _body(rank, world, length, new_tokens, rope=None):
    from inference_worlds import gang_body

    return gang_body(rank, world, length, new_tokens, rope)


def test_gang_with_a_length_dependent_rope_matches_one_process():
    """Dynamic NTK: one process rotates the prompt by the frequencies of its length and each
    decoded token by those of its position + 1; every rank of the gang does the same, though
    it holds only its own positions (the largest differs from rank to rank)."""
    from inference_worlds import DYNAMIC

    length, new_tokens = 1027, 6
    ref_logits, ref_tokens = single_process(length, new_tokens, DYNAMIC)
    plain_logits, _ = single_process(length, 0)
    # the rule changes the output (by 0.004 here, 200x the tolerance below)
    assert (ref_logits - plain_logits).abs().max() > 1e-3
    for r in run_world(2, _body, length, new_tokens, DYNAMIC):
        torch.testing.assert_close(torch.from_numpy(r["logits"]), ref_logits, atol=2e-5, rtol=1e-4)
        assert r["tokens"] == ref_tokens


def test_prompt_shorter_than_two_chunks_per_rank_is_refused():
    from ray_jobs.ring_attention.inference import PromptTooShort

    with pytest.raises(Exception, match="too short for a gang of 3"):
        run_world(3, _body, 5, 1)
    assert issubclass(PromptTooShort, ValueError)
