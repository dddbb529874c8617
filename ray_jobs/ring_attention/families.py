"""The model families the trainer extends: each architecture's transformers classes, the one
refusal of any other, the spec's shape facts checked against a checkpoint, and the decoder
layers of a built model (found from the model, not assumed at model.model.layers).

    config = checkpoint_config(path)                  # refused unless a supported model_type
    problems = checkpoint_problems(run, spec_dir)     # the spec must describe model.path
    layers = decoder_layers(model)                    # parallelize(), checkpointing, FSDP2

Supported: causal LMs whose attention goes through transformers' attention interface (so the
"ring" implementation replaces it) and whose positions are RoPE computed by a rotary module
that computes what Llama's does (ray_jobs/ring_attention/rope.py swaps it for the exact one).
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from torch import nn
from transformers import PretrainedConfig

from specs.checkpoint import CheckpointError
from specs.run import ARCHITECTURES, ModelSpec, RunSpec

# model_type -> (config class, causal-LM class) in transformers
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
assert tuple(CLASSES) == ARCHITECTURES


class UnsupportedModel(CheckpointError):
    """A checkpoint of an architecture the trainer cannot extend, or one its spec misdescribes."""


def config_class(architecture: str) -> type[PretrainedConfig]:
    return getattr(transformers, CLASSES[_supported(architecture)][0])


def causal_lm_class(architecture: str) -> type[nn.Module]:
    return getattr(transformers, CLASSES[_supported(architecture)][1])


def _supported(architecture: str, where: str = "model.architecture") -> str:
    if architecture not in CLASSES:
        raise UnsupportedModel(
            f"{where} is {architecture!r}: supported are {', '.join(ARCHITECTURES)} (causal LMs "
            "whose attention goes through transformers' attention interface and whose positions "
            "are RoPE, which ring attention and the exact-RoPE patch need); convert the "
            "checkpoint to one of them or extend ray_jobs/ring_attention/families.py")
    return architecture


def family_kwargs(m: ModelSpec) -> dict:
    """The config arguments, beyond Llama's, that give the spec's shapes in its family."""
    kw = {"head_dim": m.head_dim, "tie_word_embeddings": m.tie_word_embeddings}
    if m.architecture in ("llama", "qwen3"):
        kw["attention_bias"] = m.attention_bias
    if m.architecture == "mistral":
        kw["sliding_window"] = m.sliding_window  # MistralConfig's default is 4096, not None
    if m.architecture in ("qwen2", "qwen3"):
        kw["use_sliding_window"] = m.sliding_window is not None
        if m.sliding_window is not None:
            kw["sliding_window"] = m.sliding_window
    return kw


def checkpoint_config(source: str | Path) -> PretrainedConfig:
    """The config of a checkpoint directory, read as data (no remote code, no hub): refused up
    front, naming what is supported, when its model_type is not one of ARCHITECTURES or its
    model class does not route attention through transformers' attention interface."""
    path = Path(source) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable Hugging Face config ({e}); give a "
                              "checkpoint saved with save_pretrained") from None
    _supported(model_type, f"{path}: model_type")
    config = config_class(model_type).from_pretrained(
        str(source), trust_remote_code=False, local_files_only=True)
    if not getattr(causal_lm_class(model_type), "_supports_attention_backend", False):
        raise UnsupportedModel(f"{path}: transformers' {model_type} does not route attention "
                               "through its attention interface; ring attention cannot run it")
    return config


def sliding_window_of(config: PretrainedConfig) -> int | None:
    """The window any layer's attention is limited to, or None (qwen2/qwen3 keep the number
    in the config even when no layer uses it)."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return window
    return window if "sliding_attention" in (getattr(config, "layer_types", None) or ()) \
        else None


def check_sliding_window(config: PretrainedConfig, seq_len: int, where: str) -> None:
    """Ring attention has no sliding window: refuse a model whose window is shorter than the
    stage (a window at least as long as the sequence masks nothing)."""
    window = sliding_window_of(config)
    if window is not None and window < seq_len:
        raise UnsupportedModel(
            f"{where}: sliding_window {window} is shorter than the stage's {seq_len} tokens, "
            "and ring attention has no sliding window; use a checkpoint without one (Mistral "
            f"v0.2 on: null) or train at most {window} tokens")


def spec_problems(m: ModelSpec, config: PretrainedConfig) -> list[str]:
    """Each ModelSpec field that disagrees with the checkpoint's config: the planner's cost and
    memory model read the spec, the trainer builds the checkpoint's model."""
    window = sliding_window_of(config)
    facts = {
        "architecture": config.model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads,
        "attention_bias": (True if config.model_type == "qwen2"
                           else bool(getattr(config, "attention_bias", False))),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "sliding_window": window,
    }
    problems = [f"model.{k} is {getattr(m, k)!r} but the checkpoint's config.json says {v!r}; "
                f"set model.{k}: {json.dumps(v)}"
                for k, v in facts.items() if getattr(m, k) != v]
    if getattr(config, "mlp_bias", False):
        problems.append("the checkpoint's config.json sets mlp_bias, which the memory model does "
                        "not count; give a checkpoint without MLP biases")
    return problems


def checkpoint_problems(run: RunSpec, spec_dir: Path) -> list[str]:
    """Why model.path cannot be trained as the spec says, found before any worker starts: an
    unsupported architecture (raised), the spec's fields against its config.json, a sliding
    window shorter than the longest stage."""
    source = Path(run.model.path)
    source = source if source.is_absolute() else spec_dir / source
    config = checkpoint_config(source)
    problems = spec_problems(run.model, config)
    try:
        check_sliding_window(config, run.stages[-1].seq_len, f"{source}/config.json")
    except UnsupportedModel as e:
        problems.append(str(e))
    return problems


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList holding the model's decoder layers: the one whose entries are all of the
    classes transformers names in `_no_split_modules` (what it keeps whole on one device),
    found by walking the model, so no attribute path is assumed. Exactly one must exist."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0
             and all(_layer_class(layer) in names for layer in m)]
    if len(found) != 1:
        raise UnsupportedModel(
            f"{type(model).__name__}: expected one list of decoder layers of "
            f"{sorted(names) or 'its _no_split_modules'}, found "
            f"{[n for n, _ in found] or 'none'}; pass a transformers causal LM of "
            f"{', '.join(ARCHITECTURES)}")
    return found[0][1]


def _layer_class(layer: nn.Module) -> str:
    """A decoder layer's transformers class name, through activation checkpointing's wrapper and
    FSDP2's dynamic subclass (named FSDP<class>)."""
    inner = getattr(layer, "_checkpoint_wrapped_module", layer)
    return next(c.__name__ for c in type(inner).__mro__ if not c.__name__.startswith("FSDP"))
