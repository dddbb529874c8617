"""Rank bodies of the save/export and lifecycle-memory tests (spawned processes import them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tests.support import worlds

THETA, SEQ = 50000.0, 64


def tiny_config(tied: bool = False):
    from transformers import LlamaConfig

    # odd vocabulary and intermediate sizes: shards of unequal rows over 2 ranks; the vocabulary
    # fits the byte-level BPE of tests/support/eval_fixtures.py (256 bytes and a few merges)
    return LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=56,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=SEQ, pad_token_id=3, eos_token_id=0,
                       bos_token_id=None, tie_word_embeddings=tied)


def train_step(layout, root, opt, vocab: int, seq_len: int, seed: int) -> float:
    """One optimizer step of the trainer's recipe on a random batch (one sample per ring)."""
    from ray_jobs.ring_attention import sequence_position_ids, sequence_shard
    from ray_jobs.train.parallelize import ring_mean_loss

    dims = layout.dims
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (dims.dp, seq_len), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    mine = slice(layout.dp_rank, layout.dp_rank + 1)
    place = (layout.ring_rank, dims.ring, layout.ulysses_rank, dims.ulysses)
    x, y = (sequence_shard(t[mine], 1, *place) for t in (ids, labels))
    pos = sequence_position_ids(seq_len, *place).unsqueeze(0)
    loss = ring_mean_loss(*root(x, pos, y), layout.sequence)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _gathered(model) -> dict[str, np.ndarray] | None:
    """The whole state on rank 0 (test-only reference: the trainer never gathers it)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return {k: np.array(v.numpy(), copy=True) for k, v in full.items()}


def save_intermediate_and_final(rank, world, run_dir, tokenizer_dir, ring, dp, shard, tied,
                                file_bytes):
    """Build a tiny Llama the trainer's way (meta, parallelize, materialise, draw), train a
    step and save an intermediate checkpoint, train another and save the stage's final one
    (with its export in files of `file_bytes`). Returns both paths and, on rank 0, the whole
    weights at each save."""
    from ray_jobs.data.tokenizer import load_tokenizer
    from ray_jobs.train import checkpoint as ckpt
    from ray_jobs.train.parallelize import build_optimizer
    from specs.checkpoint import TrainerState
    from specs.ledger import Ledger

    layout = worlds._tiny_layout(ring, dp, shard)
    model, root, _, _ = worlds._sharded(layout, tiny_config(tied), None, 7, None, THETA, SEQ)
    opt = build_optimizer(root, 1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tok = load_tokenizer(tokenizer_dir)
    ledger = Ledger(run_dir, "r")
    out = {}
    for step, final in ((1, False), (2, True)):
        train_step(layout, root, opt, model.config.vocab_size, SEQ, seed=step)
        sched.step()
        state = TrainerState(stage="s", stage_index=0, step=step)
        path = ckpt.save_checkpoint(ledger, model, tok, opt, sched, state, keep_last=5,
                                    final=final, export_file_bytes=file_bytes)
        out[step] = {"path": str(path), "state": _gathered(model)}
    return out


def load_export_sharded(rank, world, ring, dp, shard, source):
    """Fill a model of another layout from an export through the trainer's load_hf_weights;
    the whole weights on rank 0 (test-only gather)."""
    layout = worlds._tiny_layout(ring, dp, shard)
    model, *_ = worlds._sharded(layout, None, source, 0, None, THETA, SEQ)
    return _gathered(model)


# The lifecycle memory test: a model of real width, each phase's peak resident memory.

def _phase_peak(run, before_kb: int) -> int:
    """Bytes above `before_kb` that this process's resident memory peaked at while `run()`."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current resident size
    run()
    return (worlds._memory_kb("VmHWM") - before_kb) * 1024


def _at_rest(held: dict) -> int:
    """Bytes of the tensors `held` keeps alive between phases: the model's (local shards of)
    weights and gradients and the optimizer's state, each storage once."""
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    tensors = []
    if "root" in held:
        for p in held["root"].parameters():
            tensors += [p] + ([p.grad] if p.grad is not None else [])
    if "opt" in held:
        tensors += [v for st in held["opt"].state.values() for v in st.values()
                    if isinstance(v, torch.Tensor)]
    storages = {}
    for t in tensors:
        storage = local(t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _release_freed_heap() -> None:
    """Hand the pages glibc keeps of freed blocks back to the kernel (malloc_trim), so a phase's
    peak counts what it allocates, not what the phase before it freed into glibc's arenas: a
    step leaves 35-190 MB of them, more under load, and the export that follows it measured
    2,400-2,603 MB as they varied."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def lifecycle_peaks(rank, world, source, run_dir, tokenizer_dir, save_name, file_bytes):
    """The trainer's lifecycle of one stage on 2 ranks (plain FSDP): load `source` sharded,
    one training step, a checkpoint, the final checkpoint with its export, each saved by
    `save_name` ("save_checkpoint", with the export in files of `file_bytes`, or
    "gathering_save": the old code, kept as the reference the test must catch). Returns each
    phase's peak resident memory above the process's before the model existed, in bytes, and
    its seconds, and what the process held at the phase's start beyond the tensors it kept
    alive (`residual`, bytes)."""
    import functools
    import gc
    import time

    from ray_jobs.data.tokenizer import load_tokenizer
    from ray_jobs.train import checkpoint as ckpt
    from ray_jobs.train.parallelize import build_optimizer
    from specs.checkpoint import TrainerState
    from specs.ledger import Ledger

    save = (functools.partial(ckpt.save_checkpoint, export_file_bytes=file_bytes)
            if save_name == "save_checkpoint" else gathering_save)
    layout = worlds._tiny_layout(1, 2, 2)
    tok = load_tokenizer(tokenizer_dir)
    ledger = Ledger(run_dir, "r")
    gc.collect()
    base = worlds._memory_kb("VmRSS")
    held: dict = {}

    def load():
        held["model"], held["root"], _, _ = worlds._sharded(layout, None, source, 0, None,
                                                            THETA, SEQ)

    def step():
        held["opt"] = build_optimizer(held["root"], 1e-4)
        held["sched"] = torch.optim.lr_scheduler.LambdaLR(held["opt"], lambda s: 1.0)
        train_step(layout, held["root"], held["opt"], held["model"].config.vocab_size, SEQ, 1)

    def saver(step_no: int, final: bool):
        state = TrainerState(stage="s", stage_index=0, step=step_no)
        return lambda: save(ledger, held["model"], tok, held["opt"], held["sched"], state,
                            keep_last=1, final=final)

    peaks, seconds, residual = {}, {}, {}
    for phase, run in (("load", load), ("step", step), ("save", saver(1, False)),
                       ("export", saver(2, True))):
        gc.collect()
        _release_freed_heap()
        # what the process holds at rest beyond the tensors it keeps (the runtime the first
        # step builds, Python objects, heap fragmentation): the cost model prices tensors
        residual[phase] = (worlds._memory_kb("VmRSS") - base) * 1024 - _at_rest(held)
        t = time.perf_counter()
        peaks[phase] = _phase_peak(run, base)
        seconds[phase] = time.perf_counter() - t
    return {"peaks": peaks, "seconds": seconds, "residual": residual}


def gathering_save(ledger, model, tokenizer, optimizer, scheduler, state, *, keep_last, final,
                   before_commit=None) -> Path:
    """The save this branch replaced, kept as the test's reference: DCP shards, then the full
    weights gathered to rank 0 (cpu_offload), which writes the Hugging Face files at every
    checkpoint."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ray_jobs.train.checkpoint import on_rank0
    from specs.checkpoint import (
        STATE_DIR,
        checkpoint_dir,
        dcp_dir,
        scheduler_file,
        staging_dir,
        write_state,
    )
    from specs.ledger import mark_committed

    path = checkpoint_dir(ledger.run_dir, state.stage, state.step)
    staged = staging_dir(path, ledger.epoch)
    rank = dist.get_rank()
    on_rank0(rank, lambda: staged.mkdir(parents=True))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=dcp_dir(staged))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))

    def commit() -> None:
        model.save_pretrained(staged, state_dict=dict(full))
        tokenizer.save_pretrained(staged)
        (staged / STATE_DIR).mkdir()
        torch.save(scheduler.state_dict(), scheduler_file(staged))
        write_state(staged, state)
        mark_committed(staged)
        ledger.commit_checkpoint(state.stage, state.step, path, final=final, staged=staged)
        shutil.rmtree(path)  # the test keeps no checkpoint: only the memory counts

    on_rank0(rank, commit)
    return path


def resume_weights(rank, world, ring, dp, shard, path, tied):
    """The trainer's resume (step 3 then load_checkpoint) from checkpoint `path` on a layout;
    the whole weights on rank 0 (test-only gather)."""
    layout = worlds._tiny_layout(ring, dp, shard)
    model, *_ = worlds._sharded(layout, tiny_config(tied), None, 0, path, THETA, SEQ)
    return _gathered(model)
