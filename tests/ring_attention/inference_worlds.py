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

# dynamic NTK from a 256-token original: its base grows with the sequence, so each rank of a
# gang, seeing only its own positions, would rotate by frequencies of its own
DYNAMIC = {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 1.0}


def tiny_llama(vocab: int = 257, layers: int = 2, seed: int = 0, max_len: int = 32_768,
               rope: dict | None = None):
    """A tiny Llama with grouped-query attention (4 query heads, 2 K/V heads), the same weights
    in every process (seeded). `rope`: a length-dependent rule (DYNAMIC), with the exact-angle
    rotary module the evaluator loads, following each call's length as transformers does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_jobs.ring_attention.rope import apply_exact_rope

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256 if rope else max_len,
                         rope_parameters=rope or {"rope_type": "default",
                                                  "rope_theta": 10_000.0})
    model = LlamaForCausalLM(config).eval()
    if rope:
        apply_exact_rope(model)
    return model


def prompt_ids(length: int, vocab: int = 257, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def single_process(length: int, new_tokens: int, rope: dict | None = None
                   ) -> tuple[torch.Tensor, list[int]]:
    """The reference: one process, SDPA, HF's own KV cache."""
    model = tiny_llama(rope=rope)
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([prompt_ids(length)])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    return logits, greedy_tokens(tiny_llama(rope=rope).eval(), ids, new_tokens, eos=None)


def gang_body(rank: int, world: int, length: int, new_tokens: int, rope: dict | None = None
              ) -> dict:
    register_inference_attention()
    model = tiny_llama(rope=rope)
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
