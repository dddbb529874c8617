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
