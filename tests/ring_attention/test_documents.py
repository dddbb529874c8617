"""Document masking without processes: the block table on hand-made layouts, the pair count,
the masked block kernel against autograd, the merge of rows that see nothing, input errors."""


import pytest
import torch
import torch.nn.functional as F

from ray_jobs.ring_attention import merge_block, ring_attention, zigzag_position_ids
from ray_jobs.ring_attention.documents import (
    check_doc_starts,
    plan_document_block,
    plan_document_table,
    shard_ranges,
)
from ray_jobs.ring_attention.kernels import (
    CpuFlashKernel,
    masked_block_backward,
    masked_block_forward,
)


def _starts(*values):
    return torch.tensor(values, dtype=torch.int64)


# Two ranks, seq 8, chunks of 2: rank 0 holds positions [0, 1, 6, 7], rank 1 [2, 3, 4, 5].
# Step 0 is the diagonal (causal) block; at step 1 rank 0 attends its second half [6, 7] to all
# of rank 1, and rank 1 attends all of its rows to rank 0's first half [0, 1].
@pytest.mark.parametrize("starts,kinds,pairs", [
    # one document: every block is the plain causal one
    ((0,), [["dense", "dense"], ["dense", "dense"]], [10 + 8, 10 + 8]),
    # {0..3} {4..7}: every block mixes the two documents
    ((0, 4), [["masked", "masked"], ["masked", "masked"]], [6 + 4, 6 + 4]),
    # {0, 1} {2..5} {6, 7}: rank 1's diagonal is one document, nothing crosses ranks
    ((0, 2, 6), [["masked", "skip"], ["dense", "skip"]], [6, 10]),
    # every token alone: the diagonals keep only themselves, the rest is skipped
    (tuple(range(8)), [["masked", "skip"], ["masked", "skip"]], [4, 4]),
])
def test_block_table_on_hand_made_layouts(starts, kinds, pairs):
    table = plan_document_table(2, 8, _starts(*starts))
    assert table.kinds == kinds and table.pairs == pairs


def _brute_force_allowed(world, seq, starts):
    """The allowed pairs of every (rank, step) block, from explicit positions and documents."""
    doc = torch.searchsorted(starts, torch.arange(seq), right=True) - 1
    local = seq // world
    allowed = {}
    for rank in range(world):
        for step in range(world):
            src = (rank - step) % world
            block = plan_document_block(rank, src, world, local, starts)
            q_pos = zigzag_position_ids(seq, rank, world)[block.plan.q_rows]
            k_pos = zigzag_position_ids(seq, src, world)[block.plan.kv_rows]
            plain = (k_pos[None, :] <= q_pos[:, None]) if block.plan.causal else torch.ones(
                len(q_pos), len(k_pos), dtype=torch.bool)
            want = plain & (k_pos[None, :] <= q_pos[:, None]) & (
                doc[k_pos][None, :] == doc[q_pos][:, None])
            allowed[rank, step] = (block, plain, want)
    return allowed


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_kinds_masks_and_pair_count_agree_with_brute_force(world):
    gen = torch.Generator().manual_seed(world)
    chunk = 5
    seq = 2 * world * chunk
    layouts = [_starts(0), torch.arange(seq), _starts(0, 1, seq - 1)]
    for _ in range(6):
        inner = torch.randperm(seq - 1, generator=gen)[:int(torch.randint(1, seq // 2, (1,),
                                                                           generator=gen))] + 1
        layouts.append(torch.cat([_starts(0), inner.sort().values]))
    for starts in layouts:
        table = plan_document_table(world, seq, starts)
        lengths = torch.diff(torch.cat([starts, _starts(seq)]))
        assert sum(table.pairs) == int((lengths * (lengths + 1) // 2).sum()), starts
        covered = torch.zeros(seq, seq, dtype=torch.int64)
        for (rank, step), (block, plain, want) in _brute_force_allowed(world, seq, starts).items():
            assert block.kind == table.kinds[rank][step]
            assert block.pairs == int(want.sum())
            if block.kind == "skip":
                assert not want.any()
            elif block.kind == "dense":
                assert torch.equal(want, plain) and block.mask is None
            else:
                assert torch.equal(block.mask[:], want) and not torch.equal(want, plain)
                assert block.mask.shape == tuple(want.shape)
                assert torch.equal(block.mask[1:3], want[1:3])
            q_pos = zigzag_position_ids(seq, rank, world)[block.plan.q_rows]
            k_pos = zigzag_position_ids(seq, (rank - step) % world, world)[block.plan.kv_rows]
            covered[q_pos[:, None], k_pos[None, :]] += want.long()
        # Every allowed pair of the whole sequence is computed exactly once.
        doc = torch.searchsorted(starts, torch.arange(seq), right=True) - 1
        full = torch.tril(torch.ones(seq, seq, dtype=torch.bool)) & (doc[:, None] == doc[None, :])
        assert torch.equal(covered, full.long())
        assert all(kinds[0] != "skip" for kinds in table.kinds)  # a token always sees itself


def test_shard_ranges_follow_the_zigzag_layout():
    # world 3, local 4: rank 1 holds chunks 1 and 4 of 6 (chunk length 2)
    assert shard_ranges(1, 3, 4, slice(None)) == [(2, 4), (8, 10)]
    assert shard_ranges(1, 3, 4, slice(0, 2)) == [(2, 4)]
    assert shard_ranges(1, 3, 4, slice(2, None)) == [(8, 10)]


def _reference_masked(q, k, v, mask, scale, dout):
    """fp64 autograd attention under `mask` (rows that see nothing give 0)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    groups = q.shape[2] // k.shape[2]
    kk, vv = (t.repeat_interleave(groups, dim=2) for t in leaves[1:])
    scores = torch.einsum("bqhd,bkhd->bhqk", leaves[0], kk) * scale
    # A finite fill keeps rows without keys out of NaN; the mask product zeroes them.
    probs = torch.softmax(scores.masked_fill(~mask, -1e300), dim=-1) * mask
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vv)
    out.backward(dout.double())
    lse = torch.logsumexp(scores.detach().masked_fill(~mask, float("-inf")), -1)
    return out.detach(), lse.transpose(1, 2), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (2, 2)])
def test_masked_block_matches_autograd_and_leaves_empty_rows_out(dtype, heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    b, sq, sk, d = 2, 6, 5, 16
    q = torch.randn(b, sq, heads, d, generator=gen).to(dtype)
    k, v = (torch.randn(b, sk, kv_heads, d, generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn(b, sq, heads, d, generator=gen).to(dtype)
    mask = torch.rand(sq, sk, generator=gen) < 0.5
    mask[1] = False  # a row that sees no key of this block
    mask[0, 0] = True
    scale = d**-0.5
    out, lse = masked_block_forward(q, k, v, mask, scale)
    ref_out, ref_lse, ref_grads = _reference_masked(q, k, v, mask, scale, dout)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, sq, heads)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert bool((lse[:, 1] == float("-inf")).all()) and bool((out[:, 1] == 0).all())
    # Backward is handed the global out/lse, finite everywhere: here the block is the whole key
    # set except for rows without keys, which get the lse of some other block.
    glob_lse = lse.clone().nan_to_num(neginf=0.0)
    grads = masked_block_backward(dout, q, k, v, out, glob_lse, mask, scale)
    for got, want, like in zip(grads, ref_grads, (q, k, v)):
        assert got.dtype == dtype and got.shape == like.shape
        torch.testing.assert_close(got.double(), want, **tol)


def test_masked_block_with_a_full_mask_equals_the_flash_kernel():
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(1, 8, h, 16, generator=gen) for h in (4, 2, 2, 4))
    mask = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    out, lse = masked_block_forward(q, k, v, mask, 0.25)
    want_out, want_lse = CpuFlashKernel().forward(q, k, v, True, 0.25)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-5)
    got = masked_block_backward(dout, q, k, v, out, lse, mask, 0.25)
    want = CpuFlashKernel().backward(dout, q, k, v, want_out, want_lse, True, 0.25)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_merge_block_folds_rows_that_see_nothing_without_nan():
    out, lse = torch.full((1, 3, 1, 2), 2.0), torch.tensor([[[0.5], [float("-inf")], [1.0]]])
    block = torch.tensor([[[[7.0, 7.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
    block_lse = torch.tensor([[[0.5], [float("-inf")], [float("-inf")]]])
    merge_block(out, lse, block, block_lse, empty_rows=True)
    assert not out.isnan().any() and not lse.isnan().any()
    # row 0 merges normally; rows 1 and 2 saw nothing in the block and keep what they had
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[4.5, 4.5], [2.0, 2.0], [2.0, 2.0]]))
    assert lse[0, 1, 0] == float("-inf") and lse[0, 2, 0] == 1.0


def test_doc_starts_errors_name_the_argument_and_the_fix():
    for bad, why in ((_starts(1, 4), "does not start at 0"),
                     (_starts(0, 4, 4), "not strictly increasing"),
                     (_starts(0, 8), "last start 8 is not below the sequence length 8"),
                     (torch.tensor([0.0, 2.0]), "dtype torch.float32"),
                     (_starts(0, 2).reshape(1, 2), r"shape \(1, 2\)"),
                     ([0, 2], "got list")):
        with pytest.raises(ValueError, match=r"doc_starts must be a 1-D integer tensor.*" + why):
            check_doc_starts(bad, 8)
    assert check_doc_starts(torch.tensor([0, 3], dtype=torch.int32), 8).dtype == torch.int64
    with pytest.raises(ValueError, match=r"seq_len \(10\) must be a positive multiple of 2 \* "):
        plan_document_table(2, 10, _starts(0))


def test_ring_attention_refuses_documents_without_causal_or_beyond_the_sequence(world_of_one):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"doc_starts .* needs causal=True"):
        ring_attention(q, q, q, group=None, causal=False, doc_starts=_starts(0, 4))
    with pytest.raises(ValueError, match=r"last start 9 is not below the sequence length 8"):
        ring_attention(q, q, q, group=None, doc_starts=_starts(0, 9))


def test_one_rank_ring_with_documents_equals_attention_per_document(world_of_one):
    gen = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(2, 16, h, 16, generator=gen) for h in (4, 1, 1, 4))
    starts = _starts(0, 3, 4, 11)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, group=None, doc_starts=starts)
    out.backward(dout)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    bounds = [*starts.tolist(), 16]
    want = torch.cat([
        F.scaled_dot_product_attention(*(t[:, a:b].transpose(1, 2) for t in ref), is_causal=True,
                                       enable_gqa=True).transpose(1, 2)
        for a, b in zip(bounds, bounds[1:])], dim=1)
    want.backward(dout)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    for got, r in zip(leaves, ref):
        torch.testing.assert_close(got.grad, r.grad, atol=2e-5, rtol=1e-4)


def test_the_distributed_layouts_exercise_every_block_kind():
    # document_worlds' layouts are what test_ring_documents_distributed runs; each ring size
    # must meet skipped, dense and masked blocks, and dense off-diagonal ones, or those ring
    # paths would go untested across processes.
    from document_worlds import document_layouts

    for world in (2, 3, 4):
        chunk = 8
        seq = 2 * world * chunk
        kinds = {(kind, step > 0)
                 for starts in document_layouts(seq, 2 * chunk).values()
                 for row in plan_document_table(world, seq, torch.tensor(starts)).kinds
                 for step, kind in enumerate(row)}
        assert {("skip", True), ("dense", True), ("masked", True), ("masked", False),
                ("dense", False)} <= kinds, (world, kinds)


def test_masked_block_in_row_chunks_equals_one_pass(monkeypatch):
    from ray_jobs.ring_attention import kernels

    gen = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, n, h, 16, generator=gen)
                     for n, h in ((11, 4), (9, 2), (9, 2), (11, 4)))
    mask = torch.rand(11, 9, generator=gen) < 0.6
    mask[:, 0] = True
    whole = masked_block_forward(q, k, v, mask, 0.25)
    whole_grads = masked_block_backward(dout, q, k, v, *whole, mask, 0.25)
    monkeypatch.setattr(kernels, "_MASKED_CHUNK_BYTES", 4 * 2 * 4 * 9 * 3)  # 3 rows a chunk
    assert len(kernels._masked_row_chunks(q, 9)) == 4
    chunked = masked_block_forward(q, k, v, mask, 0.25)
    chunked_grads = masked_block_backward(dout, q, k, v, *chunked, mask, 0.25)
    for got, want in zip((*chunked, *chunked_grads), (*whole, *whole_grads)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_a_samples_plan_is_built_once_for_all_layers():
    """Every layer of a forward asks for the same plan: the second ask is the first answer."""
    from ray_jobs.ring_attention.documents import document_steps, plan_document_steps

    starts = torch.tensor([0, 5, 17])
    first = document_steps(1, 4, 8, starts)
    assert document_steps(1, 4, 8, starts.clone()) is first
    assert document_steps(1, 4, 8, torch.tensor([0, 6, 17])) is not first
    assert [b.kind for b in first] == [b.kind for b in plan_document_steps(1, 4, 8, starts)]
