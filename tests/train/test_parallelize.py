"""parallelize(): FSDP2 x ring x data parallel on one device mesh trains exactly like one
process, with activation checkpointing and the chunked loss, and resumes across meshes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_jobs.train.parallelize import chunked_cross_entropy
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


@pytest.mark.parametrize("world,ring,dp,shard,ac,ulysses", [
    (2, 2, 1, 2, "full", 1),       # one ring of 2, sharded over it (the tiny default's layout)
    (2, 1, 2, 2, "none", 1),       # plain FSDP over two data-parallel ranks, no ring
    (4, 2, 2, 2, "attention", 1),  # two rings, each its own shard group: HSDP, 2 replicas
    (4, 2, 2, 4, "none", 1),       # two rings, one shard group over all four
    (4, 4, 1, 4, "attention", 1),  # one ring of 4, its output kept through checkpointing
    (2, 1, 1, 2, "full", 2),       # pure Ulysses: two ranks split the heads of one sequence
    (4, 2, 1, 4, "attention", 2),  # Ulysses 2 x ring 2, one sequence over four ranks
    (4, 1, 2, 2, "none", 2),       # two Ulysses groups as HSDP replicas
])
def test_layout_trains_like_one_process(references, world, ring, dp, shard, ac, ulysses):
    results = run_world(world, worlds.train_layout, ring, dp, shard, ac, STEPS, ulysses,
                        timeout_s=180)
    want = references[dp]
    for rank, got in enumerate(results):
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5,
                                   err_msg=f"rank {rank} losses")
        np.testing.assert_allclose(got["norms"], want["norms"], rtol=1e-4,
                                   err_msg=f"rank {rank} gradient norms (before clipping)")
        _close(got["grads"], want["grads"], f"rank {rank} first-step gradients", atol=1e-6)
        _close(got["params"], want["params"], f"rank {rank} weights after {STEPS} steps",
               atol=5e-5)


@pytest.mark.parametrize("world,ring,ulysses,kv_heads", [
    (2, 2, 1, 2),  # a ring of 2
    (4, 4, 1, 1),  # a ring of 4, GQA 4:1
    (4, 2, 2, 1),  # Ulysses 2 x ring 2, GQA 4:1 (its K/V head replicated over Ulysses)
])
def test_checkpointing_policies_keep_gradients_and_attention_halves_the_rings_forwards(
        world, ring, ulysses, kv_heads):
    """`attention` and `none` give `full`'s gradients; `full` runs the ring forward twice (the
    forward and the recomputation), `attention` once, and both run its backward once."""
    got = run_world(world, worlds.gradients_under_each_policy, ring, ulysses, kv_heads,
                    timeout_s=240)
    for rank, policies in enumerate(got):
        full, full_exchanges = policies["full"]
        for policy in ("attention", "none"):
            _close(policies[policy][0], full, f"rank {rank}: {policy} vs full", atol=1e-7)
        passes = (ring - 1) * 2  # exchanges of one pass around the ring, 2 layers
        # forward K/V (tag 1): the forward and its recomputation under full, the forward alone
        # under attention (and none); backward K/V (3) and dK/dV (2): once under every policy
        assert full_exchanges == {1: 2 * passes, 2: passes, 3: passes}, full_exchanges
        for policy in ("attention", "none"):
            assert policies[policy][1] == {1: passes, 2: passes, 3: passes}, policy


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
    assert dims.rings_grid([[0, 1], [2, 3], [4, 5], [6, 7]]) == [
        [[[0], [1]], [[2], [3]]], [[[4], [5]], [[6], [7]]]]  # (replica, slot, ring, ulysses)
    assert dims.problems(seq_len=102, batch_size=6) == [
        "seq_len (102) must be divisible by 2 x ring_degree (4) for zigzag sharding; use 104 "
        "or another ring_degree",
        "batch_size (6) must be a multiple of data_parallel_degree (4); use batch_size 8"]


def test_rings_that_do_not_match_the_degrees_are_refused():
    dims = ParallelDims.of(ring=2, dp=2, shard=2)
    with pytest.raises(ValueError, match=r"the plan has 2 rings of sizes \[1, 3\], the degrees "
                                         r"say 2 rings of 2"):
        dims.rings_grid([[0, 1, 2], [3]])


def test_ulysses_degrees_name_their_groups():
    dims = ParallelDims.of(ring=2, dp=2, shard=4, ulysses=2)
    assert (dims.dp_replicate, dims.dp_shard, dims.sequence, dims.world) == (2, 1, 4, 8)
    assert dims.rings_grid([[0, 1, 2, 3], [4, 5, 6, 7]]) == [[[[0, 1], [2, 3]]],
                                                             [[[4, 5], [6, 7]]]]
    assert dims.describe() == "ring 2 x ulysses 2 x dp 2, shard 4, 2 replicas (HSDP)"
    assert dims.problems(seq_len=36, batch_size=2, heads=6, kv_heads=2) == [
        "seq_len (36) must be divisible by 2 x ring_degree x ulysses_degree (8) for zigzag "
        "sharding and the Ulysses split; use 40 or other degrees"]
    with pytest.raises(ValueError, match=r"shard_degree \(2\) must be a multiple of "
                                         r"ring_degree x ulysses_degree \(2 x 2 = 4\)"):
        ParallelDims.of(ring=2, dp=2, shard=2, ulysses=2)


@pytest.mark.parametrize("accum", [3])
def test_accumulation_all_reduces_across_replicas_once_per_step(accum):
    """HSDP: the replicas' all-reduce runs once per optimizer step, not once per micro-step,
    and the accumulated gradients are the same."""
    once = run_world(2, worlds.gradient_all_reduces, accum, False, timeout_s=120)
    every = run_world(2, worlds.gradient_all_reduces, accum, True, timeout_s=120)
    for rank in range(2):
        assert every[rank]["replica_all_reduces"] > 0  # the counter sees FSDP's all-reduces
        per_micro = every[rank]["replica_all_reduces"] // accum
        assert once[rank]["replica_all_reduces"] == per_micro, "all-reduced in every micro-step"
        _close(once[rank]["grads"], every[rank]["grads"], f"rank {rank} gradients", atol=1e-6)


def test_mixed_precision_step_moves_every_weight_a_float32_step_moves():
    """The run's precision policy at the published learning rate (2e-5): weights stored in the
    RunSpec's default dtype, layers computing in bf16 as on GPUs. AdamW's first step moves a
    weight by about lr wherever its gradient is clear of eps; every such weight must move (bf16
    storage drops updates below 1/256 of a weight), and they are the weights a float32 step
    moves, but for the few whose gradient bf16 compute rounds to nearly nothing."""
    from specs.run import RunSpec
    from tests.train.conftest import mini_spec

    lr = 2e-5
    spec = mini_spec("/tmp/unused")
    del spec["model"]["dtype"]  # the default
    spec["resources"]["device"] = "gpu"  # mixed_precision auto: bf16 layers
    run = RunSpec.model_validate(spec)
    assert run.compute_dtype == "bfloat16"
    policy = run_world(1, worlds.step_changes, run.model.dtype, run.compute_dtype, lr)[0]
    fp32 = run_world(1, worlds.step_changes, "float32", None, lr)[0]
    clear_total = lost_to_compute = 0
    for name, step in policy.items():
        clear = np.abs(step["grad"]) >= 1e-6
        stuck = int((clear & (step["moved"] == 0)).sum())
        assert stuck == 0, f"{name}: {stuck} of {int(clear.sum())} updates lost"
        moved_fp32 = fp32[name]["moved"] >= lr / 2
        lost_to_compute += int((moved_fp32 & (step["moved"] == 0)).sum())
        clear_total += int(moved_fp32.sum())
    assert clear_total > 0.8 * sum(s["moved"].size for s in fp32.values())
    assert lost_to_compute <= 1e-3 * clear_total, lost_to_compute


def test_checkpoint_loads_optimizer_state_by_shard_onto_the_ranks_device(tmp_path):
    """The trainer's own save/load: optimizer state comes back through DCP into this rank's
    shards (on its device), and what torch.load reads goes to the CPU, never to the device it
    was saved from."""
    got = run_world(1, worlds.checkpoint_round_trip, str(tmp_path), timeout_s=120)[0]
    assert got["weights_equal"] and got["state_entries"] > 0 and got["scheduler_step"] == 1
    assert got["state_devices"] == ["cpu"]
    assert got["loads"] == ["cpu"]  # the scheduler's state


@pytest.mark.parametrize("world,ring,dp,ulysses,ac,per_document,balanced", [
    (2, 2, 1, 1, "full", False, False),     # a ring of 2, positions along the sequence
    (2, 2, 1, 1, "attention", True, True),  # RoPE restarting at each document, sharded per
    #                                         document (the trainer's way on a ring)
    (2, 1, 2, 1, "none", True, False),      # rings of one (no sequence split): still masked
    (4, 2, 1, 2, "full", True, True),       # Ulysses 2 x ring 2, sharded per document
])
def test_document_attention_trains_like_documents_run_one_by_one(world, ring, dp, ulysses, ac,
                                                                 per_document, balanced):
    """attention: document on a layout: rows with different document layouts (documents
    crossing rank boundaries, one longer than a shard, tiny ones, one filling the row) give the
    loss and gradients of each document run alone through one unsharded model; sharded per
    document too, each row read at its own positions."""
    rows = 4 // dp  # the batch holds every layout of parallel_worlds.DOC_LAYOUTS
    results = run_world(world, worlds.train_documents, ring, dp, ulysses, ac, per_document,
                        rows, balanced, timeout_s=180)
    want = worlds.documents_reference(dp * rows, per_document)
    _, _, starts = worlds.document_batch(dp * rows)
    for rank, got in enumerate(results):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5,
                                   err_msg=f"rank {rank} loss")
        _close(got["grads"], want["grads"], f"rank {rank} gradients", atol=1e-6)
        # RoPE got the row's positions (from 0 at each document, or along it) at this rank's
        # shard: with document masking the loss is the same either way up to rounding
        whole = [worlds.document_positions(starts[r], per_document) for r in got["rows"]]
        assert got["rope_positions"] == [[int(w[p]) for p in shard]
                                         for w, shard in zip(whole, got["shards"])]
        assert got["permuted"] == balanced, "no row's layout was permuted: nothing balanced"


def test_one_document_per_row_is_the_causal_ring_bit_for_bit():
    """attention: document on rows that are each one document changes nothing: the same loss
    and gradients, bit for bit, as causal attention (the default path, no doc_starts)."""
    for rank, got in enumerate(run_world(2, worlds.one_document_against_causal, 2,
                                         timeout_s=120)):
        (loss_c, grads_c), (loss_d, grads_d) = got["causal"], got["document"]
        assert loss_d == loss_c, rank
        assert sorted(grads_d) == sorted(grads_c)
        for name in grads_c:
            np.testing.assert_array_equal(grads_d[name], grads_c[name],
                                          err_msg=f"rank {rank} document vs causal: {name}")
