"""Single-process checks: block plan coverage, LSE merge, sharding helpers, labels, input errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_jobs.ring_attention import (
    Ring,
    apply_ring_attention,
    contiguous_shard,
    contiguous_unshard,
    merge_block,
    ring_attention,
    ring_attention_forward,
    zigzag_position_ids,
    zigzag_shard,
    zigzag_unshard,
)
from ray_jobs.ring_attention.kernels import CpuFlashKernel
from ray_jobs.ring_attention.ring import plan_block


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_zigzag_plan_covers_the_causal_mask_exactly_and_evenly(world):
    chunk = 3
    seq = 2 * world * chunk
    pos = [zigzag_position_ids(seq, r, world) for r in range(world)]
    covered = torch.zeros(seq, seq, dtype=torch.int64)
    work = torch.zeros(world, world, dtype=torch.int64)
    for rank in range(world):
        for step in range(world):
            src = (rank - step) % world
            plan = plan_block(rank, src, 2 * chunk, causal=True)
            q_pos, k_pos = pos[rank][plan.q_rows], pos[src][plan.kv_rows]
            visible = (q_pos[:, None] >= k_pos[None, :] if plan.causal
                       else torch.ones(len(q_pos), len(k_pos), dtype=torch.bool))
            # A non-causal block must hold only visible pairs, or the ring would leak the future.
            assert bool((q_pos[:, None] >= k_pos[None, :])[visible].all())
            covered[q_pos[:, None], k_pos[None, :]] += visible.long()
            work[rank, step] = int(visible.sum())
    assert torch.equal(covered, torch.tril(torch.ones(seq, seq, dtype=torch.int64)))
    if world > 1:
        # Every rank does the same work at every step after the diagonal one: nobody idles.
        assert len(set(work[:, 1:].flatten().tolist())) == 1, work


def test_merge_block_equals_attention_over_the_union_of_keys():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, 8) for _ in range(3))
    kernel = CpuFlashKernel()
    out1, lse1 = kernel.forward(q, k[:, :4], v[:, :4], False, 8**-0.5)
    out2, lse2 = kernel.forward(q, k[:, 4:], v[:, 4:], False, 8**-0.5)
    out, lse = out1.float(), lse1.clone()
    merge_block(out, lse, out2, lse2)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    full_lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bqhk", q, k) * 8**-0.5, dim=-1)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def test_merge_block_is_stable_for_huge_and_empty_rows():
    out = torch.ones(1, 2, 1, 4)
    lse = torch.tensor([[[1000.0], [-float("inf")]]])
    merge_block(out, lse, torch.full((1, 2, 1, 4), 3.0), torch.tensor([[[1000.0], [5.0]]]))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(lse[0, :, 0],
                               torch.tensor([1000.0 + torch.log(torch.tensor(2.0)).item(), 5.0]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_round_trip(world):
    x = torch.arange(2 * 4 * world * 3).reshape(2, 4 * world, 3)
    zz = [zigzag_shard(x, 1, r, world) for r in range(world)]
    assert torch.equal(zigzag_unshard(zz, 1, world), x)
    assert torch.equal(torch.cat([zigzag_position_ids(4 * world, r, world)
                                  for r in range(world)]).sort().values,
                       torch.arange(4 * world))
    cs = [contiguous_shard(x, 1, r, world) for r in range(world)]
    assert torch.equal(contiguous_unshard(cs, 1, world), x)


def test_zigzag_shard_layout_for_two_ranks():
    assert zigzag_position_ids(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_position_ids(8, 1, 2).tolist() == [2, 3, 4, 5]


def test_sharding_errors_name_the_values():
    with pytest.raises(ValueError, match=r"sequence length \(10\) divisible by 4"):
        zigzag_shard(torch.zeros(1, 10), 1, 0, 2)
    with pytest.raises(ValueError, match=r"rank=2, world=2"):
        zigzag_shard(torch.zeros(1, 8), 1, 2, 2)
    with pytest.raises(ValueError, match=r"got 3 shards for world=2"):
        zigzag_unshard([torch.zeros(1, 4)] * 3, 1, 2)


def _qkv(b=1, s=8, h=4, hk=2, d=16, dtype=torch.float32):
    return (torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype),
            torch.randn(b, s, hk, d, dtype=dtype))


def test_ring_attention_needs_torch_distributed():
    # In a fresh interpreter: this one may already hold a process group from another test.
    code = (
        "import pytest, torch\n"
        "from ray_jobs.ring_attention import ring_attention\n"
        "q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)\n"
        "with pytest.raises(ValueError, match=r'init_process_group'):\n"
        "    ring_attention(q, k, k.clone(), group=None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr


def test_bad_inputs_raise_clear_errors(world_of_one):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"even local_seq .* got 7"):
        ring_attention(q[:, :7], k[:, :7], v[:, :7], group=None)
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        ring_attention(q, k, v[:, :, :1], group=None)
    with pytest.raises(ValueError, match=r"must agree on batch, local_seq and head_dim"):
        ring_attention(q[:, :6], k, v, group=None)
    with pytest.raises(ValueError,
                       match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        ring_attention(q[:, :, :3], k, v, group=None)
    with pytest.raises(ValueError, match=r"one floating dtype, got torch.bfloat16, torch.float32"):
        ring_attention(q.bfloat16(), k, v, group=None)
    with pytest.raises(ValueError, match=r"must be 4-D"):
        ring_attention(q[0], k, v, group=None)
    with pytest.raises(ValueError,
                       match=r"global rank 0 is not a member of the ring group \[5, 6\]"):
        ring_attention(q, k, v, group=Ring(group=None, ranks=(5, 6)))
    with pytest.raises(ValueError, match=r"world=2 but the ring group has 1 ranks"):
        zigzag_unshard(q, 1, 2, group=None)


@pytest.mark.parametrize("causal", [True, False])
def test_single_rank_ring_equals_sdpa_also_for_strided_inputs(world_of_one, causal):
    torch.manual_seed(1)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in _qkv(b=2))
    assert not q.is_contiguous()
    out = ring_attention(q, k, v, group=None, causal=causal)
    out.square().sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref), is_causal=causal,
                                          enable_gqa=True).transpose(1, 2)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, r in zip((q, k, v), ref):
        torch.testing.assert_close(got.grad, r.grad, atol=1e-5, rtol=1e-5)


def test_ring_attention_needs_a_ring_bound_to_its_module():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"\(Identity has none\).*apply_ring_attention"):
        ring_attention_forward(torch.nn.Identity(), q, q, q, None)
    with pytest.raises(ValueError, match=r"Linear has no attention modules named 'self_attn'"):
        apply_ring_attention(torch.nn.Linear(2, 2), None)


def test_apply_ring_attention_binds_each_model_to_its_own_ring(world_of_one):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    one, two = (LlamaForCausalLM(LlamaConfig(**config)) for _ in range(2))
    ring_one, ring_two = Ring(group=None, ranks=(0,)), Ring(group=dist.group.WORLD, ranks=(0,))
    apply_ring_attention(one, ring_one)
    apply_ring_attention(two, ring_two)
    assert one.config._attn_implementation == two.config._attn_implementation == "ring"
    assert [layer.self_attn.ring_attention_group for layer in one.model.layers] == [ring_one] * 2
    assert all(layer.self_attn.ring_attention_group is ring_two for layer in two.model.layers)

