"""parallelize(): FSDP2 x ring x data parallel on one device mesh trains exactly like one
process, with activation checkpointing and the chunked loss, and resumes across meshes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_jobs.parallelize import chunked_cross_entropy
from specs.degrees import ParallelDims
from tests.support.worlds import run_world
from tests.train import parallel_worlds as worlds

pytestmark = pytest.mark.multiprocess
STEPS = 3


def _close(got: dict, want: dict, what: str, atol: float) -> None:
    assert sorted(got) == sorted(want), what
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=1e-4,
                                   err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def references():
    return {dp: worlds.reference(dp, STEPS) for dp in (1, 2)}


@pytest.mark.parametrize("world,ring,dp,shard,ac", [
    (2, 2, 1, 2, True),    # one ring of 2, sharded over it (the tiny default's layout)
    (2, 1, 2, 2, False),   # plain FSDP over two data-parallel ranks, no ring
    (4, 2, 2, 2, True),    # two rings, each its own shard group: HSDP, 2 replicas
    (4, 2, 2, 4, False),   # two rings, one shard group over all four
    (4, 4, 1, 4, True),    # one ring of 4
])
def test_layout_trains_like_one_process(references, world, ring, dp, shard, ac):
    results = run_world(world, worlds.train_layout, ring, dp, shard, ac, STEPS, timeout_s=180)
    want = references[dp]
    for rank, got in enumerate(results):
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5,
                                   err_msg=f"rank {rank} losses")
        np.testing.assert_allclose(got["norms"], want["norms"], rtol=1e-4,
                                   err_msg=f"rank {rank} gradient norms (before clipping)")
        _close(got["grads"], want["grads"], f"rank {rank} first-step gradients", atol=1e-6)
        _close(got["params"], want["params"], f"rank {rank} weights after {STEPS} steps",
               atol=5e-5)


def test_activation_checkpointing_keeps_gradients():
    on, off = run_world(2, worlds.gradients_with_and_without_checkpointing, timeout_s=180)[0]
    _close(on, off, "checkpointed vs not", atol=1e-7)


def test_resume_from_2_ranks_to_4_and_back(tmp_path):
    """torch.distributed.checkpoint: saved by one mesh, loaded by another, bit for bit."""
    two = run_world(2, worlds.save_after_steps, 2, 1, 2, str(tmp_path / "a"), 2)[0]
    four = run_world(4, worlds.load_checkpoint, 2, 2, 4, str(tmp_path / "a"))[0]
    _close(four, two, "2 ranks -> 4 ranks", atol=0)
    saved = run_world(4, worlds.save_after_steps, 2, 2, 4, str(tmp_path / "b"), 1)[0]
    back = run_world(2, worlds.load_checkpoint, 2, 1, 2, str(tmp_path / "b"))[0]
    _close(back, saved, "4 ranks -> 2 ranks", atol=0)
    assert any(k.startswith("optim/") and k.endswith("/exp_avg") for k in two)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_equals_the_full_logits_loss(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 12))
    labels[0, :3] = -100
    got = chunked_cross_entropy(hidden, weight, labels, chunk)
    got.backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(),
                           ignore_index=-100, reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_h, hidden.grad)
    torch.testing.assert_close(g_w, weight.grad)


@pytest.mark.parametrize("ring,dp,shard,message", [
    (2, 2, 3, r"shard_degree \(3\) must be a multiple of ring_degree \(2\)"),
    (2, 3, 4, r"must be ring_degree \(2\) times a divisor of data_parallel_degree \(3\)"),
])
def test_degrees_that_cannot_form_a_mesh_are_refused(ring, dp, shard, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims.of(ring, dp, shard)


def test_degrees_name_their_groups():
    dims = ParallelDims.of(ring=2, dp=4, shard=4)
    assert (dims.dp_replicate, dims.dp_shard, dims.ring, dims.world) == (2, 2, 2, 8)
    assert dims.rings_grid([[0, 1], [2, 3], [4, 5], [6, 7]]) == [[[0, 1], [2, 3]],
                                                                 [[4, 5], [6, 7]]]
    assert dims.problems(seq_len=102, batch_size=6) == [
        "seq_len (102) must be divisible by 2 x ring_degree (4) for zigzag sharding; use 104 "
        "or another ring_degree",
        "batch_size (6) must be a multiple of data_parallel_degree (4); use batch_size 8"]


def test_rings_that_do_not_match_the_degrees_are_refused():
    dims = ParallelDims.of(ring=2, dp=2, shard=2)
    with pytest.raises(ValueError, match=r"the plan has 2 rings of sizes \[1, 3\], the degrees "
                                         r"say 2 rings of 2"):
        dims.rings_grid([[0, 1, 2], [3]])
