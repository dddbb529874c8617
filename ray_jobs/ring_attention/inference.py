"""Sequence-parallel inference for Hugging Face Llama: ring prefill, sharded KV cache, decoding.

Prefill: every rank of a ring runs the model forward on its zigzag shard of the prompt with the
same exact ring attention as training (forward only, under `torch.inference_mode`, so no autograd
graph is kept) and keeps the K/V of its own shard, per layer, where they were computed. No rank
ever holds the whole prompt's K/V.

Decoding: the new token's hidden state is computed on every rank (identical inputs, identical
weights: the token's own layers are replicated, they are tiny next to the cache). In each
layer every rank attends the token's query to its local K/V shard and gets a partial output and
its log-sum-exp; one all-gather per layer brings every rank's (out, lse) and each rank merges
them in ring order, the same fp32 log-sum-exp merge as the ring. The token's own K/V are
appended on one rank only: the one holding the fewest tokens (ties: the lowest ring position),
so shards stay balanced and no K/V is counted twice.

A prompt whose length is not a multiple of 2P (zigzag needs 2P equal chunks) is prefilled up to
the largest multiple and its remaining (< 2P) tokens go through the decoding path one by one,
which is exact too: nothing is padded.

Use:
    register_inference_attention(); model.set_attn_implementation(INFERENCE_ATTENTION)
    session = GangSession(model, ring, max_new_tokens=32)
    next_logits = session.prefill(prompt_ids)         # (vocab,), the same on every rank
    logits = session.step(token)                      # one decoding step
or `greedy_generate(model, ring, prompt_ids, max_new_tokens, eos)`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from ray_jobs.ring_attention.comm import Ring, resolve_ring
from ray_jobs.ring_attention.hf import attention_modules
from ray_jobs.ring_attention.kernels import build_block_kernel, merge_block
from ray_jobs.ring_attention.ring import ring_attention
from ray_jobs.ring_attention.rope import fix_rope_length
from ray_jobs.ring_attention.zigzag import zigzag_position_ids, zigzag_shard, zigzag_unshard

INFERENCE_ATTENTION = "ring_inference"


class ShardedKVCache:
    """This rank's K/V per layer, (B, capacity, kv_heads, D) buffers filled up to `length`, and
    how many tokens every ring position holds (the same bookkeeping on every rank)."""

    def __init__(self, ring: Ring, extra_tokens: int):
        self.ring, self.extra = ring, extra_tokens
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length: dict[int, int] = {}
        self.held = [0] * ring.size  # tokens per ring position
        self.mode = "prefill"
        self.owner = 0  # ring position that appends the current decoding token

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        b, s, h, d = k.shape
        self.k[layer] = k.new_empty((b, s + self.extra, h, d))
        self.v[layer] = v.new_empty((b, s + self.extra, h, d))
        self.k[layer][:, :s].copy_(k)
        self.v[layer][:, :s].copy_(v)
        self.length[layer] = s

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = self.length[layer]
        if n + k.shape[1] > self.k[layer].shape[1]:
            raise RuntimeError(f"sharded KV cache full ({n} tokens on this rank); decode fewer "
                               f"than {self.extra} tokens per prompt")
        self.k[layer][:, n:n + k.shape[1]].copy_(k)
        self.v[layer][:, n:n + k.shape[1]].copy_(v)
        self.length[layer] = n + k.shape[1]

    def local(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.length[layer]
        return self.k[layer][:, :n], self.v[layer][:, :n]

    def begin_decode_token(self) -> None:
        self.mode = "decode"
        self.owner = min(range(self.ring.size), key=lambda r: (self.held[r], r))

    def end_decode_token(self) -> None:
        self.held[self.owner] += 1

    def local_tokens(self) -> int:
        return self.held[self.ring.rank]


# The attribute of an attention module holding the session's cache while the session runs the
# model (as "ring" attention finds its ring: per model, no process-global), and only then, so a
# finished prompt's K/V are not kept alive by the model.
CACHE_ATTRIBUTE = "ring_inference_cache"


@contextmanager
def _cache_bound(model, cache: ShardedKVCache) -> Iterator[ShardedKVCache]:
    modules = attention_modules(model)
    for module in modules:
        setattr(module, CACHE_ATTRIBUTE, cache)
    try:
        yield cache
    finally:
        for module in modules:
            delattr(module, CACHE_ATTRIBUTE)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, ring: Ring) -> torch.Tensor:
    """Exact attention output from every rank's partial (out (B, S, H, D), lse (B, S, H) fp32):
    one all-gather of both, merged in ring order (identical on every rank)."""
    b, s, h, d = out.shape
    packed = torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(ring.size)]
    dist.all_gather(parts, packed, group=ring.group)
    group_ranks = (dist.get_process_group_ranks(ring.group) if ring.group is not None
                   else list(range(dist.get_world_size())))
    by_global = dict(zip(group_ranks, parts))
    ordered = [by_global[g] for g in ring.ranks]
    acc, acc_lse = ordered[0][..., :d].clone(), ordered[0][..., d].clone()
    for part in ordered[1:]:
        merge_block(acc, acc_lse, part[..., :d], part[..., d])
    return acc.to(out.dtype)


def inference_attention_forward(module, query, key, value, attention_mask, scaling=None,
                                dropout=0.0, **kwargs):
    """transformers attention function for sequence-parallel inference (see the module doc):
    (B, H, S, D) after RoPE in, ((B, S, H, D), None) out."""
    cache = getattr(module, CACHE_ATTRIBUTE, None)
    if cache is None:
        raise RuntimeError(f'attn_implementation="{INFERENCE_ATTENTION}" runs only inside '
                           "GangSession.prefill/step (it needs the sharded KV cache)")
    dtype = value.dtype
    q, k, v = (query.transpose(1, 2).to(dtype), key.transpose(1, 2).to(dtype),
               value.transpose(1, 2))
    layer = module.layer_idx
    if cache.mode == "prefill":
        out = ring_attention(q, k, v, group=cache.ring, causal=True, scale=scaling)
        cache.store(layer, k, v)
        return out, None
    if cache.ring.rank == cache.owner:
        cache.append(layer, k, v)
    keys, values = cache.local(layer)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out, lse = build_block_kernel(q.device).forward(q, keys, values, False, scale)
    return merge_partials(out, lse, cache.ring), None


def register_inference_attention() -> str:
    """Register the sequence-parallel inference attention with transformers."""
    from transformers import AttentionInterface

    AttentionInterface.register(INFERENCE_ATTENTION, inference_attention_forward)
    return INFERENCE_ATTENTION


class PromptTooShort(ValueError):
    """A prompt shorter than the 2P tokens zigzag prefill over P ranks needs."""


class GangSession:
    """One prompt's prefill and decoding on this rank of a ring (every rank calls the same
    methods with the same arguments, in the same order)."""

    def __init__(self, model, ring: "Ring | dist.ProcessGroup | None", max_new_tokens: int):
        self.model, self.ring = model, resolve_ring(ring)
        self.device = next(model.parameters()).device
        self.cache = ShardedKVCache(self.ring, extra_tokens=max_new_tokens + 2 * self.ring.size)
        self.position = 0
        self.prompt_tokens = 0

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: int):
        with _cache_bound(self.model, self.cache), torch.inference_mode():
            return self.model(input_ids=ids.to(self.device), position_ids=positions.to(
                self.device)[None], use_cache=False, logits_to_keep=keep).logits

    def prefill(self, prompt: "list[int] | torch.Tensor", all_logits: bool = False
                ) -> torch.Tensor:
        """Prefill the prompt; the next token's logits (vocab,) on every rank, or with
        `all_logits` the logits of every prompt position (S, vocab) (for checks: the whole
        sequence's logits gathered on every rank)."""
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
        size, rank = self.ring.size, self.ring.rank
        self.prompt_tokens = ids.shape[1]  # a length-dependent RoPE's length (fix_rope_length)
        fix_rope_length(self.model, self.prompt_tokens)
        main = ids.shape[1] - ids.shape[1] % (2 * size)
        if main == 0:
            raise PromptTooShort(f"a prompt of {ids.shape[1]} tokens is too short for a gang of "
                                 f"{size}: zigzag prefill needs at least {2 * size} tokens; "
                                 "evaluate it on one evaluator")
        self.cache.mode = "prefill"
        logits = self._forward(zigzag_shard(ids[:, :main], 1, rank, size),
                               zigzag_position_ids(main, rank, size), 0 if all_logits else 1)
        self.cache.held = [main // size] * size
        self.position = main
        if all_logits:
            rows = [zigzag_unshard(logits[0].float().contiguous(), 0, size, self.ring)]
        else:
            # The last prompt position (chunk 2P-1) is ring position 0's last row.
            last = logits[0, -1].float().contiguous()
            dist.broadcast(last, src=self.ring.ranks[0], group=self.ring.group)
            rows = [last[None]]
        for token in ids[0, main:].tolist():  # the remainder, exactly, through decoding
            rows.append(self.step(token)[None])
        return torch.cat(rows) if all_logits else rows[-1][0]

    def step(self, token: int) -> torch.Tensor:
        """Feed one token at the next position; its next-token logits (vocab,) on every rank."""
        self.cache.begin_decode_token()
        fix_rope_length(self.model, max(self.prompt_tokens, self.position + 1))
        logits = self._forward(torch.tensor([[token]]), torch.tensor([self.position]), 1)
        self.cache.end_decode_token()
        self.position += 1
        return logits[0, -1].float()


def greedy_generate(model, ring: "Ring | dist.ProcessGroup | None", prompt: list[int],
                    max_new_tokens: int, eos: int | None) -> list[int]:
    """Greedy continuation (stops at `eos`), computed by the ring; the same list on every rank.
    Each step's token is ring position 0's argmax, broadcast, so ranks cannot drift apart."""
    session = GangSession(model, ring, max_new_tokens)
    logits, new = session.prefill(prompt), []
    for _ in range(max_new_tokens):
        token = torch.tensor([int(logits.argmax())])
        dist.broadcast(token, src=session.ring.ranks[0], group=session.ring.group)
        if int(token) == eos:
            break
        new.append(int(token))
        if len(new) == max_new_tokens:
            break
        logits = session.step(int(token))
    return new
