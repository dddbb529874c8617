"""Per-rank bodies of the sequence-parallel inference tests, run in gloo worlds."""

from __future__ import annotations

import torch

from ray_jobs.eval.model import greedy_tokens
from ray_jobs.ring_attention.hf import attention_modules
from ray_jobs.ring_attention.inference import (
    CACHE_ATTRIBUTE,
    INFERENCE_ATTENTION,
    GangSession,
    greedy_generate,
    register_inference_attention,
)


def tiny_llama(vocab: int = 257, layers: int = 2, seed: int = 0, max_len: int = 32_768):
    """A tiny Llama with grouped-query attention (4 query heads, 2 K/V heads), the same weights
    in every process (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_len,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    return LlamaForCausalLM(config).eval()


def prompt_ids(length: int, vocab: int = 257, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def single_process(length: int, new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """The reference: one process, SDPA, HF's own KV cache."""
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([prompt_ids(length)])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    return logits, greedy_tokens(model, ids, new_tokens, eos=None)


def gang_body(rank: int, world: int, length: int, new_tokens: int) -> dict:
    register_inference_attention()
    model = tiny_llama()
    model.set_attn_implementation(INFERENCE_ATTENTION)
    ids = prompt_ids(length)
    session = GangSession(model, None, max_new_tokens=new_tokens)
    logits = session.prefill(ids, all_logits=True)
    tokens = greedy_generate(model, None, ids, new_tokens, eos=None)
    session2 = GangSession(model, None, max_new_tokens=new_tokens)
    session2.prefill(ids)
    # numpy, not tensors: a tensor crosses the result queue as shared memory that dies with
    # the rank's process.
    return {"logits": logits.numpy(), "tokens": tokens,
            "held": session2.cache.held, "local": session2.cache.local_tokens(),
            "caches_left": sum(hasattr(m, CACHE_ATTRIBUTE) for m in attention_modules(model))}
