"""Load an evaluable checkpoint and turn it into a `Generate` callable (greedy decoding).

A checkpoint with a Hugging Face export (a stage's final one, or a plain Hugging Face folder)
loads through from_pretrained; an intermediate checkpoint of the trainer has none (only the
DCP shards, docs/training.md "Saving and exporting at scale"), and loads from them: the model
is built from its config.json on the meta device, given storage on the evaluator's device in
the evaluation dtype, and DCP copies each saved shard into it (fp32 saved -> bf16 by copy_, one
saved shard at a time: never a whole fp32 copy of the model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from specs.checkpoint import check_checkpoint, dcp_dir, has_export, is_trainer_checkpoint
from specs.trust import check_checkpoint_is_data

# (prompt, max_new_tokens) -> the model's continuation. The runner only sees this, so a test can
# plug in an oracle or a constant "model" and check that the harness can fail.
Generate = Callable[[str, int], str]


def build_token_counter(tokenizer) -> Callable[[str], int]:
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def evaluation_device(gpus: float) -> str:
    """Where an evaluator or gang member computes: CUDA when it was given GPUs and sees one."""
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def load_arguments(compute_dtype: str, device: str) -> dict:
    """The keyword arguments of `from_pretrained` for an evaluator on `device` of a run that
    computes in `compute_dtype`: the dtype is topology.eval_plan.eval_dtype's, the one the
    plan's evaluation memory numbers use (bf16 on CUDA for a bf16 run: an 8B model's weights
    are 16 GB, not 32, and the gang's ring attention runs bf16 on CUDA; fp32 on CPU)."""
    import torch

    from topology.eval_plan import eval_dtype

    # The trainer may have saved attn_implementation="ring", which is only registered inside
    # training workers; one evaluator runs the whole sequence with PyTorch's SDPA.
    return {"dtype": getattr(torch, eval_dtype(compute_dtype, torch.device(device).type)),
            "attn_implementation": "sdpa", "local_files_only": True}


def load_checkpoint(path: str | Path, device: str = "cpu", compute_dtype: str = "float32"):
    """(model in eval mode, tokenizer) of a checked checkpoint, in the dtype `load_arguments`
    picks for `device` and the run's `compute_dtype`: a trainer checkpoint without a Hugging
    Face export from its DCP model shards (`load_from_dcp`), anything else by from_pretrained."""
    from ray_jobs.data.tokenizer import load_tokenizer
    from ray_jobs.ring_attention.families import causal_lm_class, checkpoint_config
    from ray_jobs.ring_attention.rope import apply_exact_rope

    path = check_checkpoint_is_data(check_checkpoint(path))
    arguments = load_arguments(compute_dtype, device)
    if is_trainer_checkpoint(path) and not has_export(path):
        model = load_from_dcp(path, device, arguments["dtype"])
    else:
        # a supported family only (refused up front otherwise), by its own class
        family = causal_lm_class(checkpoint_config(path).model_type)
        model = family.from_pretrained(str(path), trust_remote_code=False, **arguments)
    # RoPE as the trainer computes it: exact angles, rotation in fp32 (transformers' own path
    # is off by 1% of |q| near 1M positions in bf16; ray_jobs/ring_attention/rope.py)
    apply_exact_rope(model)
    return model.to(device).eval(), load_tokenizer(path)


def load_from_dcp(path: Path, device: str, dtype):
    """The model of a trainer checkpoint without an export, filled from its DCP shards in one
    process: built from config.json on the meta device, storage on `device` in `dtype` only,
    and each saved shard copied in (DCP converts by copy_: one saved shard in host memory at a
    time). The optimizer state in the same files is not read."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ray_jobs.ring_attention.families import causal_lm_class, checkpoint_config
    from specs.checkpoint import CheckpointError
    from specs.trust import check_run_dir

    config = checkpoint_config(path)
    config._attn_implementation = "sdpa"  # as load_arguments: the trainer's "ring" is not here
    with torch.device("meta"):
        model = causal_lm_class(config.model_type)(config).to(dtype)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight
    model.to_empty(device=device)
    if tied:  # to_empty gives each module its own new parameter: tie them again
        head.weight = embed.weight
    # RoPE's inverse frequencies are a non-persistent buffer, not in the checkpoint, left as
    # garbage by to_empty: rebuilt (in fp32, as from_pretrained has them) by load_checkpoint's
    # apply_exact_rope
    state = model.state_dict()
    if tied:
        state.pop("lm_head.weight", None)
    check_run_dir(path)  # DCP unpickles its metadata: only from files no one else can write
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        try:
            dcp.load({"model": state}, checkpoint_id=dcp_dir(path), no_dist=True)
        except (CheckpointException, RuntimeError, ValueError) as e:
            cause = e  # DCP wraps the cause with its traceback: name the cause alone
            if isinstance(e, CheckpointException):
                cause = next(iter(e.failures.values()))[0]
            why = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
            raise CheckpointError(f"checkpoint {path}: its {dcp_dir(path).name}/ shards do not "
                                  f"fill the model its config.json describes ({why}); evaluate "
                                  "another committed checkpoint of the run") from None
    return model


def max_model_length(path: str | Path) -> int | None:
    import json

    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("max_position_embeddings")


def greedy_tokens(model, input_ids, max_new_tokens: int, eos: int | None) -> list[int]:
    """Greedy continuation of `input_ids` (1, S) with a KV cache; stops at `eos`."""
    import torch

    with torch.inference_mode():
        # logits_to_keep=1: only the last position's logits are needed, not (S, vocab) of them.
        out, new = model(input_ids=input_ids, use_cache=True, logits_to_keep=1), []
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
            out = model(input_ids=torch.tensor([[token]], device=input_ids.device),
                        cache=out.cache, use_cache=True, logits_to_keep=1)
    return new


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids as the model sees them: BOS first, as ringpilot's trainer starts
    every sequence."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id] + ids if tokenizer.bos_token_id is not None else ids


def build_generate(model, tokenizer) -> Generate:
    """A `Generate` that decodes greedily (the NIAH/RULER convention) on the model's device."""
    import torch

    device = next(model.parameters()).device

    def generate(prompt: str, max_new_tokens: int) -> str:
        ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
        new = greedy_tokens(model, ids, max_new_tokens, tokenizer.eos_token_id)
        return tokenizer.decode(new, skip_special_tokens=True)

    return generate


def build_gang_generate(gang, tokenizer) -> Generate:
    """A `Generate` on an evaluation gang (ray_jobs.eval.gang.EvalGang): the same prompt ids,
    greedy decoding and detokenisation as `build_generate`, the sequence split over the gang."""

    def generate(prompt: str, max_new_tokens: int) -> str:
        new = gang.generate(prompt_ids(tokenizer, prompt), max_new_tokens, tokenizer.eos_token_id)
        return tokenizer.decode(new, skip_special_tokens=True)

    return generate
