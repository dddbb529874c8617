"""Spawn a gloo world on loopback and run a function on every rank (tests and benchmarks)."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_jobs.ray_setup import free_port


class WorldError(RuntimeError):
    """A rank of a spawned world failed; the message holds every failing rank's traceback."""


def _entry(rank, world, port, timeout_s, body, args, results):
    # Loopback only, for the store and for gloo's own connections; one thread per rank, as a
    # GPU rank has one device.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        result = body(rank, world, *args)
        # Every rank past its last operation before any rank tears its connections down: a
        # gloo peer closing while the other still completes a send aborted that process
        # ("terminate called without an active exception", SIGABRT) once in CI.
        dist.barrier()
        results.put((rank, "ok", result))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The result is delivered (SimpleQueue.put writes the pipe synchronously) and the group is
    # destroyed: leave without the interpreter's finalization, where gloo's worker threads can
    # still release tensors they held and abort the process (pytorch/pytorch#179291).
    os._exit(0)


def run_world(world: int, body, *args, timeout_s: float = 90) -> list:
    """Run body(rank, world, *args) on `world` spawned gloo ranks; return per-rank results.

    `body` must be importable by the spawned processes (a module-level function). A failing
    rank raises WorldError in the caller with that rank's traceback.
    """
    results = mp.get_context("spawn").SimpleQueue()
    ranks = mp.start_processes(_entry, args=(world, free_port(), timeout_s, body, args, results),
                               nprocs=world, start_method="spawn", join=False)
    collected, error = {}, None

    def drain() -> None:
        while not results.empty():
            rank, status, value = results.get()
            collected[rank] = (status, value)

    # Read results while the ranks run: a rank whose result overfills the pipe blocks in put()
    # until it is read, so joining first and reading after would deadlock on large results.
    while True:
        drain()
        try:
            if ranks.join(timeout=0.05):
                break
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            error = err
            break
    drain()
    failures = [f"rank {r}:\n{v}" for r, (s, v) in sorted(collected.items()) if s == "error"]
    if failures or error is not None:
        raise WorldError("\n".join(failures) or str(error))
    return [collected[r][1] for r in range(world)]


# Rank bodies of the sharded-loading tests (tests/train/test_sharded_load.py).

def _tiny_layout(ring: int, dp: int, shard: int):
    from ray_jobs.train.parallelize import build_mesh
    from specs.degrees import ParallelDims

    dims = ParallelDims.of(ring, dp, shard)
    n = dims.sequence
    return build_mesh(dims, [list(range(i * n, (i + 1) * n)) for i in range(dp)], "cpu")


def _sharded(layout, config, source, seed: int, resume, theta: float, seq_len: int,
             block_elements: int = 1 << 20, chunk_bytes: int = 32 << 20):
    """The trainer's step 3 on a layout: meta model, parallelize, materialise, fill (from the
    DCP checkpoint `resume` through the trainer's load_checkpoint, else the Hugging Face
    `source`, else a new model from `seed`). Returns the Hugging Face model inside the root,
    the root, and the optimizer and scheduler when resuming."""
    from transformers import LlamaConfig

    from ray_jobs.train.checkpoint import load_checkpoint
    from ray_jobs.train.model import (
        build_meta_model,
        init_weights,
        load_hf_weights,
        materialize,
    )
    from ray_jobs.train.parallelize import build_optimizer, parallelize

    config = LlamaConfig.from_pretrained(source) if source is not None else config
    config._attn_implementation = "sdpa"
    model = build_meta_model(config, torch.float32)
    root = parallelize(model, layout, activation_checkpointing="full", mixed_precision=None)
    materialize(model, "cpu", {"rope_type": "default", "rope_theta": theta}, seq_len, seq_len)
    if resume is not None:
        opt = build_optimizer(root, 1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        load_checkpoint(resume, model, opt, sched)
        return model, root, opt, sched
    if source is not None:
        load_hf_weights(model, source, chunk_bytes=chunk_bytes)
    else:
        init_weights(model, seed, block_elements=block_elements)
    return model, root, None, None


def sharded_weights(rank, world, ring, dp, shard, fills, theta, seq_len, block_elements,
                    chunk_bytes):
    """For each fill {label: (config, source, seed, resume)} (see _sharded), build and fill a
    tiny Llama sharded over (ring, dp, shard); return {label: its init checksum (every rank),
    and on rank 0 the whole state gathered (test-only), the RoPE inverse frequencies and the
    shapes of this rank's shards}, as numpy arrays."""
    import numpy as np
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ray_jobs.train.model import weights_checksum

    layout = _tiny_layout(ring, dp, shard)
    out = {}
    for label, (config, source, seed, resume) in fills.items():
        model, root, _, _ = _sharded(layout, config, source, seed, resume, theta, seq_len,
                                     block_elements, chunk_bytes)
        checksum = weights_checksum(model)
        loss = _first_loss(layout, root, model.config.vocab_size, seq_len)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        out[label] = {"checksum": checksum, "loss": loss}
        if rank == 0:
            out[label].update(
                state={k: np.array(v.numpy(), copy=True) for k, v in full.items()},
                inv_freq=model.model.rotary_emb.inv_freq.numpy().copy(),
                local_shapes={n: tuple(p.to_local().shape) for n, p in model.named_parameters()})
    return out


def sample_batch(dp: int, vocab: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per ring: (input ids, next-token labels), the same on every rank."""
    ids = torch.randint(0, vocab, (dp, seq_len), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels


def _first_loss(layout, root, vocab: int, seq_len: int) -> float:
    """The loss of sample_batch through the FSDP root (what training computes from these
    weights), mean over the rings: the all-gathers must see what was filled."""
    import torch.distributed as dist

    from ray_jobs.ring_attention import sequence_position_ids, sequence_shard
    from ray_jobs.train.parallelize import ring_mean_loss

    dims = layout.dims
    ids, labels = sample_batch(dims.dp, vocab, seq_len)
    mine = slice(layout.dp_rank, layout.dp_rank + 1)
    place = (layout.ring_rank, dims.ring, layout.ulysses_rank, dims.ulysses)
    x, y = (sequence_shard(t[mine], 1, *place) for t in (ids, labels))
    pos = sequence_position_ids(seq_len, *place).unsqueeze(0)
    with torch.no_grad():
        loss = ring_mean_loss(*root(x, pos, y), layout.sequence).detach().clone()
    dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()


def save_sharded_checkpoint(rank, world, ring, dp, shard, source, path, theta, seq_len):
    """Load `source` (Hugging Face) sharded, then write what the trainer's load_checkpoint
    reads: the model and optimizer state by DCP, and a scheduler state."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ray_jobs.train.parallelize import build_optimizer
    from specs.checkpoint import dcp_dir, scheduler_file

    model, root, _, _ = _sharded(_tiny_layout(ring, dp, shard), None, source, 0, None, theta,
                                 seq_len)
    opt = build_optimizer(root, 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=dcp_dir(path))
    if rank == 0:
        scheduler_file(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(sched.state_dict(), scheduler_file(Path(path)))


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_of_load(rank, world, ring, dp, shard, source, theta, seq_len):
    """Bytes this rank's resident memory rose by, at its peak, while building and filling the
    model from the Hugging Face `source` (the trainer's step 3, checksum included)."""
    from ray_jobs.train.model import weights_checksum

    layout = _tiny_layout(ring, dp, shard)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current resident size
    before = _memory_kb("VmRSS")
    model, *_ = _sharded(layout, None, source, 0, None, theta, seq_len)
    weights_checksum(model)
    return (_memory_kb("VmHWM") - before) * 1024
