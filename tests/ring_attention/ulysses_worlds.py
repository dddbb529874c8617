"""Per-rank bodies of the layered (Ulysses x ring) sequence-parallel tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_jobs.ring_attention.ulysses import (
    build_sequence_mesh,
    sequence_parallel_attention,
    sequence_shard,
)

TOLERANCE = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _reference(q, k, v, dout, causal):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=True).transpose(1, 2)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def check_cases(rank, world, ulysses, ring, cases, chunk=4, ranks=None):
    """Each case: the hybrid's output and q/k/v gradients on this rank's shard against SDPA on
    the whole sequence; returns the max abs error per case and tensor. `ranks`: the mesh's
    order (Ulysses groups of consecutive entries), e.g. one group listed out of rank order."""
    mesh = build_sequence_mesh(ulysses, ring, ranks)
    u, r = mesh.ulysses_rank, mesh.ring.rank
    errors = []
    for i, case in enumerate(cases):
        gen = torch.Generator().manual_seed(100 + i)
        b, h, hk, d, dtype, causal = (case["batch"], case["heads"], case["kv_heads"],
                                      case["head_dim"], case["dtype"], case["causal"])
        seq = 2 * ring * ulysses * chunk
        q = torch.randn(b, seq, h, d, generator=gen).to(dtype)
        k, v = (torch.randn(b, seq, hk, d, generator=gen).to(dtype) for _ in range(2))
        dout = torch.randn(b, seq, h, d, generator=gen).to(dtype)
        want = _reference(q, k, v, dout, causal)

        def mine(t):
            return sequence_shard(t, 1, r, ring, u, ulysses, causal)

        local = [mine(t).requires_grad_() for t in (q, k, v)]
        out = sequence_parallel_attention(*local, mesh=mesh, causal=causal)
        out.backward(mine(dout))
        got = (out.detach(), *(t.grad for t in local))
        tol = TOLERANCE[dtype]
        case_errors = {}
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(g, mine(w), **tol, msg=lambda m, n=name, c=case: f"{n} "
                                       f"{c} rank {rank}: {m}")
            case_errors[name] = float((g.float() - mine(w).float()).abs().max())
        errors.append(case_errors)
    return errors


def mismatched_layouts(rank, world):
    """Rank 1 holds a longer shard than rank 0: both raise, nobody hangs."""
    mesh = build_sequence_mesh(2, 1)
    n = 8 if rank == 0 else 12
    q = torch.randn(1, n, 4, 16)
    k = torch.randn(1, n, 2, 16)
    try:
        sequence_parallel_attention(q, k, k, mesh=mesh)
    except ValueError as err:
        return str(err)
    return None


def tiny_llama_loss_and_grads(rank, world, ulysses, ring):
    """A tiny Llama's loss and gradients with the hybrid through attn_implementation="ring",
    against the same model unsharded (SDPA); returns the largest gradient error."""
    from ray_jobs.ring_attention import apply_ring_attention
    from ray_jobs.ring_attention.ulysses import sequence_position_ids
    from tests.train.parallel_worlds import tiny_llama

    mesh = build_sequence_mesh(ulysses, ring)
    u, r = mesh.ulysses_rank, mesh.ring.rank
    seq = 2 * ring * ulysses * 4
    ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(5))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    ref = tiny_llama(0)
    ref.set_attn_implementation("sdpa")
    logits = ref(input_ids=ids).logits
    ref_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    ref_loss.backward()

    model = tiny_llama(0)
    apply_ring_attention(model, mesh)
    x = sequence_shard(ids, 1, r, ring, u, ulysses)
    y = sequence_shard(labels, 1, r, ring, u, ulysses)
    pos = sequence_position_ids(seq, r, ring, u, ulysses).unsqueeze(0).expand(2, -1)
    logits = model(input_ids=x, position_ids=pos).logits
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    worst = 0.0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # every rank holds the gradient of its tokens' loss: they add
        worst = max(worst, float((grad - p_ref.grad).abs().max() / p_ref.grad.abs().max()))
    return {"loss": float(total), "ref_loss": float(ref_loss), "grad_rel_err": worst}
