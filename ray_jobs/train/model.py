"""The model being extended: built on the meta device, sharded, then each rank's shards filled
(a Llama, Mistral or Qwen: ray_jobs/ring_attention/families.py).

    config = model_config(run, index, source, attn_implementation="sdpa")
    model = build_meta_model(config, dtype)          # shapes only: no memory anywhere
    root = parallelize(model, layout, ...)           # FSDP2 shards the (meta) parameters
    materialize(model, device, rope, seq_len, T0)    # this rank's shards, uninitialised
    load_hf_weights(model, source) | init_weights(model, seed) | (resume) load_checkpoint

No rank ever holds a whole model: a Hugging Face checkpoint is read slice by slice (the rows a
rank owns, a few MB at a time), a new model is drawn block by block from generators seeded by
(seed, parameter, block), so its weights are the same in every layout. `build_model` does the
same in one process (benchmarks and tests that want a whole model).
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import LlamaForCausalLM, PretrainedConfig

from ray_jobs.ring_attention.families import (
    causal_lm_class,
    check_sliding_window,
    checkpoint_config,
    config_class,
    family_kwargs,
)
from ray_jobs.ring_attention.rope import apply_exact_rope
from specs.checkpoint import CheckpointError
from specs.run import ModelSpec, RunSpec
from specs.trust import check_checkpoint_is_data

# A new model is drawn in blocks of whole rows of about this many elements, each block from its
# own generator: a rank draws only the blocks its rows fall in (at most two more than its own).
INIT_BLOCK_ELEMENTS = 1 << 20
# A checkpoint is read this many bytes of a rank's rows at a time (its transient memory).
READ_CHUNK_BYTES = 32 << 20
WRAPPED = "_checkpoint_wrapped_module."  # activation checkpointing's prefix in names


def llama_config(m: ModelSpec, seq_len: int, rope: dict[str, Any]) -> PretrainedConfig:
    """The transformers config of a ModelSpec's architecture, in its family (LlamaConfig,
    MistralConfig, ...): a model built without model.path, and the shapes the memory trace
    uses; `rope` is set and checked by apply_rope (materialize)."""
    config = config_class(m.architecture)(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        max_position_embeddings=max(seq_len, m.pretrain_seq_len),
        rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]},
        bos_token_id=1, eos_token_id=2, pad_token_id=3, **family_kwargs(m),
    )
    config.rope_parameters = dict(rope)
    return config


def model_source(run: RunSpec, stage_index: int, init_from: Path | None,
                 spec_dir: Path | None = None) -> Path | None:
    """Where a stage's weights come from: a checkpoint (the previous stage's final or this
    stage's latest), else model.path (relative to the spec), else None (a new model)."""
    source = init_from
    if source is None and run.model.path is not None:
        source = Path(run.model.path)
        if not source.is_absolute() and spec_dir is not None:
            source = spec_dir / source
    if source is not None:
        # a checkpoint is data: refused if it carries code, and never asked to run any
        check_checkpoint_is_data(source)
    return source


def model_config(run: RunSpec, stage_index: int, source: Path | None, *,
                 attn_implementation: str) -> PretrainedConfig:
    """The architecture of a stage's model: the checkpoint's config (refused unless a supported
    family without a sliding window shorter than the stage), else the spec's."""
    if source is not None:
        config = checkpoint_config(source)
        check_sliding_window(config, run.stages[stage_index].seq_len, f"{source}/config.json")
    else:
        config = llama_config(run.model, run.stages[stage_index].seq_len,
                              run.stage_rope(stage_index))
    config._attn_implementation = attn_implementation
    return config


def build_meta_model(config: PretrainedConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model of the config's family with every parameter and buffer on the meta device:
    shapes, no storage."""
    with torch.device("meta"):
        return causal_lm_class(config.model_type)(config).to(dtype)


def materialize(model: LlamaForCausalLM, device: torch.device | str, rope: dict[str, Any],
                seq_len: int, pretrain_seq_len: int) -> None:
    """Give every parameter (this rank's shard of it, once parallelize() has run) storage on
    `device`, uninitialised; set RoPE for the stage, which rebuilds the non-persistent inv_freq
    buffer that to_empty left as garbage."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight
    model.to_empty(device=device)
    if tied:  # to_empty gives each module its own new parameter: tie them again
        head.weight = embed.weight
    apply_rope(model, rope, seq_len=seq_len, pretrain_seq_len=pretrain_seq_len)


def build_model(run: RunSpec, stage_index: int, init_from: Path | None, *, seed: int,
                attn_implementation: str, spec_dir: Path | None = None) -> LlamaForCausalLM:
    """The whole model a stage starts from, in one process (the trainer shards it before it
    exists: ray_jobs/train/loop.py step 3): a checkpoint, else model.path, else a new model
    from `seed` (the same weights every layout of the trainer draws); RoPE set for the stage."""
    source = model_source(run, stage_index, init_from, spec_dir)
    config = model_config(run, stage_index, source, attn_implementation=attn_implementation)
    model = build_meta_model(config, getattr(torch, run.model.dtype))
    materialize(model, "cpu", stage_rope(run, stage_index, spec_dir),
                run.stages[stage_index].seq_len, run.model.pretrain_seq_len)
    if source is not None:
        load_hf_weights(model, source)
    else:
        init_weights(model, seed)
    return model


def load_hf_weights(model: nn.Module, source: Path, *,
                    chunk_bytes: int = READ_CHUNK_BYTES) -> None:
    """Fill `model`'s parameters (this rank's shards once parallelize() has run, else whole)
    from the Hugging Face safetensors files in `source`: each rank reads only the rows it holds,
    `chunk_bytes` at a time, each read through its own short-lived memory map.

    Not torch's DCP Hugging Face reader (dcp.HuggingFaceStorageReader, which plans the same
    slices and gives the same weights): it keeps each file mapped while it reads all of that
    file's slices, and the pages a mapping has touched count as the rank's resident memory
    until it closes, so a rank peaked at its shards plus as much again (measured: 864 MB for a
    rank holding half of an 844 MB model)."""
    files = _hf_tensor_files(source)
    params = hf_parameters(model)
    _check_hf_tensors(source, files, params)

    def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
        with safe_open(str(files[name][0]), framework="pt") as f:
            return f.get_slice(name)[index]

    fill_parameters(params, read, chunk_bytes=chunk_bytes)


def hf_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under their Hugging Face names (activation checkpointing's prefix
    dropped; tied weights under their first name only)."""
    params: dict[str, torch.Tensor] = {}
    for m, mod in model.named_modules():
        for n, p in mod.named_parameters(recurse=False):
            if all(p is not q for q in params.values()):  # tied weights: the first name
                params[f"{m}.{n}".replace(WRAPPED, "").lstrip(".")] = p
    return params


def fill_parameters(params: dict[str, torch.Tensor], read, *,
                    chunk_bytes: int = READ_CHUNK_BYTES) -> None:
    """Copy into each parameter's local rows what `read(name, index)` returns for them (a CPU
    tensor of the rows and columns `index` selects of the full tensor), `chunk_bytes` of rows
    at a time. load_hf_weights reads safetensors files; the memory trace
    (ray_jobs.train.memory.trace_load_memory) reads fake slices of the same shapes."""
    with torch.no_grad():
        for name, param in params.items():
            local = _local(param)
            shape, offset = _placement(param)
            if local.numel() == 0:
                continue
            row_bytes = max(1, math.prod(shape[1:]) * local.element_size())
            rows = max(1, chunk_bytes // row_bytes)
            for start in range(0, shape[0], rows):
                stop = min(start + rows, shape[0])
                index = (slice(offset[0] + start, offset[0] + stop),) + tuple(
                    slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))
                local[start:stop].copy_(read(name, index))


def _hf_tensor_files(source: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (safetensors file, shape) of every tensor of a Hugging Face checkpoint (headers
    only)."""
    found = sorted(Path(source).glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{source}: no *.safetensors files; give a Hugging Face checkpoint "
                              "saved with save_pretrained(safe_serialization=True)")
    files = {}
    for path in found:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    files[key] = (path, tuple(f.get_slice(key).get_shape()))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); restore the "
                                  "file save_pretrained wrote") from None
    return files


def _check_hf_tensors(source: Path, files: dict, params: dict[str, torch.Tensor]) -> None:
    """One clear error when the safetensors files cannot fill the model's parameters."""
    missing = [k for k in params if k not in files]
    wrong = [f"{k} {files[k][1]} (model {tuple(p.shape)})" for k, p in params.items()
             if k in files and files[k][1] != tuple(p.shape)]
    if missing or wrong:
        problem = (f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                   if missing else f"other shapes: {', '.join(wrong[:5])}")
        raise CheckpointError(f"{source}: the safetensors files do not fit the model its "
                              f"config.json describes ({problem}); give a checkpoint saved "
                              "whole, with its own config.json")


def init_weights(model: nn.Module, seed: int, *,
                 block_elements: int = INIT_BLOCK_ELEMENTS) -> None:
    """Initialise a new model as Hugging Face's Llama does (Linear and Embedding weights
    normal(0, initializer_range), the embedding's padding row zero, RMSNorm weights one, biases
    zero), with values that depend only on (seed, parameter name, position): every layout gets
    bitwise the same model, and each rank draws only the blocks of whole rows (about
    `block_elements` each; the values depend on it) holding its shard.

    DTensor's own random ops do not give this: torch supports them only on CUDA-like devices
    (torch.distributed.tensor._random.is_rng_supported_mesh), and their values are tied to
    Philox offsets, not to a CPU generator. Blocks are drawn on the CPU and copied: enough for
    a new model of any size to start (it is drawn once), if slower than drawing on the GPU."""
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}".replace(WRAPPED, "").lstrip(".")
                if name == "bias":
                    _local(param).zero_()
                elif isinstance(module, (nn.Linear, nn.Embedding)):
                    _fill_normal(param, std, seed, full, block_elements)
                    pad = getattr(module, "padding_idx", None)
                    if pad is not None:
                        _zero_row(param, pad)
                elif "RMSNorm" in type(module).__name__:
                    _local(param).fill_(1.0)
                else:
                    raise TypeError(f"init_weights: no rule for {full} in "
                                    f"{type(module).__name__}; add one (as Hugging Face's "
                                    "_init_weights does)")


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _placement(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's piece of `param`."""
    if isinstance(param, DTensor):
        return compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                     param.placements)
    return tuple(param.shape), (0,) * param.dim()


def _fill_normal(param: torch.Tensor, std: float, seed: int, name: str,
                 block_elements: int) -> None:
    local = _local(param)
    shape, offset = _placement(param)
    if local.numel() == 0:
        return
    row = math.prod(param.shape[1:])
    rows_per_block = max(1, block_elements // row)
    first, stop = offset[0], offset[0] + shape[0]
    for block in range(first // rows_per_block, (stop - 1) // rows_per_block + 1):
        lo = block * rows_per_block
        hi = min(lo + rows_per_block, param.shape[0])
        gen = torch.Generator().manual_seed(_block_seed(seed, name, block))
        values = torch.empty((hi - lo, *param.shape[1:]), dtype=torch.float32)
        values.normal_(0.0, std, generator=gen)
        a, b = max(lo, first), min(hi, stop)  # this block's rows that are this rank's
        piece = values[a - lo:b - lo]
        for dim in range(1, param.dim()):  # a shard along another dim: its columns
            piece = piece.narrow(dim, offset[dim], shape[dim])
        local[a - first:b - first].copy_(piece)


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _zero_row(param: torch.Tensor, row: int) -> None:
    shape, offset = _placement(param)
    if offset[0] <= row < offset[0] + shape[0]:
        _local(param)[row - offset[0]].zero_()


def stage_rope(run: RunSpec, index: int, spec_dir: Path | None = None) -> dict[str, Any]:
    """transformers' rope_parameters stage `index` trains with (RunSpec.stage_rope against the
    base model's own rule)."""
    return run.stage_rope(index, run.base_rope(spec_dir))


def apply_rope(model: LlamaForCausalLM, rope: dict[str, Any], *, seq_len: int,
               pretrain_seq_len: int) -> None:
    """Set the stage's RoPE in the config (so every checkpoint carries it), check it as the
    installed transformers does, and rebuild the rotary module: transformers 5 computes its
    frequencies once, when the module is built. The new module computes exact angles and
    rotates in fp32 (ray_jobs/ring_attention/rope.py: transformers' bf16 path is off by 0.9% of
    |q| at 1M positions), and fixes the frequencies of the length-dependent methods (dynamic,
    longrope) at the stage's length, so that every rank of a ring, which sees only its own
    positions, rotates by the same ones.

    max_position_embeddings becomes the stage's length, except for 'dynamic', where
    transformers reads it as the pretraining length the base grows from."""
    set_rope(model.config, rope, seq_len=seq_len, pretrain_seq_len=pretrain_seq_len)
    apply_exact_rope(model, length=seq_len)


def set_rope(config, rope: dict[str, Any], *, seq_len: int, pretrain_seq_len: int) -> None:
    """apply_rope's part on the config: rope_parameters, max_position_embeddings, checked."""
    config.rope_parameters = dict(rope)
    if rope.get("rope_type") == "dynamic":
        config.max_position_embeddings = pretrain_seq_len
    else:
        config.max_position_embeddings = max(config.max_position_embeddings or 0, seq_len)
    check_rope(config)


def check_rope(config) -> None:
    """transformers' own validation of config.rope_parameters, its warnings raised as one error
    (rope_checked)."""
    with rope_checked(config.rope_parameters):
        config.validate_rope()


@contextmanager
def rope_checked(rope: dict[str, Any]):
    """Raise one ValueError for what transformers says of `rope` inside the block: it only logs
    a wrong key or value (at construction and in validate_rope), and the model would train
    with positions nobody asked for."""
    logger = logging.getLogger("transformers.modeling_rope_utils")
    problems: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                problems.append(record.getMessage())

    handler, level, propagate = _Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # heard even when transformers' verbosity is 'error'
    logger.propagate = False  # said once, in the error below
    try:
        yield
    except KeyError as e:  # a missing key
        problems.append(str(e).strip('"'))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    if problems:
        raise ValueError(f"transformers {_transformers_version()} refuses rope_parameters "
                         f"{rope}: {problems[0]}")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def rope_theta_of(model: LlamaForCausalLM) -> float:
    return float(model.config.rope_parameters["rope_theta"])


def weights_checksum(model: nn.Module) -> float:
    """Sum of |parameters| of the whole model in float64: equal for equal weights, to compare
    across processes and layouts. On a sharded model it is collective: each rank sums its
    shards and the sums are added over the dims that shard them only (never over HSDP
    replicas, which hold the same shard), so each element counts once."""
    sums: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for p in model.parameters():
            local, key = p, None
            if isinstance(p, DTensor):
                local = p.to_local()
                key = (p.device_mesh,
                       tuple(i for i, pl in enumerate(p.placements) if pl.is_shard()))
            # in pieces: a float64 copy of a whole embedding shard would be the largest
            # allocation of the stage's start
            part = sum(torch.linalg.vector_norm(piece, 1, dtype=torch.float64)
                       for piece in local.detach().reshape(-1).split(READ_CHUNK_BYTES // 8))
            part = torch.as_tensor(part, dtype=torch.float64, device=local.device)
            sums[key] = sums[key] + part if key in sums else part
    total = 0.0
    for key, value in sums.items():  # the same keys in the same order on every rank
        if key is not None:
            mesh, dims = key
            for dim in dims:
                dist.all_reduce(value, group=mesh.get_group(dim))
        total += float(value)
    return total
