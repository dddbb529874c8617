"""Per-rank bodies of the ring tests, run in gloo worlds by tests.support.worlds."""

from __future__ import annotations

from itertools import product

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_jobs.ring_attention import (
    contiguous_shard,
    ring_attention,
    zigzag_position_ids,
    zigzag_shard,
    zigzag_unshard,
)
from ray_jobs.train.parallelize import build_mesh, parallelize, ring_mean_loss
from specs.degrees import ParallelDims

# Tolerances against single-process SDPA in the same dtype (values O(1), random normal inputs).
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}

ATTENTION_CASES = [
    dict(dtype=dtype, causal=causal, heads=heads, kv_heads=kv_heads, head_dim=head_dim, batch=2)
    for dtype, causal, (heads, kv_heads, head_dim) in product(
        (torch.float32, torch.bfloat16), (True, False), ((4, 2, 64), (2, 2, 128))
    )
]


def _reference(q, k, v, dout, causal):
    """Single-process SDPA on the full sequence; inputs (B, S, H, D); returns out and grads."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def check_attention_case(ring, rank, world, case, seed, chunk=8, transposed=False):
    """Ring forward/backward on shards vs SDPA on the full sequence; returns max abs errors."""
    gen = torch.Generator().manual_seed(seed)
    seq = 2 * world * chunk
    b, h, hk, d, dtype = (case["batch"], case["heads"], case["kv_heads"], case["head_dim"],
                          case["dtype"])
    q = torch.randn(b, seq, h, d, generator=gen).to(dtype)
    k = torch.randn(b, seq, hk, d, generator=gen).to(dtype)
    v = torch.randn(b, seq, hk, d, generator=gen).to(dtype)
    dout = torch.randn(b, seq, h, d, generator=gen).to(dtype)
    ref = _reference(q, k, v, dout, case["causal"])
    shard = zigzag_shard if case["causal"] else contiguous_shard
    local = [shard(t, 1, rank, world) for t in (q, k, v)]
    if transposed:  # what transformers hands over: (B, H, S, D) memory seen as (B, S, H, D)
        local = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in local]
    local = [t.requires_grad_() for t in local]
    out = ring_attention(*local, group=ring, causal=case["causal"])
    out.backward(shard(dout, 1, rank, world))
    got = (out.detach(), *(t.grad for t in local))
    errors = {}
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        want = shard(r, 1, rank, world)
        assert g.dtype == dtype and g.shape == want.shape, (name, g.dtype, g.shape, want.shape)
        torch.testing.assert_close(g, want, **TOLERANCE[dtype], msg=lambda m: f"{name} {case}: {m}")
        errors[name] = (g.float() - want.float()).abs().max().item()
    if dtype != torch.float32:
        # Exactness beyond the tolerance: mean error against fp64 close to SDPA's own in this dtype.
        exact = _reference(*(t.double() for t in (q, k, v, dout)), case["causal"])
        for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref, exact):
            e = shard(e, 1, rank, world)
            ring_err = (g.double() - e).abs().mean().item()
            sdpa_err = (shard(r, 1, rank, world).double() - e).abs().mean().item()
            # Block results are rounded to bf16 before the fp32 sum, so allow a little more
            # (seen <= 1.33x).
            assert ring_err <= 1.6 * sdpa_err, (f"{name} {case}: mean err {ring_err:.2e} "
                                                f"vs SDPA's {sdpa_err:.2e}")
    if case["causal"]:
        full = zigzag_unshard(out.detach(), 1, world, group=ring)
        torch.testing.assert_close(full, ref[0], **TOLERANCE[dtype])
    return errors


def attention_world(rank, world, cases):
    """Every attention case on the default group (ring order = rank order)."""
    errors = [check_attention_case(None, rank, world, case, seed=i) for i, case in enumerate(cases)]
    if world == 2:
        check_two_rank_accumulators_are_bit_identical(rank, world)
    return errors


def check_two_rank_accumulators_are_bit_identical(rank, world):
    """On two ranks out/dq/dK/dV accumulate in bf16, bit-identical to fp32 accumulation."""
    from ray_jobs.ring_attention import ring as ring_module

    gen = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, 32, h, 64, generator=gen).bfloat16() for h in (4, 2, 2, 4))
    results = []
    for choose in (ring_module.accumulator_dtype, lambda size, dtype: torch.float32):
        original, ring_module.accumulator_dtype = ring_module.accumulator_dtype, choose
        try:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = ring_attention(*leaves, group=None)
            out.backward(dout)
            results.append([out.detach()] + [t.grad for t in leaves])
        finally:
            ring_module.accumulator_dtype = original
    assert ring_module.accumulator_dtype(2, torch.bfloat16) == torch.bfloat16
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} differs between bf16 and fp32 accumulation on 2 ranks"


def plan_groups_world(rank, world, rings, cases):
    """Rings from a plan, each its own HSDP replica; each ring attends its own data; the
    dp_replicate groups join equal ring positions."""
    layout = build_mesh(ParallelDims.of(len(rings[0]), len(rings), len(rings[0])), rings, "cpu")
    my_ring = next(r for r in rings if rank in r)
    assert layout.ring.ranks == tuple(my_ring) and layout.ring_rank == my_ring.index(rank)
    assert layout.dp_rank == rings.index(my_ring)
    probe = torch.tensor([float(rank)])
    dist.all_reduce(probe, group=layout.mesh.get_group("dp_replicate"))
    assert probe.item() == sum(r[layout.ring_rank] for r in rings), (probe, rings)
    errors = [
        check_attention_case(layout.ring, layout.ring_rank, layout.ring.size, case,
                             seed=100 * layout.dp_rank + i, transposed=True)
        for i, case in enumerate(cases)
    ]
    return {"ring_rank": layout.ring_rank, "dp_rank": layout.dp_rank, "errors": errors}


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def llama_world(rank, world, seq_per_rank=16, batch=2):
    """Tiny Llama through the trainer's parallelize() on one ring of `world` ranks (zigzag
    shards, FSDP2 over the ring) vs the unsharded model: loss and every gradient."""
    reference = _tiny_llama(seed=0)
    reference.set_attn_implementation("sdpa")
    model = _tiny_llama(seed=0)  # parallelize() binds its attention to the ring
    seq = seq_per_rank * world
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(7))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # shift before sharding: a shard lacks its successor token
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()

    layout = build_mesh(ParallelDims.of(world, 1, world), [list(range(world))], "cpu")
    root = parallelize(model, layout, activation_checkpointing="none", mixed_precision=None)
    x, y = (zigzag_shard(t, 1, layout.ring_rank, world) for t in (ids, labels))
    pos = zigzag_position_ids(seq, layout.ring_rank, world).unsqueeze(0).expand(batch, -1)
    loss = ring_mean_loss(*root(x, pos, y), layout.ring)
    (loss * world).backward()  # FSDP averages over the ring; the shares must add
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    worst = 0.0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        grad = p.grad.full_tensor()
        torch.testing.assert_close(grad, p_ref.grad, atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
        worst = max(worst, (grad - p_ref.grad).abs().max().item())
    return {"loss": loss.item(), "ref_loss": ref_loss.item(), "max_grad_err": worst}


def ring_and_llama_world(rank, world, cases):
    return {"attention": attention_world(rank, world, cases), "llama": llama_world(rank, world)}


def large_result_world(rank: int, world: int) -> bytes:
    """A result far larger than a pipe's buffer (64 KiB), first byte the rank."""
    return bytes([rank]) + bytes(4 << 20)


def two_models_world(rank, world, seq_per_rank=8, batch=2):
    """Two tiny Llamas bound to different rings in one process, interleaved: model A around the
    ring of every rank (zigzag shards), model B around a ring of this rank alone (the whole
    sequence), both checkpointed so backward recomputes their attention; one backward through
    both losses. Each against its own unsharded SDPA reference: the largest gradient errors."""
    from ray_jobs.ring_attention import Ring, apply_ring_attention
    from ray_jobs.train.parallelize import apply_activation_checkpointing

    alone = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    rings = {"a": Ring(group=None, ranks=tuple(range(world))),
             "b": Ring(group=alone[rank], ranks=(rank,))}
    seq = seq_per_rank * world
    gen = torch.Generator().manual_seed(11)
    ids = {name: torch.randint(0, 128, (batch, seq), generator=gen) for name in rings}
    losses, models, refs = {}, {}, {}
    for seed, name in enumerate(rings):
        refs[name] = _tiny_llama(seed)
        refs[name].set_attn_implementation("sdpa")
        _sum_loss(refs[name], ids[name], torch.arange(seq)).backward()
        models[name] = _tiny_llama(seed)
        apply_ring_attention(models[name], rings[name])
        apply_activation_checkpointing(models[name].model.layers)
    a_ids = zigzag_shard(ids["a"], 1, rank, world)
    losses["a"] = _sum_loss(models["a"], a_ids, zigzag_position_ids(seq, rank, world),
                            labels=zigzag_shard(_next_tokens(ids["a"]), 1, rank, world))
    losses["b"] = _sum_loss(models["b"], ids["b"], torch.arange(seq))
    (losses["a"] + losses["b"]).backward()
    errors = {}
    for name, model in models.items():
        worst = 0.0
        for (pname, p), (_, p_ref) in zip(model.named_parameters(),
                                         refs[name].named_parameters()):
            grad = p.grad.clone()
            if name == "a":
                dist.all_reduce(grad)  # each rank holds its tokens' share: the shares add
            torch.testing.assert_close(grad, p_ref.grad, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"model {name}, {pname}: {m}")
            worst = max(worst, (grad - p_ref.grad).abs().max().item())
        errors[name] = worst
    return errors


def _next_tokens(ids):
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # shift before sharding: a shard lacks its successor token
    return labels


def _sum_loss(model, ids, positions, labels=None):
    labels = _next_tokens(ids) if labels is None else labels
    logits = model(input_ids=ids, position_ids=positions.unsqueeze(0).expand(ids.shape[0], -1),
                   use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
