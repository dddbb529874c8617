"""Layered sequence parallelism (Ulysses x ring) against full SDPA on gloo: outputs and all
gradients, causal and not, GQA split and replicated, a tiny Llama; bad layouts refused."""

from __future__ import annotations

import pytest
import torch
import ulysses_worlds as worlds

from ray_jobs.ring_attention.ulysses import kv_replication, sequence_shard, ulysses_problems
from tests.support.worlds import run_world

pytestmark = pytest.mark.multiprocess


def _cases(heads_kv, dtypes=(torch.float32,), head_dims=(64,), batch=2):
    return [dict(dtype=dt, causal=c, heads=h, kv_heads=hk, head_dim=d, batch=batch)
            for dt in dtypes for c in (True, False) for h, hk in heads_kv for d in head_dims]


@pytest.mark.parametrize("ulysses,ring,cases", [
    # GQA 4:1 split (8 heads, 2 K/V heads over 2), head dims 64 and 128, fp32 and bf16
    (2, 1, _cases([(8, 2)], (torch.float32, torch.bfloat16), (64, 128))),
    (1, 2, _cases([(8, 2)], (torch.float32, torch.bfloat16))),
    (2, 2, _cases([(8, 2), (16, 2)], (torch.float32, torch.bfloat16))),  # 4:1 and 8:1
    # Ulysses 4 over 2 K/V heads: each replicated twice; 8 heads over 8 too
    (4, 1, _cases([(8, 2), (16, 2), (8, 8)])),
    (2, 3, _cases([(8, 2)], batch=1)),  # an odd ring
], ids=["u2r1", "u1r2", "u2r2", "u4r1", "u2r3"])
def test_hybrid_equals_full_attention(ulysses, ring, cases):
    results = run_world(ulysses * ring, worlds.check_cases, ulysses, ring, cases, timeout_s=240)
    assert len(results) == ulysses * ring  # assert_close ran on every rank, every case


@pytest.mark.parametrize("ranks", [[0, 1, 3, 2], [1, 0, 2, 3]])
def test_groups_listed_out_of_rank_order_stay_exact(ranks):
    """A plan may list a Ulysses group's GPUs in any order; the ring joins the same index of
    each group, so head blocks must follow the listed order, not the process group's."""
    cases = _cases([(8, 2)])
    results = run_world(4, worlds.check_cases, 2, 2, cases, 4, ranks, timeout_s=240)
    assert len(results) == 4


def test_tiny_llama_loss_and_gradients_equal_unsharded():
    got = run_world(4, worlds.tiny_llama_loss_and_grads, 2, 2, timeout_s=240)
    for rank in got:
        assert rank["loss"] == pytest.approx(rank["ref_loss"], rel=1e-5)
        assert rank["grad_rel_err"] < 1e-4


def test_mismatched_layouts_fail_on_every_rank_without_hanging():
    errors = run_world(2, worlds.mismatched_layouts, timeout_s=60)
    for err in errors:
        assert err is not None and "hold different layouts" in err
        assert "local_seq 8" in err and "local_seq 12" in err


def test_degrees_that_do_not_fit_the_heads_are_refused_before_any_collective():
    assert ulysses_problems(32, 8, 4) == [] and ulysses_problems(32, 8, 16) == []
    (heads,) = ulysses_problems(12, 4, 8)
    assert heads.startswith("ulysses_degree (8) must divide the 12 query heads")
    (kv,) = ulysses_problems(24, 8, 6)
    assert "must divide the 8 key/value heads or be a multiple of them" in kv
    assert kv_replication(8, 4) == 1 and kv_replication(2, 8) == 4


def test_shards_cover_the_sequence_once():
    seq, ring, uly = 48, 3, 2
    pieces = [sequence_shard(torch.arange(seq), 0, r, ring, u, uly)
              for r in range(ring) for u in range(uly)]
    assert sorted(torch.cat(pieces).tolist()) == list(range(seq))
    assert all(p.numel() == seq // (ring * uly) for p in pieces)


def test_bad_shapes_are_refused_before_any_collective():
    """No process group exists here: an error raised after a collective was posted would be a
    different one (or a hang)."""
    from ray_jobs.ring_attention import (
        Ring,
        SequenceMesh,
        build_sequence_mesh,
        sequence_parallel_attention,
    )

    ring = Ring(group=None, ranks=(0, 1))
    x = torch.randn(1, 3, 3, 8)  # 3 local tokens, 3 heads
    with pytest.raises(ValueError, match=r"ulysses 3 x local_seq 3 = 9 tokens\) must be even"):
        sequence_parallel_attention(x, x, x, mesh=SequenceMesh(None, 3, ring))
    with pytest.raises(ValueError, match=r"ulysses_degree \(2\) must divide the 3 query heads"):
        sequence_parallel_attention(x, x[:, :, :1], x[:, :, :1], mesh=SequenceMesh(None, 2, ring))
    with pytest.raises(ValueError, match=r"needs 6 ranks, got 4"):
        build_sequence_mesh(2, 3, ranks=[0, 1, 2, 3])
