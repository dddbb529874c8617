"""Rank bodies of the model-family tests (spawned processes import them by module name): a tiny
model of each family built the trainer's way from a ModelSpec, one training step."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ray_jobs.ring_attention import sequence_position_ids, sequence_shard
from ray_jobs.train.model import build_meta_model, init_weights, llama_config, materialize
from ray_jobs.train.parallelize import build_mesh, parallelize, ring_mean_loss
from specs.degrees import ParallelDims
from specs.run import ModelSpec

VOCAB, SEQ, BATCH, THETA = 128, 16, 2, 10_000.0
ROPE = {"rope_type": "default", "rope_theta": THETA}
WRAPPED = "_checkpoint_wrapped_module."

# Each family's shape facts that differ from Llama's, at tiny size (hidden 32, 4 query heads,
# 2 K/V heads: GQA 2:1).
FAMILIES = {
    # Mistral with a sliding window as long as the sequence: transformers builds its sliding
    # mask for the reference, ring attention receives the window and must accept it
    "mistral": {"architecture": "mistral", "sliding_window": SEQ},
    # Qwen2: q/k/v biases (hard-coded by transformers), tied embeddings (as Qwen2.5-0.5B)
    "qwen2": {"architecture": "qwen2", "tie_word_embeddings": True},
    # Qwen3: QK-norm, head_dim 16 != 32 / 4, biases on q/k/v/o
    "qwen3": {"architecture": "qwen3", "head_dim": 16, "attention_bias": True},
    "llama": {"architecture": "llama"},
}


def spec_of(family: str) -> ModelSpec:
    return ModelSpec(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     rope_theta=THETA, pretrain_seq_len=SEQ, **FAMILIES[family])


def build(family: str, dtype=torch.float32):
    """The family's model as the trainer builds it: config from the spec, meta, storage, RoPE
    for the stage, weights drawn from seed 0 (the same in every layout)."""
    model = build_meta_model(llama_config(spec_of(family), SEQ, ROPE), dtype)
    return model


def _fill(model) -> None:
    materialize(model, "cpu", ROPE, SEQ, SEQ)
    init_weights(model, seed=0)


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels


def unique_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def reference(family: str) -> dict:
    """One fp32 step of the unsharded model in one process (SDPA, transformers' causal or
    sliding mask, its own loss): loss and gradients by Hugging Face name."""
    model = build(family)
    _fill(model)
    model.set_attn_implementation("sdpa")
    ids, labels = batch()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return {"loss": loss.item(), "params": unique_parameters(model),
            "grads": {n: p.grad.float().numpy().copy() for n, p in model.named_parameters()}}


def ring_step(rank, world, family: str, ac: str, compute: str | None = None) -> dict:
    """One step of the family's model on a ring of `world` ranks (zigzag shards, FSDP2 over
    the ring, activation checkpointing `ac`, the chunked loss; world 1: no ring, SDPA), layers
    computing in `compute` (None: fp32): loss and full gradients."""
    dims = ParallelDims.of(world, 1, world)
    layout = build_mesh(dims, [list(range(world))], "cpu")
    model = build(family)
    model.set_attn_implementation("sdpa")  # parallelize() switches it to "ring" when world > 1
    root = parallelize(model, layout, activation_checkpointing=ac,
                       mixed_precision=getattr(torch, compute) if compute else None,
                       loss_chunk_tokens=8)
    _fill(model)
    assert model.config._attn_implementation == ("ring" if world > 1 else "sdpa")
    ids, labels = batch()
    place = (layout.ring_rank, world, 0, 1)
    x, y = (sequence_shard(t, 1, *place) for t in (ids, labels))
    pos = sequence_position_ids(SEQ, *place).unsqueeze(0).expand(BATCH, -1)
    loss = ring_mean_loss(*root(x, pos, y), layout.sequence)
    (loss * world).backward()  # FSDP averages over the ranks: the ring's shares must add
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return {"loss": mean.item() / world,
            "grads": {n.replace(WRAPPED, ""): p.grad.full_tensor().float().numpy().copy()
                      for n, p in root.model.named_parameters()}}


def close(got: dict, want: dict, what: str, atol: float, rtol: float = 1e-4) -> None:
    assert sorted(got) == sorted(want), what
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=rtol,
                                   err_msg=f"{what}: {name}")
