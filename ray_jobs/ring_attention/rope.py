"""RoPE that keeps its accuracy at a million positions: exact angles, rotation in fp32.

    apply_exact_rope(model)        # model.model.rotary_emb -> ExactRotaryEmbedding (in place)

transformers' Llama (5.x) computes the angle p * inv_freq as an fp32 product, casts cos/sin to
the hidden states' dtype and rotates q and k in that dtype. Under the trainer's bf16 compute
(FSDP2 MixedPrecisionPolicy(param_dtype=bf16): the embedding's output, so cos/sin, q and k are
all bf16) that costs, at positions near 1,048,576 with head_dim 128 and the 1M stage's theta:

- the angle: an fp32 product of about 1e6 radians is off by up to half its ulp, 0.031 rad (its
  error grows with the position: 0.00024 rad at 8K), and the error differs from position to
  position, so two tokens at distance ~0 no longer see a rotation by their distance alone;
- the rotation: three bf16 roundings (q*cos, rotate_half(q)*sin, their sum) where bf16 storage
  of the rotated q costs one (at every position alike).

Measured against an fp64 reference, the rotated vector's worst component error relative to its
norm is 0.010 at 1M (bf16 storage alone: 0.0013); see docs/training.md, "RoPE at a million
positions" (`python -m ray_jobs.ring_attention.rope` prints its table), and
tests/train/test_rope_precision.py. Here the angle is the exact product of the position and the
model's fp32 inv_freq (in fp64, where it is exact below 2**29 positions), reduced modulo 2*pi
before it is cast to fp32; cos/sin stay fp32 and q, k are rotated in fp32 and cast back to their
own dtype, so the only rounding left is that of bf16 storage. cos/sin reach the decoder layers
in fp32 because parallelize() shards them with cast_forward_inputs=False (FSDP2's default would
cast them to bf16 at each layer).

inv_freq itself stays transformers' fp32 value: it is what every reader of the checkpoint
(transformers, vLLM) computes from rope_theta, and a frequency off by one fp32 ulp shifts every
relative position alike (the rotation still depends only on the distance).
"""

from __future__ import annotations

import math

import torch
from transformers.modeling_rope_utils import dynamic_rope_update
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

# transformers' own rotation, kept for inputs that need no upcast (bitwise its results)
_HF_APPLY_ROTARY = modeling_llama.apply_rotary_pos_emb
# The modeling modules of the supported families (ring_attention/families.py) and their own
# apply_rotary_pos_emb: each is a copy of Llama's (transformers' "Copied from" / modular
# files), as is each family's rotary module, so ExactRotaryEmbedding and the rotation below
# stand in for all of them (tests/train/test_families.py compares them).
ROTARY_MODULES = {m: m.apply_rotary_pos_emb
                  for m in (modeling_llama, modeling_mistral, modeling_qwen2, modeling_qwen3)}


# rope types whose frequencies transformers recomputes from the largest position it is given
LENGTH_DEPENDENT = ("dynamic", "longrope")


class ExactRotaryEmbedding(LlamaRotaryEmbedding):
    """LlamaRotaryEmbedding whose cos/sin are those of the exact angle (position x inv_freq in
    fp64, reduced mod 2*pi) and are returned in fp32 whatever the hidden states' dtype; the
    rotation (apply_rotary_pos_emb, patched by apply_exact_rope) then runs in fp32.

    `length`: the length of the sequences this module's positions belong to (a training stage's
    seq_len). For 'dynamic' and 'longrope', whose frequencies transformers recomputes from the
    largest position of each call, they are computed once for `length` instead: a rank of a
    ring sees only its own shard's positions, and would otherwise rotate by frequencies of its
    own. None: transformers' behaviour (each call's own length), for one process holding whole
    sequences."""

    def __init__(self, config, device=None, length: int | None = None):
        super().__init__(config)
        self.length = length
        if length is not None and self.rope_type in LENGTH_DEPENDENT:
            inv_freq, self.attention_scaling = self.rope_init_fn(config, device, seq_len=length)
            self.inv_freq = torch.nn.Buffer(inv_freq, persistent=False)
        if device is not None:
            self.to(device)

    @property
    def rope_init_fn(self):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.rope_type == "default":
            return self.compute_default_rope_parameters
        return ROPE_INIT_FUNCTIONS[self.rope_type]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.length is None or self.rope_type not in LENGTH_DEPENDENT:
            return self._adaptive_forward(x, position_ids)
        return self._tables(x, position_ids)

    @dynamic_rope_update
    def _adaptive_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self._tables(x, position_ids)

    def _tables(self, x: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        angles = exact_angles(position_ids, self.inv_freq.to(x.device))  # (B, S, D/2) fp32
        emb = torch.cat((angles, angles), dim=-1)  # (B, S, D)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def exact_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """position x inv_freq mod 2*pi, as fp32 (B, S, D/2): the product is formed in fp64, where
    an fp32 frequency (24 bits) times a position below 2**29 is exact, so the only rounding is
    the final fp32 cast of an angle below 2*pi (at most 2.4e-7 rad)."""
    if inv_freq.dtype != torch.float32:
        raise TypeError(f"rotary inv_freq is {inv_freq.dtype}, not float32: the model was cast "
                        "after its rotary embedding was built; call apply_exact_rope (or "
                        "apply_rope_theta) after any .to(dtype)")
    product = position_ids[..., None].to(torch.float64) * inv_freq.to(torch.float64)
    return torch.remainder(product, 2 * math.pi).to(torch.float32)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb, except that when cos/sin are wider than q and k (fp32
    tables, bf16 q/k) the rotation runs in the tables' dtype and q, k come back in their own:
    one rounding instead of three, and no fp32 q/k outlive the rotation. Any other inputs go to
    transformers' function unchanged (the same bits)."""
    if torch.promote_types(q.dtype, cos.dtype) == q.dtype and \
            torch.promote_types(k.dtype, cos.dtype) == k.dtype:
        return _HF_APPLY_ROTARY(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x*cos promotes to the tables' dtype without a widened copy of x; rotate_half only moves
    # and negates x (exact in any dtype); the sum is accumulated in place: at most one wide
    # (B, H, S, D) buffer exists, about what the three narrow temporaries of the original took.
    out = x * cos
    out.addcmul_(rotate_half(x), sin)
    return out.to(x.dtype)


def apply_exact_rope(model: torch.nn.Module, length: int | None = None) -> None:
    """Replace a Hugging Face Llama's (Mistral's, Qwen's) rotary embedding by an
    ExactRotaryEmbedding of its config (same inv_freq, same device; `length`: see the class)
    and route the attention's rotation through apply_rotary_pos_emb above. The latter is a
    process-wide swap of the module-level function that each family's attention forward calls
    (transformers offers no per-model hook for it); it is a no-op for every model whose cos/sin
    have q's dtype, i.e. any model not built here."""
    old = model.model.rotary_emb
    model.model.rotary_emb = ExactRotaryEmbedding(model.config, old.inv_freq.device,
                                                  length=length)
    install_exact_rotation()


def fix_rope_length(model: torch.nn.Module, length: int) -> None:
    """For a model whose RoPE depends on the sequence's length (dynamic, longrope): rotate by the
    frequencies of `length` tokens on this rank, whatever positions it holds. Ring inference
    calls it with the length one process would see (the prompt's, then each decoded token's
    position + 1), so every rank of a gang rotates as transformers does in one process. A no-op
    for every other rule."""
    rotary = model.model.rotary_emb
    if rotary.rope_type in LENGTH_DEPENDENT and getattr(rotary, "length", None) != length:
        model.model.rotary_emb = ExactRotaryEmbedding(model.config, rotary.inv_freq.device,
                                                      length=length)
        install_exact_rotation()


def install_exact_rotation() -> None:
    """Point the attention of transformers' Llama, Mistral, Qwen2 and Qwen3 at
    apply_rotary_pos_emb above (idempotent)."""
    for module, original in ROTARY_MODULES.items():
        current = module.apply_rotary_pos_emb
        if current is apply_rotary_pos_emb:
            continue
        if current is not original:
            raise RuntimeError(f"transformers' {module.__name__}.apply_rotary_pos_emb was "
                               f"already replaced by {current!r}; RoPE in fp32 cannot wrap two "
                               "patches, remove the other one")
        module.apply_rotary_pos_emb = apply_rotary_pos_emb


def measure(theta: float, end: int, *, tokens: int = 1024, heads: int = 4, head_dim: int = 128,
            seed: int = 0) -> dict[str, float]:
    """Errors of each way of rotating bf16 q/k at positions end-tokens..end-1 against an fp64
    rotation by the model's fp32 frequencies (docs/training.md, "RoPE at a million positions").
    Vector errors: worst component error / the vector's norm; logit errors: worst |q.k| error /
    (|q||k|), keys at the same positions (distance ~0) or at 0..tokens-1 (distance ~end)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    hf, exact = LlamaRotaryEmbedding(config), ExactRotaryEmbedding(config)
    inv_freq = hf.inv_freq
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, heads, tokens, head_dim, generator=g).bfloat16() for _ in range(2))
    near, far = torch.arange(end - tokens, end), torch.arange(tokens)
    bf16 = torch.zeros(1, dtype=torch.bfloat16)

    def reference(x, pos):
        a = pos[:, None].double() * inv_freq.double()
        e, x = torch.cat((a, a), -1), x.double()
        return x * e.cos() + rotate_half(x) * e.sin()

    def ways(x, pos):
        cos, sin = hf(bf16, pos[None])  # transformers under bf16 compute
        c32, s32 = exact(bf16, pos[None])
        return {"transformers": _HF_APPLY_ROTARY(x, x, cos, sin)[0],
                "exact angle, bf16 rotation": _HF_APPLY_ROTARY(x, x, c32.bfloat16(),
                                                               s32.bfloat16())[0],
                "transformers angle, fp32 rotation": _rotate(x, *(t.float().unsqueeze(1) for t in
                                                                  hf(torch.zeros(1), pos[None]))),
                "trainer": apply_rotary_pos_emb(x, x, c32, s32)[0],
                "bf16 storage": reference(x, pos).bfloat16()}

    def vector(x, ref):
        return ((x.double() - ref).abs().amax(-1) / ref.norm(dim=-1)).max().item()

    def logit(qx, kx, qr, kr):
        diff = qx.double() @ kx.double().transpose(-1, -2) - qr @ kr.transpose(-1, -2)
        return (diff.abs() / (qr.norm(dim=-1)[..., :, None] * kr.norm(dim=-1)[..., None, :])
                ).max().item()

    angle = (near[:, None].float() * inv_freq).double() - near[:, None].double() * inv_freq.double()
    q_ref, k_near_ref, k_far_ref = reference(q, near), reference(k, near), reference(k, far)
    cos_ref = torch.cat([near[:, None].double() * inv_freq.double()] * 2, -1).cos()
    out = {"fp32 angle error (rad)": angle.abs().max().item(),
           "bf16 cos error": (hf(bf16, near[None])[0][0].double() - cos_ref).abs().max().item()}
    qs, kn, kf = ways(q, near), ways(k, near), ways(k, far)
    for name in qs:
        out[f"{name}: vector"] = vector(qs[name], q_ref)
        out[f"{name}: logit d~0"] = logit(qs[name], kn[name], q_ref, k_near_ref)
        out[f"{name}: logit d~{end:,}"] = logit(qs[name], kf[name], q_ref, k_far_ref)
    return out


def render_table(theta: float, ends: tuple[int, ...] = (8192, 65536, 262144, 1_048_576)
                 ) -> str:
    """measure() at each window end as a Markdown table (the docs' table)."""
    rows = ["| positions up to | fp32 angle error (rad) | transformers | exact angle, bf16 "
            "rotation | fp32 angle, fp32 rotation | **trainer** | bf16 storage | logit d~0: "
            "transformers / trainer / storage | logit d~p: transformers / trainer / storage |",
            "|" + "---|" * 9]
    for end in ends:
        m = measure(theta, end)
        far = f"logit d~{end:,}"
        rows.append(
            f"| {end:,} | {m['fp32 angle error (rad)']:.2g} | {m['transformers: vector']:.2g} | "
            f"{m['exact angle, bf16 rotation: vector']:.2g} | "
            f"{m['transformers angle, fp32 rotation: vector']:.2g} | "
            f"**{m['trainer: vector']:.2g}** | {m['bf16 storage: vector']:.2g} | "
            + " / ".join(f"{m[f'{w}: logit d~0']:.2g}" for w in
                         ("transformers", "trainer", "bf16 storage")) + " | "
            + " / ".join(f"{m[f'{w}: {far}']:.2g}" for w in
                         ("transformers", "trainer", "bf16 storage")) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    from specs.loading import load_model
    from specs.run import RunSpec

    recipe = load_model("configs/llama3-8b-1m.yaml", RunSpec)
    theta = recipe.stage_theta(len(recipe.stages) - 1)
    print(f"theta {theta:,.0f} (llama3-8b-1m, stage {recipe.stages[-1].name}), head_dim 128, "
          "1024 tokens x 4 heads of bf16 N(0, 1) q and k per window")
    print(render_table(theta))
