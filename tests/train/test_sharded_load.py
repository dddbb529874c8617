"""Sharded loading (issue 33): the model is built on the meta device, sharded, and each rank
fills only its shards, from a Hugging Face checkpoint, a DCP checkpoint or a new draw; every
layout gets bitwise the weights of the unsharded model, and no rank holds the whole of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from ray_jobs.train.model import (
    build_meta_model,
    init_weights,
    load_hf_weights,
    materialize,
    weights_checksum,
)
from specs.checkpoint import CheckpointError
from tests.support import worlds
from tests.support.worlds import run_world

THETA, SEQ = 50000.0, 64
# Small enough that a rank's shard starts and ends inside an init block and is read in many
# chunks: the tiny model exercises what the defaults do to a real one.
BLOCK_ELEMENTS, CHUNK_BYTES = 100, 1000


def tiny_config() -> LlamaConfig:
    # odd vocabulary and intermediate sizes: shards of unequal rows, and 7 rows over 2 ranks
    return LlamaConfig(vocab_size=131, hidden_size=32, intermediate_size=56,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=SEQ, pad_token_id=3, tie_word_embeddings=False)


def whole(config: LlamaConfig, fill) -> LlamaForCausalLM:
    """The unsharded model in this process, filled by `fill(model)`."""
    config._attn_implementation = "sdpa"
    model = build_meta_model(config, torch.float32)
    materialize(model, "cpu", {"rope_type": "default", "rope_theta": THETA}, SEQ, SEQ)
    fill(model)
    return model


def reference_loss(state: dict[str, torch.Tensor], dp: int) -> float:
    """The loss of worlds.sample_batch on the unsharded model holding `state`."""
    model = whole(tiny_config(), lambda m: m.load_state_dict(state))
    ids, labels = worlds.sample_batch(dp, 131, SEQ)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A Hugging Face checkpoint of a trained-looking tiny Llama (HF's own init, then moved off
    it), and a DCP checkpoint written from it by a ring of 2."""
    root = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # norms off 1: a loader that skips one shows
    model.save_pretrained(root / "hf", safe_serialization=True)
    run_world(2, worlds.save_sharded_checkpoint, 2, 1, 2, str(root / "hf"), str(root / "dcp"),
              THETA, SEQ, timeout_s=180)
    return {"hf": root / "hf", "dcp": root / "dcp",
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _assert_bitwise(got: dict[str, np.ndarray], want: dict[str, torch.Tensor], what: str):
    assert sorted(got) == sorted(want), what
    for name, value in want.items():
        assert torch.equal(torch.from_numpy(got[name]), value), f"{what}: {name} differs"


@pytest.mark.parametrize("world,ring,dp,shard", [
    (2, 2, 1, 2),  # one ring of 2, sharded over it (the tiny default's layout)
    (2, 1, 2, 2),  # plain FSDP over two data-parallel ranks
    (2, 1, 2, 1),  # HSDP: two replicas of a one-rank shard group (each holds everything)
    (1, 1, 1, 1),  # a world of one
])
def test_every_layout_fills_bitwise_the_unsharded_weights(checkpoints, world, ring, dp, shard):
    config = tiny_config()
    fills = {"hf": (None, str(checkpoints["hf"]), 0, None),
             "dcp": (None, str(checkpoints["hf"]), 0, str(checkpoints["dcp"])),
             "new": (config, None, 11, None)}
    got = run_world(world, worlds.sharded_weights, ring, dp, shard, fills, THETA, SEQ,
                    BLOCK_ELEMENTS, CHUNK_BYTES, timeout_s=180)
    new = whole(tiny_config(), lambda m: init_weights(m, 11, block_elements=BLOCK_ELEMENTS))
    want = {"hf": checkpoints["state"], "dcp": checkpoints["state"],
            "new": {k: v.detach() for k, v in new.state_dict().items()}}
    inv_freq = 1.0 / THETA ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    for label, state in want.items():
        _assert_bitwise(got[0][label]["state"], state, f"{label} in {ring}x{dp}/{shard}")
        # the whole model's sum of |w|, on every rank, each element counted once (HSDP too)
        total = float(sum(v.double().abs().sum() for v in state.values()))
        for rank in range(world):
            assert got[rank][label]["checksum"] == pytest.approx(total, rel=1e-12), label
        # training computes from what was filled (FSDP all-gathers its own storage)
        assert got[0][label]["loss"] == pytest.approx(reference_loss(state, dp), rel=1e-5)
        # RoPE's non-persistent buffer is rebuilt for the stage after to_empty
        assert torch.allclose(torch.from_numpy(got[0][label]["inv_freq"]), inv_freq)
    # and each rank held only its rows: the embedding's 131 over the shard group
    rows = got[0]["new"]["local_shapes"]["model.embed_tokens.weight"][0]
    assert rows == (131 if shard == 1 else 66)


def test_a_new_model_is_drawn_as_hugging_face_initialises_llama():
    a = whole(tiny_config(), lambda m: init_weights(m, 5))
    b = whole(tiny_config(), lambda m: init_weights(m, 5, block_elements=BLOCK_ELEMENTS))
    c = whole(tiny_config(), lambda m: init_weights(m, 6))
    embed = a.model.embed_tokens.weight.detach()
    assert torch.equal(embed[3], torch.zeros(32))  # the padding row, as nn.Embedding's
    assert float(embed.std()) == pytest.approx(0.02, rel=0.05)
    down = a.model.layers[0].mlp.down_proj.weight.detach()
    assert float(down.std()) == pytest.approx(0.02, rel=0.05)
    assert all(torch.equal(n.weight, torch.ones(32)) for n in
               (a.model.norm, a.model.layers[1].input_layernorm))
    q = a.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, a.model.layers[1].self_attn.q_proj.weight)  # seeded per name
    assert not torch.equal(q, c.model.layers[0].self_attn.q_proj.weight)  # and per seed
    # blocks of other sizes are other draws of the same distribution
    assert not torch.equal(q, b.model.layers[0].self_attn.q_proj.weight)
    other_q = b.model.layers[0].self_attn.q_proj.weight.detach()
    assert float(other_q.std()) == pytest.approx(0.02, rel=0.1)


def test_the_checksum_of_a_whole_model_is_its_sum_of_absolute_weights():
    model = whole(tiny_config(), lambda m: init_weights(m, 1))
    want = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    assert weights_checksum(model) == pytest.approx(want, rel=1e-12)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    assert weights_checksum(model) != pytest.approx(want, rel=1e-9)


def test_a_checkpoint_missing_a_tensor_is_one_error_naming_it(checkpoints, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoints["hf"] / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        whole(tiny_config(), lambda m: load_hf_weights(m, tmp_path))


def test_a_checkpoint_of_other_shapes_is_one_error_naming_them(checkpoints, tmp_path):
    other = tiny_config()
    other.intermediate_size = 64
    LlamaForCausalLM(other).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(CheckpointError, match=r"other shapes: model\.layers\.0\.mlp\.gate_proj"
                                              r"\.weight \(64, 32\) \(model \(56, 32\)\)"):
        whole(tiny_config(), lambda m: load_hf_weights(m, tmp_path))


def test_a_folder_without_safetensors_is_one_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files; give a Hugging Face"):
        whole(tiny_config(), lambda m: load_hf_weights(m, tmp_path))


def test_a_damaged_safetensors_file_is_one_error_naming_it(checkpoints, tmp_path):
    data = (checkpoints["hf"] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors "
                                              r"file .*; restore the file save_pretrained wrote"):
        whole(tiny_config(), lambda m: load_hf_weights(m, tmp_path))


def test_tied_embeddings_load_from_a_checkpoint_that_stores_them_once(tmp_path):
    config = tiny_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    want = LlamaForCausalLM.from_pretrained(tmp_path)
    got = whole(LlamaConfig.from_pretrained(tmp_path), lambda m: load_hf_weights(m, tmp_path))
    assert got.lm_head.weight is got.model.embed_tokens.weight
    for name, value in want.state_dict().items():
        if not name.endswith("inv_freq"):
            assert torch.equal(got.state_dict()[name], value), name


# A model of real width (Llama-2 7B's hidden and intermediate sizes and vocabulary, 2 layers):
# 221M parameters, 844 MB in fp32.
BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
           num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
OVERHEAD = 200 << 20  # the read chunks, the checksum's pieces, allocator slack


def test_a_rank_holds_its_share_of_the_model_never_the_whole(tmp_path):
    config = LlamaConfig(**BIG)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.empty(s).uniform_(-0.02, 0.02, generator=gen) for k, s in shapes.items()},
              str(tmp_path / "model.safetensors"))
    config.save_pretrained(tmp_path)
    full = sum(torch.Size(s).numel() * 4 for s in shapes.values())
    # fresh processes: VmHWM is a high-water mark per process (reset before the load)
    peaks = run_world(2, worlds.peak_memory_of_load, 1, 2, 2, str(tmp_path), THETA, SEQ,
                      timeout_s=240)
    for rank, peak in enumerate(peaks):
        assert full / 2 <= peak < full / 2 + OVERHEAD, (
            f"rank {rank} rose by {peak / 2**20:.0f} MB loading a {full / 2**20:.0f} MB model "
            f"(its share {full / 2 / 2**20:.0f} MB + {OVERHEAD >> 20} MB allowed)")
