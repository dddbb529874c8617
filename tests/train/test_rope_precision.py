"""RoPE at a million positions (issue 33): the trainer's rotation of bf16 q/k near position
1,048,576, with Llama-3's head_dim 128 and the 8B recipe's 1M-stage theta, is as accurate as bf16
storage of the exactly rotated q/k; transformers' own path (fp32 angle product, bf16 cos/sin and
rotation) is not, and the tests show it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AttentionInterface, LlamaConfig
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

from ray_jobs.ring_attention.rope import (
    _HF_APPLY_ROTARY,
    ExactRotaryEmbedding,
    apply_exact_rope,
    apply_rotary_pos_emb,
    exact_angles,
    install_exact_rotation,
    measure,
    render_table,
)
from ray_jobs.train.model import (
    apply_rope,
    build_meta_model,
    init_weights,
    llama_config,
    materialize,
)
from ray_jobs.train.parallelize import CausalLMWithLoss, build_mesh, parallelize
from specs.degrees import ParallelDims
from specs.loading import load_model
from specs.run import RunSpec

ROOT = Path(__file__).resolve().parents[2]
RECIPE = load_model(ROOT / "configs" / "llama3-8b-1m.yaml", RunSpec)
ONE_M = 1_048_576
HEAD_DIM = 128
TOKENS, HEADS = 256, 2
# bf16 keeps 8 significant bits: rounding a vector to bf16 moves each component by at most
# 2**-9 of itself, so by at most 2**-9 of the vector's norm; a logit q.k by at most
# (2 * 2**-9 + 2**-18) |q||k|. The trainer's rotation must stay within these, and within 5% of
# what rounding the exact rotation to bf16 costs the same vectors.
VECTOR_BOUND = 2.0**-9
LOGIT_BOUND = 2 * 2.0**-9 + 2.0**-18


def stage_config(index: int) -> LlamaConfig:
    """The recipe's config at stage `index` (shapes only: no weights are made)."""
    stage = RECIPE.stages[index]
    config = llama_config(RECIPE.model, stage.seq_len, RECIPE.stage_rope(index))
    assert config.hidden_size // config.num_attention_heads == HEAD_DIM
    return config


def reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) rotated in fp64 by positions x inv_freq (the model's fp32 frequencies)."""
    angles = positions[:, None].double() * inv_freq.double()
    emb = torch.cat((angles, angles), dim=-1)
    x = x.double()
    return x * emb.cos() + rotate_half(x) * emb.sin()


def transformers_path(x, positions, config):
    """What the trainer ran before: transformers' rotary module under bf16 compute."""
    cos, sin = LlamaRotaryEmbedding(config)(x, positions[None])
    assert cos.dtype == x.dtype
    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


def trainer_path(x, positions, config):
    cos, sin = ExactRotaryEmbedding(config)(x, positions[None])
    out, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert out.dtype == x.dtype
    return out


def vector_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst component error of a rotated vector, relative to the vector's norm."""
    return ((x.double() - ref).abs().amax(-1) / ref.norm(dim=-1)).max().item()


def logit_error(q, k, q_ref, k_ref) -> float:
    """Worst error of q.k over all pairs, relative to |q||k|."""
    logits = q.double() @ k.double().transpose(-1, -2)
    exact = q_ref @ k_ref.transpose(-1, -2)
    norms = q_ref.norm(dim=-1)[..., :, None] * k_ref.norm(dim=-1)[..., None, :]
    return ((logits - exact).abs() / norms).max().item()


def qk(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, HEADS, TOKENS, HEAD_DIM, generator=g).bfloat16()


@pytest.mark.parametrize("end", [8192, 65536, 262144, ONE_M])
@pytest.mark.parametrize("stage", [0, 3])
def test_trainer_rotation_costs_no_more_than_bf16_storage(stage, end):
    config = stage_config(stage)
    positions = torch.arange(end - TOKENS, end)
    q = qk(stage)
    ref = reference(q, positions, LlamaRotaryEmbedding(config).inv_freq)
    storage = vector_error(ref.bfloat16(), ref)
    error = vector_error(trainer_path(q, positions, config), ref)
    assert error <= VECTOR_BOUND and error <= 1.05 * storage + 1e-6, (error, storage)


def test_transformers_rotation_loses_accuracy_near_one_million():
    """The unfixed path exceeds the bound: the fp32 angle product near 1M radians is off by up
    to half an fp32 ulp (0.031 rad), and bf16 rotation rounds three times."""
    config = stage_config(3)
    positions = torch.arange(ONE_M - TOKENS, ONE_M)
    q = qk(3)
    ref = reference(q, positions, LlamaRotaryEmbedding(config).inv_freq)
    error = vector_error(transformers_path(q, positions, config), ref)
    assert error > 3 * VECTOR_BOUND, error
    angle_error = ((positions[:, None].float() * LlamaRotaryEmbedding(config).inv_freq).double()
                   - positions[:, None].double() * LlamaRotaryEmbedding(config).inv_freq.double())
    assert angle_error.abs().max() > 0.01


@pytest.mark.parametrize("distance", ["near", "far"])
def test_logits_keep_the_relative_position_at_one_million(distance):
    """Queries near position 1M against keys near 1M (distance ~0) or near 0 (~1M): the trainer's
    logits are those of the exact rotation within bf16 storage; transformers' are not."""
    config = stage_config(3)
    q_pos = torch.arange(ONE_M - TOKENS, ONE_M)
    k_pos = q_pos if distance == "near" else torch.arange(0, TOKENS)
    q, k = qk(1), qk(2)
    inv_freq = LlamaRotaryEmbedding(config).inv_freq
    q_ref, k_ref = reference(q, q_pos, inv_freq), reference(k, k_pos, inv_freq)
    storage = logit_error(q_ref.bfloat16(), k_ref.bfloat16(), q_ref, k_ref)
    fixed = logit_error(trainer_path(q, q_pos, config), trainer_path(k, k_pos, config),
                        q_ref, k_ref)
    unfixed = logit_error(transformers_path(q, q_pos, config),
                          transformers_path(k, k_pos, config), q_ref, k_ref)
    assert fixed <= LOGIT_BOUND and fixed <= 1.05 * storage + 1e-6, (fixed, storage)
    assert unfixed > 2.5 * storage, (unfixed, storage)


def test_shifting_both_positions_keeps_the_logit():
    """The relative-position property itself: q at p, k at p' give the same logit as q at
    p - s, k at p' - s. The trainer's rotation keeps it near 1M to bf16 storage; transformers'
    does not."""
    config = stage_config(3)
    pos = torch.arange(ONE_M - TOKENS, ONE_M)
    shifted = pos - (ONE_M - TOKENS)  # the same pairs at positions 0..255
    q, k = qk(4), qk(5)

    def logits(path, p):
        return path(q, p, config).double() @ path(k, p, config).double().transpose(-1, -2)

    norms = q.double().norm(dim=-1)[..., :, None] * k.double().norm(dim=-1)[..., None, :]
    fixed = ((logits(trainer_path, pos) - logits(trainer_path, shifted)).abs() / norms).max()
    unfixed = ((logits(transformers_path, pos) - logits(transformers_path, shifted)).abs()
               / norms).max()
    # measured: 0.0012 and 0.0045 of |q||k|
    assert fixed <= LOGIT_BOUND, fixed
    assert unfixed > LOGIT_BOUND and unfixed > 3 * fixed, (unfixed, fixed)


@settings(max_examples=100, deadline=2_000)
@given(position=st.integers(0, (1 << 24) - 1), theta=st.floats(1e4, 1e10))
def test_exact_angles_match_fp64(position, theta):
    """cos/sin of the trainer's angles are those of the exact product with the model's fp32
    frequencies, at any position up to 16M (the fp32 cast of an angle below 2*pi)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))
    positions = torch.tensor([[position]])
    angles = exact_angles(positions, inv_freq).double()
    exact = position * inv_freq.double()
    assert (angles.cos() - exact.cos()).abs().max() < 1e-6
    assert (angles.sin() - exact.sin()).abs().max() < 1e-6


def test_short_positions_in_fp32_change_only_by_the_angle_rounding():
    """The tiny default (fp32 on the CPU, positions below 4K): cos/sin move by at most half an
    fp32 ulp of transformers' own angle (its rounding), toward the exact value; an fp32 rotation
    is transformers' function, bit for bit."""
    run = load_model(ROOT / "configs" / "tiny.yaml", RunSpec)
    last = len(run.stages) - 1
    config = llama_config(run.model, run.stages[last].seq_len, run.stage_rope(last))
    positions = torch.arange(run.stages[last].seq_len)[None]
    x = torch.zeros(1, dtype=torch.float32)
    old_cos, old_sin = LlamaRotaryEmbedding(config)(x, positions)
    new_cos, new_sin = ExactRotaryEmbedding(config)(x, positions)
    assert new_cos.dtype == old_cos.dtype == torch.float32
    top = positions.max().float() * LlamaRotaryEmbedding(config).inv_freq.max()
    half_ulp = float(torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(top))) / 2
    assert (new_cos - old_cos).abs().max() <= half_ulp + 1e-6
    assert (new_sin - old_sin).abs().max() <= half_ulp + 1e-6
    head_dim = run.model.head_dim
    q, k = torch.randn(1, 2, positions.shape[1], head_dim), torch.randn(1, 1, positions.shape[1],
                                                                       head_dim)
    ours = apply_rotary_pos_emb(q, k, new_cos, new_sin)
    for a, b in zip(ours, _HF_APPLY_ROTARY(q, k, new_cos, new_sin)):
        assert torch.equal(a, b)


def test_gradient_through_the_fp32_rotation():
    """Backward of the upcast rotation: dL/dq = R^T dL/dq_rot, in bf16 within its rounding."""
    config = stage_config(3)
    positions = torch.arange(ONE_M - TOKENS, ONE_M)
    q = qk(6).requires_grad_()
    weight = qk(7).double()
    (trainer_path(q, positions, config).double() * weight).sum().backward()
    inv_freq = LlamaRotaryEmbedding(config).inv_freq
    angles = positions[:, None].double() * inv_freq.double()
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    # the transpose of x -> x cos + rotate_half(x) sin
    want = weight * cos - rotate_half(weight * sin)
    assert q.grad.dtype == torch.bfloat16
    assert vector_error(q.grad, want) <= VECTOR_BOUND


def test_the_trainer_rotates_exactly_end_to_end():
    """The trainer's own path (loop.py step 3): a Llama with head_dim 128 and the 1M stage's
    theta built on the meta device in fp32, parallelize()d with FSDP2 computing in bf16 (a world
    of one gloo rank), materialized, seeded. The q and k its attention receives near position
    1M are the exact rotation of its bf16 projections, to bf16 storage. Put transformers' rotary
    module back and they are not; let FSDP2 cast the layers' inputs (its default, which turns
    RoPE's fp32 cos/sin to bf16) and they are not either."""
    theta = RECIPE.stage_theta(3)
    config = LlamaConfig(vocab_size=64, hidden_size=HEADS * HEAD_DIM, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=1,
                         max_position_embeddings=ONE_M, pad_token_id=3,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    config._attn_implementation = "sdpa"
    seen = {}

    def capture(module, query, key, value, attention_mask, **_):
        """An attention function that keeps the q and k it is given (as the ring's does)."""
        seen["q"], seen["k"] = query, key
        return value.transpose(1, 2).repeat_interleave(HEADS, dim=2), None

    AttentionInterface.register("rope_capture", capture)
    positions = torch.arange(ONE_M - TOKENS, ONE_M)[None]
    # tokens other than the padding id 3, whose embedding row is zero
    ids = torch.randint(4, 64, (1, TOKENS), generator=torch.Generator().manual_seed(0))

    def errors(model, root) -> tuple[float, float, float]:
        attn = next(m for n, m in model.named_modules() if n.endswith("self_attn"))
        attn.config._attn_implementation = "rope_capture"
        hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q0", o)),
                 attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k0", o))]
        try:
            with torch.no_grad():
                root(ids, positions, ids)
        finally:
            for hook in hooks:
                hook.remove()
        inv_freq = model.model.rotary_emb.inv_freq
        q0 = seen["q0"].view(1, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)
        k0 = seen["k0"].view(1, TOKENS, 1, HEAD_DIM).transpose(1, 2)
        assert q0.dtype == seen["q"].dtype == seen["k"].dtype == torch.bfloat16
        q_ref = reference(q0, positions[0], inv_freq)
        k_ref = reference(k0, positions[0], inv_freq)
        return (vector_error(seen["q"], q_ref), vector_error(seen["k"], k_ref),
                vector_error(q_ref.bfloat16(), q_ref))

    def trainer_model(cast_layer_inputs: bool = False):
        model = build_meta_model(config, torch.float32)
        layout = build_mesh(ParallelDims.of(1, 1, 1), [[0]], "cpu")
        if cast_layer_inputs:  # what parallelize() did before: FSDP2's default policy
            root = CausalLMWithLoss(model, 1024)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                          reduce_dtype=torch.float32)
            for layer in model.model.layers:
                fully_shard(layer, mesh=layout.fsdp_mesh, mp_policy=policy)
            fully_shard(root, mesh=layout.fsdp_mesh, mp_policy=policy)
        else:
            root = parallelize(model, layout, activation_checkpointing="full",
                               mixed_precision=torch.bfloat16)
        materialize(model, "cpu", {"rope_type": "default", "rope_theta": theta}, ONE_M, 8192)
        init_weights(model, seed=0)
        assert isinstance(model.model.rotary_emb, ExactRotaryEmbedding)
        assert modeling_llama.apply_rotary_pos_emb is apply_rotary_pos_emb
        return model, root

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, root = trainer_model()
        q_err, k_err, storage = errors(model, root)
        assert max(q_err, k_err) <= VECTOR_BOUND and q_err <= 1.05 * storage + 1e-6, \
            (q_err, k_err, storage)
        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # transformers' own, unfixed
        q_err, k_err, _ = errors(model, root)
        assert min(q_err, k_err) > 3 * VECTOR_BOUND, (q_err, k_err)
        q_err, k_err, storage = errors(*trainer_model(cast_layer_inputs=True))
        assert q_err > 1.2 * storage, (q_err, storage)  # measured: 1.4x
    finally:
        dist.destroy_process_group()


def test_apply_rope_keeps_transformers_frequencies():
    config = stage_config(0)
    model = build_meta_model(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1), torch.float32)
    materialize(model, "cpu", config.rope_parameters, 65536, 8192)
    apply_rope(model, config.rope_parameters, seq_len=65536, pretrain_seq_len=8192)  # idempotent
    assert torch.equal(model.model.rotary_emb.inv_freq, LlamaRotaryEmbedding(config).inv_freq)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_a_model_cast_after_its_rope_is_refused_clearly():
    model = build_meta_model(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1), torch.float32)
    materialize(model, "cpu", {"rope_type": "default", "rope_theta": 5e5}, 64, 64)
    model.to(torch.bfloat16)  # casts the inv_freq buffer too
    with pytest.raises(TypeError, match="inv_freq is torch.bfloat16, not float32.*apply_exact_"):
        model.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), torch.arange(4)[None])
    apply_exact_rope(model)  # the fix the message names
    cos, _ = model.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), torch.arange(4)[None])
    assert cos.dtype == torch.float32


def test_traces_under_fake_tensors():
    """The memory trace (ray_jobs/train/memory.py) runs the model under FakeTensorMode."""
    config = stage_config(3)
    with FakeTensorMode():
        rotary = ExactRotaryEmbedding(config)
        x = torch.empty(1, TOKENS, 16, dtype=torch.bfloat16)
        cos, sin = rotary(x, torch.arange(TOKENS)[None] + ONE_M - TOKENS)
        q = torch.empty(1, HEADS, TOKENS, HEAD_DIM, dtype=torch.bfloat16)
        q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert cos.dtype == torch.float32 and q_rot.dtype == torch.bfloat16
    assert tuple(q_rot.shape) == (1, HEADS, TOKENS, HEAD_DIM)


def test_another_patch_of_the_rotation_is_refused(monkeypatch):
    def foreign(q, k, cos, sin, unsqueeze_dim=1):
        return q, k

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", foreign)
    with pytest.raises(RuntimeError, match="already replaced by .*foreign.*remove the other one"):
        install_exact_rotation()


def test_the_docs_table_tool_measures_the_same():
    """`python -m ray_jobs.ring_attention.rope` (the docs' table) agrees with the tests above."""
    theta = RECIPE.stage_theta(3)
    m = measure(theta, ONE_M, tokens=128, heads=2)
    assert m["trainer: vector"] <= 1.05 * m["bf16 storage: vector"]
    assert m["transformers: vector"] > 3 * m["bf16 storage: vector"]
    assert 0.01 < m["fp32 angle error (rad)"] <= 0.03125
    table = render_table(theta, ends=(ONE_M,))
    assert table.splitlines()[2].startswith("| 1,048,576 | 0.031 |")
