"""Model families: tiny Mistral, Qwen2 and Qwen3 built from their configs train on a ring of
2 (zigzag, FSDP2) exactly like the unsharded model; the spec's parameter count is the model's;
the exact-RoPE patch covers each family; unsupported checkpoints are refused up front."""

from __future__ import annotations

import json

import pytest
import torch

from ray_jobs.ring_attention.families import (
    UnsupportedModel,
    check_sliding_window,
    checkpoint_config,
    decoder_layers,
    spec_problems,
)
from tests.support.worlds import run_world
from tests.train import family_worlds as worlds

NEW_FAMILIES = ("mistral", "qwen2", "qwen3")


@pytest.mark.multiprocess
@pytest.mark.parametrize("family,ac", [("mistral", "full"), ("qwen2", "attention"),
                                       ("qwen3", "full")])
def test_ring_step_matches_the_unsharded_model(family, ac):
    """The existing Llama ring-step tolerances (tests/train/test_parallelize.py): loss rtol
    1e-5, gradients atol 1e-6."""
    want = worlds.reference(family)
    got = run_world(2, worlds.ring_step, family, ac, timeout_s=180)
    for rank, result in enumerate(got):
        assert result["loss"] == pytest.approx(want["loss"], rel=1e-5), f"rank {rank} loss"
        worlds.close(result["grads"], want["grads"], f"{family} rank {rank} gradients",
                     atol=1e-6)


@pytest.mark.multiprocess
def test_bf16_ring_step_matches_one_process_in_bf16():
    """Layers computing in bf16 (FSDP2 mixed precision, as on GPUs): the ring of 2 against the
    same parallelize() on one process (SDPA), for Qwen3 (QK-norm, head_dim != hidden/heads),
    within the bf16 tolerances of tests/ring_attention (3e-2) and tighter."""
    one = run_world(1, worlds.ring_step, "qwen3", "full", "bfloat16", timeout_s=120)[0]
    two = run_world(2, worlds.ring_step, "qwen3", "full", "bfloat16", timeout_s=180)
    for rank, result in enumerate(two):
        assert result["loss"] == pytest.approx(one["loss"], rel=1e-4), f"rank {rank} loss"
        worlds.close(result["grads"], one["grads"], f"bf16 rank {rank} gradients",
                     atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("family", [*NEW_FAMILIES, "llama"])
def test_spec_parameter_count_is_the_models(family):
    from topology.cost import StageShape, parameter_shapes

    spec = worlds.spec_of(family)
    model = worlds.build(family)
    assert spec.num_parameters == worlds.unique_parameters(model)
    # the cost model's per-weight list: the same weights, the same sizes
    shape = StageShape(seq_len=16, ring=1, dp=1, batch_size=1, grad_accum=1, steps=1,
                       **_shape_facts(spec))
    listed = {name: rows * row for name, rows, row in parameter_shapes(shape)}
    real = {n.removeprefix("model.").removesuffix(".weight"): p.numel()
            for n, p in model.named_parameters()}
    assert listed == real


def _shape_facts(m) -> dict:
    return dict(layers=m.num_hidden_layers, hidden=m.hidden_size,
                intermediate=m.intermediate_size, heads=m.num_attention_heads,
                kv_heads=m.num_key_value_heads, head_dim=m.head_dim, vocab=m.vocab_size,
                params=m.num_parameters, elem_bytes=4, qkv_bias=m.qkv_bias, o_bias=m.o_bias,
                qk_norm=m.qk_norm, tied=m.tie_word_embeddings)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_each_family_rotary_and_rotation_are_llamas(family):
    """The exact-RoPE patch replaces each family's rotary module by a Llama one and its
    module-level apply_rotary_pos_emb by ours: both must compute what the family's own do."""
    import importlib

    from ray_jobs.ring_attention.rope import (
        ROTARY_MODULES,
        ExactRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    config = worlds.build(family).config
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    own = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))(config)
    pos = torch.arange(40)[None]
    x = torch.zeros(1)
    for a, b in zip(own(x, pos), ExactRotaryEmbedding(config)(x, pos)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    q, k = torch.randn(2, 1, 4, 40, config.head_dim).unbind(0)
    cos, sin = own(x, pos)
    for a, b in zip(ROTARY_MODULES[module](q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    model = worlds.build(family)
    worlds._fill(model)  # materialize applies the stage's RoPE: the patch is installed
    assert isinstance(model.model.rotary_emb, ExactRotaryEmbedding)
    assert module.apply_rotary_pos_emb is apply_rotary_pos_emb


@pytest.mark.parametrize("family", [*NEW_FAMILIES, "llama"])
def test_decoder_layers_are_found_from_the_model(family):
    model = worlds.build(family)
    assert decoder_layers(model) is model.model.layers


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(UnsupportedModel, match="expected one list of decoder layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _save_config(tmp_path, family: str, **changes):
    config = worlds.build(family).config
    for k, v in changes.items():
        setattr(config, k, v)
    config.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_checkpoint_config_decides_the_family_and_must_match_the_spec(tmp_path, family):
    config = checkpoint_config(_save_config(tmp_path, family))
    assert config.model_type == family
    assert spec_problems(worlds.spec_of(family), config) == []
    llama = worlds.spec_of("llama")
    problems = spec_problems(llama, config)
    assert problems[0].startswith(f"model.architecture is 'llama' but the checkpoint's "
                                  f"config.json says '{family}'; set model.architecture")


def test_unsupported_model_type_is_refused_naming_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UnsupportedModel, match=r"model_type is 'gpt2': supported are llama, "
                                               r"mistral, qwen2, qwen3"):
        checkpoint_config(tmp_path)


def test_a_sliding_window_shorter_than_the_stage_is_refused(tmp_path):
    config = checkpoint_config(_save_config(tmp_path, "mistral", sliding_window=4096))
    check_sliding_window(config, 4096, "here")  # masks nothing at 4K
    with pytest.raises(UnsupportedModel, match="sliding_window 4096 is shorter than the "
                                               "stage's 8192 tokens"):
        check_sliding_window(config, 8192, "here")
    qwen = checkpoint_config(_save_config(tmp_path, "qwen2"))
    check_sliding_window(qwen, 1 << 20, "here")  # use_sliding_window false: no layer uses it


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gpt2"}, "model_type is 'gpt2': supported are llama, mistral, qwen2, qwen3"),
    ("qwen2", "model.path: model.architecture is 'llama' but the checkpoint's config.json says "
              "'qwen2'; set model.architecture: \"qwen2\""),
    ("mistral-4096", "sliding_window 4096 is shorter than the stage's 8192 tokens"),
])
def test_the_preflight_refuses_a_checkpoint_the_spec_cannot_train(tmp_path, capsys, config,
                                                                  message):
    from ray_jobs.train.driver import main
    from tests.train.conftest import mini_spec, write_spec

    model = tmp_path / "model"
    model.mkdir()
    if isinstance(config, dict):
        (model / "config.json").write_text(json.dumps(config))
    elif config == "qwen2":
        _save_config(model, "qwen2", vocab_size=512)
    else:
        _save_config(model, "mistral", sliding_window=4096, vocab_size=512)
    spec = mini_spec(tmp_path / "runs", **{"model.path": str(model)})
    if config == "mistral-4096":
        spec["model"].update(architecture="mistral", vocab_size=512)
        spec["stages"][1].update(seq_len=8192)
    path = write_spec(tmp_path / "run.yaml", spec)
    assert main(["--run", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_ring_attention_refuses_a_sliding_window_shorter_than_the_sequence():
    """The last guard, in the attention function itself (Mistral passes its window on every
    call): 8 local tokens on a ring of 2 are a 16-token sequence."""
    from types import SimpleNamespace

    from ray_jobs.ring_attention.comm import Ring
    from ray_jobs.ring_attention.hf import RING_ATTRIBUTE, ring_attention_forward

    module = SimpleNamespace(is_causal=True, **{RING_ATTRIBUTE: Ring(group=None, ranks=(0, 1))})
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"this layer's \(15 tokens\) is shorter than the "
                                         r"sequence \(16 tokens\)"):
        ring_attention_forward(module, q, q, q, None, sliding_window=15)
