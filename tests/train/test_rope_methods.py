"""RoPE per stage: each method's frequencies are transformers' own for the rope_parameters it
resolves to, they survive a checkpoint into the evaluator and the next stage, a base model's
own rule is kept unless a stage says otherwise, and bad blocks are refused with one line."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ray_jobs.train.model import apply_rope, build_model, check_rope, stage_rope
from ray_jobs.train.placement import check_capacity
from specs.errors import SpecError
from specs.loading import load_model, validate_data
from specs.run import RunSpec, describe_rope, rope_theta_for
from tests.train.conftest import mini_spec

SEQ, NATIVE, HEAD_DIM = 256, 64, 8  # mini_spec: hidden 32 over 4 heads, pretrained at 64

METHODS = {
    "theta": {"method": "theta"},
    "linear": {"method": "linear"},
    "dynamic": {"method": "dynamic"},
    "yarn": {"method": "yarn", "beta_fast": 16, "beta_slow": 2},
    "llama3": {"method": "llama3"},
    "longrope": {"method": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6],
                 "long_factor": [1.0, 1.5, 2.5, 4.0]},
}

# What each method means, written out by hand for SEQ = 4 x NATIVE (the published keys of each
# rope_type): transformers' frequencies for these are the reference.
EXPECTED = {
    "theta": {"rope_type": "default", "rope_theta": rope_theta_for(SEQ, 10_000.0, NATIVE)},
    "linear": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 1.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
             "original_max_position_embeddings": NATIVE, "beta_fast": 16, "beta_slow": 2},
    "llama3": {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 4.0,
               "original_max_position_embeddings": NATIVE, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0},
    "longrope": {"rope_type": "longrope", "rope_theta": 10_000.0, "factor": 4.0,
                 "original_max_position_embeddings": NATIVE,
                 "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 1.5, 2.5, 4.0]},
}


def _run(tmp_path, rope: dict | None = None, **overrides) -> RunSpec:
    spec = mini_spec(tmp_path, **overrides)
    spec["stages"][1]["seq_len"] = SEQ
    if rope is not None:
        spec["stages"][1]["rope"] = rope
    return validate_data(spec, RunSpec, source="test")


def _transformers_tables(params: dict, length: int, max_positions: int):
    """cos, sin of transformers' own LlamaRotaryEmbedding for `params`, positions 0..length-1,
    in fp64 from its frequencies (the exact-angle module rounds nothing else)."""
    config = LlamaConfig(hidden_size=32, num_attention_heads=4,
                         max_position_embeddings=max_positions, rope_parameters=dict(params))
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(length)[None]
    rotary(torch.zeros(1, dtype=torch.float32), positions)  # dynamic/longrope update here
    angles = positions[..., None].double() * rotary.inv_freq.double()
    emb = torch.cat((angles, angles), -1)
    return emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling


def _tables(model, length: int):
    positions = torch.arange(length)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    return cos.double(), sin.double()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_resolves_to_its_published_parameters_and_transformers_frequencies(
        tmp_path, method):
    run = _run(tmp_path, METHODS[method])
    params = run.stage_rope(1)
    assert params == pytest.approx(EXPECTED[method]) if method != "longrope" else \
        params == EXPECTED[method]
    model = build_model(run, 1, None, seed=0, attn_implementation="sdpa")
    assert model.config.rope_parameters == params  # what every checkpoint's config.json carries
    max_positions = NATIVE if method == "dynamic" else SEQ
    assert model.config.max_position_embeddings == max_positions
    cos, sin = _tables(model, SEQ)
    ref_cos, ref_sin = _transformers_tables(params, SEQ, max_positions)
    assert torch.allclose(cos, ref_cos, atol=2e-7) and torch.allclose(sin, ref_sin, atol=2e-7)
    if method != "theta":  # every method moves the frequencies away from plain RoPE's
        plain = _transformers_tables({"rope_type": "default", "rope_theta": 10_000.0}, SEQ, SEQ)
        assert (cos - plain[0]).abs().max() > 1e-2


def test_the_theta_rule_still_gives_the_published_bases():
    recipe = load_model("configs/llama3-8b-1m.yaml", RunSpec)
    by_length = {s.seq_len: recipe.stage_rope(i) for i, s in enumerate(recipe.stages)}
    assert round(by_length[262_144]["rope_theta"]) == 283_461_213
    assert round(by_length[1_048_576]["rope_theta"]) == 3_580_165_449
    assert all(p["rope_type"] == "default" for p in by_length.values())


@pytest.mark.parametrize("method", ["dynamic", "longrope"])
def test_length_dependent_methods_rotate_every_shard_of_a_ring_alike(tmp_path, method):
    """A ring rank sees only its own positions; dynamic and longrope frequencies would follow
    each rank's largest one. In training they are the stage's length's, on every shard.
    (longrope: an original context between rank 1's largest position and the stage's length,
    where transformers would pick the short factors on rank 1 and the long ones on rank 0.)"""
    rope = dict(METHODS[method])
    if method == "longrope":
        rope["original_max_position_embeddings"] = 224
    run = _run(tmp_path, rope)
    model = build_model(run, 1, None, seed=0, attn_implementation="sdpa")
    whole_cos, _ = _tables(model, SEQ)
    chunk = SEQ // 4  # zigzag over 2 ranks: rank 1 holds chunks 1 and 2, up to 3/4 of SEQ
    rank1 = torch.cat([torch.arange(chunk, 2 * chunk), torch.arange(2 * chunk, 3 * chunk)])
    cos, _ = model.model.rotary_emb(torch.zeros(1), rank1[None])
    assert torch.equal(cos.double(), whole_cos[:, rank1])
    # transformers' own module, given only rank 1's positions, rotates by other frequencies
    config = LlamaConfig(hidden_size=32, num_attention_heads=4,
                         max_position_embeddings=model.config.max_position_embeddings,
                         rope_parameters=dict(model.config.rope_parameters))
    theirs = LlamaRotaryEmbedding(config)
    their_cos, _ = theirs(torch.zeros(1), rank1[None])
    their_whole, _ = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(SEQ)[None])
    assert not torch.allclose(their_cos, their_whole[:, rank1], atol=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_checkpoint_reloads_with_the_same_positions_in_the_evaluator_and_the_next_stage(
        tmp_path, method):
    from ray_jobs.eval.model import load_checkpoint
    from tests.support import eval_fixtures as fixtures

    run = _run(tmp_path, METHODS[method])
    model = build_model(run, 1, None, seed=0, attn_implementation="sdpa")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    fixtures.build_tokenizer(512).save_pretrained(ckpt)
    trained = _tables(model, SEQ)
    # the same stage resumed from it (init_from: the checkpoint's config, the stage's RoPE)
    resumed = build_model(run, 1, ckpt, seed=1, attn_implementation="sdpa")
    assert resumed.config.rope_parameters == model.config.rope_parameters
    assert all(torch.equal(a, b) for a, b in zip(_tables(resumed, SEQ), trained))
    # the evaluator: whole sequences in one process, transformers' reading of config.json
    evaluated, _ = load_checkpoint(ckpt)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(_tables(evaluated, SEQ), trained))
    # the next stage (4x longer, no rope block): the base model's plain rule with its own
    # theta, nothing left over from this checkpoint's method
    longer = mini_spec(tmp_path)
    longer["stages"] = [dict(longer["stages"][1], seq_len=SEQ), dict(
        longer["stages"][1], name="s1k", seq_len=4 * SEQ)]
    longer["stages"][0]["rope"] = METHODS[method]
    run2 = validate_data(longer, RunSpec, source="test")
    following = build_model(run2, 1, ckpt, seed=0, attn_implementation="sdpa")
    assert following.config.rope_parameters == {
        "rope_type": "default", "rope_theta": pytest.approx(rope_theta_for(4 * SEQ, 1e4, 64))}
    assert following.config.max_position_embeddings == 4 * SEQ


def _llama3_base(tmp_path):
    """A base checkpoint with Llama 3.1's rule in its config.json, and a run starting from it."""
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=SEQ, rope_parameters=EXPECTED["llama3"])
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    return base


def test_a_llama3_base_keeps_its_rule_unless_a_stage_says_otherwise(tmp_path):
    base = _llama3_base(tmp_path)
    kept = _run(tmp_path, None, **{"model.path": str(base), "model.num_hidden_layers": 1})
    rule = kept.base_rope()
    assert rule["rope_type"] == "llama3"
    assert kept.stage_rope(1, rule) == rule  # no rope block: the checkpoint's rule, unchanged
    assert kept.stage_rope_words(1, rule) == "llama3 x4 (the base model's, kept)"
    assert stage_rope(kept, 1)["rope_type"] == "llama3"
    model = build_model(kept, 1, None, seed=0, attn_implementation="sdpa")
    assert model.config.rope_parameters["rope_type"] == "llama3"
    # the plan (plan.json, the report) shows what the trainer sets, not the rule of a base
    # without one
    planned = check_capacity(kept, tmp_path)
    assert planned.stages[1].rope == rule
    assert planned.stages[0].rope == kept.stage_rope(0, rule)

    replaced = _run(tmp_path, {"method": "theta"},
                    **{"model.path": str(base), "model.num_hidden_layers": 1})
    assert replaced.stage_rope(1, rule) == {
        "rope_type": "default", "rope_theta": pytest.approx(rope_theta_for(SEQ, 1e4, NATIVE))}
    assert replaced.stage_rope_words(1, rule).endswith("(replaces the base model's llama3)")
    model = build_model(replaced, 1, None, seed=0, attn_implementation="sdpa")
    assert model.config.rope_parameters["rope_type"] == "default"


def test_the_base_rule_of_an_older_config_json_is_read_too(tmp_path):
    """Files written before transformers 5 spell it rope_scaling (type) and rope_theta."""
    import json

    from specs.checkpoint import config_rope

    (tmp_path / "config.json").write_text(json.dumps({
        "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0,
                                                 "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192}}))
    assert config_rope(tmp_path) == {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope, message", [
    ({"method": "linear", "beta_fast": 8}, "rope method 'linear' takes no beta_fast"),
    ({"method": "yarn", "beta_fast": 1, "beta_slow": 2}, "must exceed rope.beta_slow"),
    ({"method": "llama3", "low_freq_factor": 4, "high_freq_factor": 2},
     "must exceed rope.low_freq_factor"),
    ({"method": "longrope"}, "needs short_factor and long_factor"),
    ({"method": "longrope", "short_factor": [1.0], "long_factor": [1.0, 2.0]},
     "rope.short_factor has 1 numbers; the model's head_dim 8 needs 4"),
    ({"method": "ntk"}, "method"),
    ({"method": "linear", "factor": 0.5}, "factor"),
])
def test_a_bad_rope_block_is_one_error_naming_the_field(tmp_path, rope, message):
    with pytest.raises(SpecError) as e:
        _run(tmp_path, rope)
    assert message in str(e.value) and "stages" in str(e.value)


def test_rope_theta_and_a_rope_block_together_are_refused(tmp_path):
    spec = mini_spec(tmp_path)
    spec["stages"][1].update(rope_theta=1e6, rope={"method": "yarn"})
    with pytest.raises(SpecError, match="give the stage's RoPE once"):
        validate_data(spec, RunSpec, source="test")


def test_what_transformers_only_logs_is_an_error_before_training(tmp_path):
    """A llama3 rule whose original context is not below the stage's length passes the RunSpec
    (each field is valid) but transformers logs it as wrong: preflight refuses it."""
    from ray_jobs.train.driver import rope_problems

    run = _run(tmp_path, {"method": "llama3", "original_max_position_embeddings": 4096})
    problems = rope_problems(run, tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith("stages[1] (s128).rope: transformers ")
    assert "original_max_position_embeddings field must be less than" in problems[0]
    assert rope_problems(_run(tmp_path, METHODS["yarn"]), tmp_path) == []
    config = LlamaConfig(hidden_size=32, num_attention_heads=4)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4}  # no factor
    with pytest.raises(ValueError, match="Missing required keys"):
        check_rope(config)


def test_every_resolved_method_is_accepted_by_transformers_without_a_warning(tmp_path):
    for method in METHODS:
        run = _run(tmp_path, METHODS[method])
        model = build_model(run, 1, None, seed=0, attn_implementation="sdpa")
        check_rope(model.config)  # raises on any warning transformers logs
        assert describe_rope(run.stage_rope(1)).split()[0] == method


def test_apply_rope_on_a_bf16_model_keeps_fp32_frequencies(tmp_path):
    run = _run(tmp_path, METHODS["yarn"])
    model = build_model(run, 1, None, seed=0, attn_implementation="sdpa").to(torch.bfloat16)
    apply_rope(model, run.stage_rope(1), seq_len=SEQ, pretrain_seq_len=NATIVE)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
