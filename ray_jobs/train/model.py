"""The Llama being extended: built from the RunSpec or a checkpoint, RoPE set per stage."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from specs.run import ModelSpec, RunSpec
from specs.trust import check_checkpoint_is_data


def llama_config(m: ModelSpec, seq_len: int, theta: float) -> LlamaConfig:
    """The LlamaConfig of a ModelSpec's architecture (a model built without model.path, and the
    shapes the memory trace uses)."""
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        max_position_embeddings=max(seq_len, m.pretrain_seq_len),
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )


def build_model(run: RunSpec, stage_index: int, init_from: Path | None, *, seed: int,
                attn_implementation: str, spec_dir: Path | None = None) -> LlamaForCausalLM:
    """The model a stage starts from: a checkpoint (the previous stage's final or this stage's
    latest), else model.path, else a fresh tiny Llama from `seed`; RoPE set for the stage."""
    stage = run.stages[stage_index]
    theta = run.stage_theta(stage_index)
    dtype = getattr(torch, run.model.dtype)
    source = init_from
    if source is None and run.model.path is not None:
        source = Path(run.model.path)
        if not source.is_absolute() and spec_dir is not None:
            source = spec_dir / source
    if source is not None:
        # a checkpoint is data: refused if it carries code, and never asked to run any
        check_checkpoint_is_data(source)
        model = LlamaForCausalLM.from_pretrained(source, dtype=dtype,
                                                 attn_implementation=attn_implementation,
                                                 trust_remote_code=False, local_files_only=True)
    else:
        torch.manual_seed(seed)  # every worker builds identical weights
        config = llama_config(run.model, stage.seq_len, theta)
        config._attn_implementation = attn_implementation
        model = LlamaForCausalLM(config).to(dtype)
    apply_rope_theta(model, theta, stage.seq_len)
    return model


def apply_rope_theta(model: LlamaForCausalLM, theta: float, seq_len: int) -> None:
    """Set RoPE's base in the config (so checkpoints carry it) and rebuild the cached inv_freq:
    transformers 5 computes it once when the rotary module is built."""
    config = model.config
    params = dict(config.rope_parameters or {"rope_type": "default"})
    params["rope_theta"] = float(theta)
    config.rope_parameters = params
    config.max_position_embeddings = max(config.max_position_embeddings or 0, seq_len)
    old = model.model.rotary_emb
    device = old.inv_freq.device
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)


def rope_theta_of(model: LlamaForCausalLM) -> float:
    return float(model.config.rope_parameters["rope_theta"])


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of |parameters| in float64: equal for equal weights, to compare across processes."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))
