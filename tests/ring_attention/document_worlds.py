"""Per-rank bodies of the document-masking ring tests, run in gloo worlds by tests.support.worlds.

Kept apart from ring_worlds.py so a spawned rank imports only the ring, not the trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ray_jobs.ring_attention import documents as documents_module
from ray_jobs.ring_attention import ring_attention, zigzag_shard, zigzag_unshard
from ray_jobs.ring_attention.documents import balanced_layout

# The tolerances of the plain ring tests (ring_worlds.TOLERANCE), against a reference in the
# same dtype.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
HEADS = {"gqa": (4, 1), "mha": (2, 2)}  # (heads, kv_heads)


def document_layouts(seq: int, local: int) -> dict[str, list[int]]:
    """Document starts that exercise every block kind on a ring whose shards are `local` long
    (zigzag chunks of local / 2)."""
    chunk = local // 2
    return {
        "one": [0],
        # boundaries inside chunks, so documents cross rank boundaries both ways
        "crossing": [0, chunk + 1, 3 * chunk - 1, seq - chunk + 2],
        # a document longer than a whole shard, between two short ones
        "long": [0, 3, 3 + local + chunk + 1],
        "tiny": list(range(0, seq, 3)),
        # lengths from 1 to a whole shard and more, unevenly mixed: what balancing is for
        "mixed": sorted({0, 1, 2, chunk, chunk + 3, 2 * chunk + 1, local + chunk,
                         seq - local // 2, seq - 3} - {seq}),
    }


def reference_by_document(q, k, v, dout, starts):
    """SDPA, causal, document by document on the whole sequence: out and q/k/v gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    bounds = [*starts, q.shape[1]]
    out = torch.cat([
        F.scaled_dot_product_attention(*(t[:, a:b].transpose(1, 2) for t in leaves),
                                       is_causal=True, enable_gqa=True).transpose(1, 2)
        for a, b in zip(bounds, bounds[1:])
    ], dim=1)
    out.backward(dout)
    return out.detach(), *(t.grad for t in leaves)


def check_document_case(rank, world, case, seed, chunk=8, batch=2, head_dim=16):
    """Ring forward/backward with doc_starts on zigzag shards vs the per-document reference;
    with case["balanced"], on shards of the sequence permuted by balanced_layout (the layout
    passed as doc_starts) vs the reference permuted the same way."""
    gen = torch.Generator().manual_seed(seed)
    seq, dtype = 2 * world * chunk, case["dtype"]
    (h, hk), starts = HEADS[case["heads"]], document_layouts(2 * world * chunk, 2 * chunk)[
        case["layout"]]
    q = torch.randn(batch, seq, h, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(batch, seq, hk, head_dim, generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn(batch, seq, h, head_dim, generator=gen).to(dtype)
    ref = reference_by_document(q, k, v, dout, starts)
    documents = torch.tensor(starts)
    shard = lambda t: zigzag_shard(t, 1, rank, world)  # noqa: E731
    whole = lambda t: t  # noqa: E731
    if case.get("balanced"):
        documents = balanced_layout(documents, seq, world)
        shard = lambda t: documents.shard(t, 1, rank, world)  # noqa: E731
        whole = lambda t: documents.unpermute(t, 1)  # noqa: E731
    local = [shard(t).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group=None, doc_starts=documents)
    out.backward(shard(dout))
    errors = {}
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out.detach(), *(t.grad for t in local)),
                               ref):
        want = shard(want)
        assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        torch.testing.assert_close(got, want, **TOLERANCE[dtype],
                                   msg=lambda m: f"{name} {case} rank {rank}: {m}")
        errors[name] = (got.float() - want.float()).abs().max().item()
    torch.testing.assert_close(whole(zigzag_unshard(out.detach(), 1, world, group=None)), ref[0],
                               **TOLERANCE[dtype])
    if dtype != torch.float32:
        # Exactness beyond the tolerance, as the plain ring tests check it: the mean error
        # against fp64 close to the bf16 reference's own.
        exact = reference_by_document(*(t.double() for t in (q, k, v, dout)), starts)
        for name, got, r, e in zip(("out", "dq", "dk", "dv"),
                                   (out.detach(), *(t.grad for t in local)), ref, exact):
            e = shard(e)
            ring_err = (got.double() - e).abs().mean().item()
            ref_err = (shard(r).double() - e).abs().mean().item()
            assert ring_err <= 1.6 * ref_err, (f"{name} {case}: mean err {ring_err:.2e} vs "
                                               f"the reference's {ref_err:.2e}")
            errors[f"{name}_mean_vs_reference"] = ring_err / ref_err
    if case["layout"] == "one":
        check_one_document_is_the_causal_ring(local, out, shard(dout))
    return errors


def check_one_document_is_the_causal_ring(local, out, dout):
    """A single document runs every block dense: bit for bit today's causal ring."""
    plain = [t.detach().clone().requires_grad_() for t in local]
    plain_out = ring_attention(*plain, group=None)
    plain_out.backward(dout)
    assert torch.equal(out.detach(), plain_out.detach()), "out differs from the causal ring"
    for name, doc, base in zip(("dq", "dk", "dv"), local, plain):
        assert torch.equal(doc.grad, base.grad), f"{name} differs from the causal ring"


def _sub_blocks(case) -> None:
    # case["rects"]: masked blocks run as rectangles of the plain kernel whatever they cost
    # (at these sizes the costs choose the masked kernel); the plans are rebuilt
    documents_module.FLASH_CALL_ELEMENTS = -(1 << 40) if case.get("rects") else DEFAULT_CALL
    documents_module._cached_steps.cache_clear()


DEFAULT_CALL = documents_module.FLASH_CALL_ELEMENTS


def document_world(rank, world, cases):
    """Every document case on the default group (ring order = rank order)."""
    errors = []
    for i, case in enumerate(cases):
        _sub_blocks(case)
        errors.append(check_document_case(rank, world, case, seed=i))
    return errors


def ulysses_document_world(rank, world, ulysses, ring, cases, chunk=4):
    """Ulysses x ring with doc_starts on sequence_shard shards vs the per-document reference."""
    from ray_jobs.ring_attention.ulysses import (
        build_sequence_mesh,
        sequence_parallel_attention,
        sequence_shard,
    )

    mesh = build_sequence_mesh(ulysses, ring)
    u, r = mesh.ulysses_rank, mesh.ring.rank
    seq = 2 * ring * ulysses * chunk
    errors = []
    for i, case in enumerate(cases):
        _sub_blocks(case)
        gen = torch.Generator().manual_seed(200 + i)
        dtype, (h, hk) = case["dtype"], HEADS[case["heads"]]
        starts = document_layouts(seq, seq // ring)[case["layout"]]
        q = torch.randn(2, seq, h, 16, generator=gen).to(dtype)
        k, v = (torch.randn(2, seq, hk, 16, generator=gen).to(dtype) for _ in range(2))
        dout = torch.randn(2, seq, h, 16, generator=gen).to(dtype)
        ref = reference_by_document(q, k, v, dout, starts)
        documents = torch.tensor(starts)
        if case.get("balanced"):
            documents = balanced_layout(documents, seq, ring)

        def mine(t):
            if case.get("balanced"):  # the layout's order, then the plain Ulysses x ring shard
                t = t.index_select(1, documents.positions)
            return sequence_shard(t, 1, r, ring, u, ulysses, True)

        local = [mine(t).requires_grad_() for t in (q, k, v)]
        out = sequence_parallel_attention(*local, mesh=mesh, doc_starts=documents)
        out.backward(mine(dout))
        for name, got, want in zip(("out", "dq", "dk", "dv"),
                                   (out.detach(), *(t.grad for t in local)), ref):
            torch.testing.assert_close(got, mine(want), **TOLERANCE[dtype],
                                       msg=lambda m, n=name: f"{n} {case} rank {rank}: {m}")
        errors.append(float((out.detach().float() - mine(ref[0]).float()).abs().max()))
    return errors
