"""Time the fabric with the transfers training makes: ring hops, chosen pairs, collectives.

Every function here is collective over an initialised torch.distributed process group (gloo on
CPU, NCCL on GPUs: the same code) and runs on every rank. A timed repetition starts at a
barrier of the whole world; a transfer's time is taken by its receiver, from the barrier's end
to the receive completing (on CUDA, the device synchronised around both ends). One untimed
repetition first: NCCL opens a pair's connection at its first transfer, gloo warms its buffers.
The records travel to rank 0 as plain dicts (`gather_records`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
# torch 2.13 renames the tensor forms (*_single) and deprecates the old names; 2.6 has only those
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
Pair = tuple[int, int]  # (source rank, destination rank)


def check_device(device: torch.device) -> torch.device:
    """`device` as the probes need it: CPU, or CUDA with an index (the trainer's
    torch.device("cuda", local_rank)). An index-less CUDA device is refused here, where a CPU
    test can see it, not inside NCCL's barrier."""
    if device.type == "cuda" and device.index is None:
        raise ValueError(f"device {device}: give the worker's own GPU, "
                         "torch.device('cuda', local_rank), not torch.device('cuda')")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: the probes run on 'cpu' (gloo) or 'cuda' (NCCL)")
    return device


def barrier_kwargs(device: torch.device) -> dict:
    """dist.barrier's arguments for `device`: NCCL's barrier is an all-reduce on a GPU, so it is
    told which one (device_ids); gloo's needs none."""
    device = check_device(device)
    return {"device_ids": [device.index]} if device.type == "cuda" else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(post: Callable[[], tuple[list, list]], reps: int, device: torch.device
           ) -> list[float]:
    """Seconds of each of `reps` repetitions (after one untimed) of `post`, which posts this
    rank's transfers and returns (receive works, other works); every rank of the world calls
    it, ranks with nothing to move too (they wait at the barriers). A rank that receives
    nothing returns an empty list."""
    barrier = barrier_kwargs(device)
    seconds = []
    for rep in range(reps + 1):
        dist.barrier(**barrier)
        _sync(device)
        start = time.perf_counter()
        receives, others = post()
        for work in receives:
            work.wait()
        _sync(device)
        elapsed = time.perf_counter() - start
        for work in others:
            work.wait()
        if rep and receives:
            seconds.append(elapsed)
    return seconds


def _post(sends: Sequence[tuple[torch.Tensor, int]], receives: Sequence[tuple[torch.Tensor, int]]
          ) -> tuple[list, list]:
    """Post the sends and receives at once, as ring attention's Exchange does (P2POps in one
    batch_isend_irecv); return (receive works, send works). NCCL coalesces a batch into one
    work, returned as a receive work when the batch holds a receive."""
    ops = [dist.P2POp(dist.irecv, t, peer=peer) for t, peer in receives]
    ops += [dist.P2POp(dist.isend, t, peer=peer) for t, peer in sends]
    if not ops:
        return [], []
    works = dist.batch_isend_irecv(ops)
    if len(works) < len(ops):  # coalesced (NCCL): one work completes them all
        return (works, []) if receives else ([], works)
    return works[:len(receives)], works[len(receives):]


def _buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    if nbytes < 1:
        raise ValueError(f"nbytes {nbytes}: a transfer moves at least one byte")
    return torch.ones(int(nbytes), dtype=torch.uint8, device=device)


def time_ring_hops(ring_ranks: Sequence[int], nbytes: int, reps: int,
                   device: torch.device) -> list[float]:
    """Seconds per repetition of this rank's incoming ring hop: every rank sends `nbytes` to
    the next rank of its ring and receives as many from the previous one, all at once (every
    ring of the world together when each rank passes its own ring). Collective over the world;
    a ring of one moves nothing and returns []."""
    me = dist.get_rank()
    ring = list(ring_ranks)
    if me not in ring:
        raise ValueError(f"rank {me} is not in its ring {ring}; pass the ring this rank is in")
    position = ring.index(me)
    nxt, prev = ring[(position + 1) % len(ring)], ring[position - 1]
    send, recv = _buffer(nbytes, device), _buffer(nbytes, device)

    def post() -> tuple[list, list]:
        if len(ring) == 1:
            return [], []
        return _post([(send, nxt)], [(recv, prev)])

    return _timed(post, reps, device)


def time_pairs(batches: Sequence[Sequence[Pair]], nbytes: int, reps: int,
               device: torch.device) -> dict[Pair, list[float]]:
    """The probe round: each batch's (source, destination) pairs move `nbytes` at once, one
    batch after another; ranks outside a batch wait at its barriers. Returns, for the pairs
    this rank receives in, seconds per repetition. Collective over the world."""
    me = dist.get_rank()
    timed: dict[Pair, list[float]] = {}
    for batch in batches:
        pairs = [tuple(p) for p in batch]
        if any(src == dst for src, dst in pairs):
            raise ValueError(f"probe batch {pairs}: a pair joins two different ranks")
        sends = [(_buffer(nbytes, device), dst) for src, dst in pairs if src == me]
        mine = [p for p in pairs if p[1] == me]
        receives = [(_buffer(nbytes, device), src) for src, _ in mine]
        seconds = _timed(lambda: _post(sends, receives), reps, device)
        for pair in mine:  # several receives complete together: each gets the batch's time
            timed[pair] = list(seconds)
    return timed


def time_collective(group: dist.ProcessGroup | None, op: str, nbytes: int, reps: int,
                    device: torch.device) -> list[float]:
    """Seconds per repetition of one collective over `group` (None: the world) on `nbytes`:
    all_reduce of an nbytes tensor, all_gather into an nbytes tensor, reduce_scatter of an
    nbytes tensor (FSDP2's forms). Every rank of the world calls it (the barriers are the
    world's); ranks outside `group` return []."""
    if op not in COLLECTIVES:
        raise ValueError(f"collective {op!r}: one of {', '.join(COLLECTIVES)}")
    inside = group is None or dist.get_rank() in dist.get_process_group_ranks(group)
    size = dist.get_world_size(group) if inside else 1
    elements = max(size, int(nbytes) // 4 // size * size)  # fp32, a multiple of the group
    full = torch.ones(elements, dtype=torch.float32, device=device)
    shard = torch.ones(elements // size, dtype=torch.float32, device=device)

    def post() -> tuple[list, list]:
        if not inside:
            return [], []
        if op == "all_reduce":
            return [dist.all_reduce(full, group=group, async_op=True)], []
        if op == "all_gather":
            return [_ALL_GATHER(full, shard, group=group, async_op=True)], []
        return [_REDUCE_SCATTER(shard, full, group=group, async_op=True)], []

    return _timed(post, reps, device)


def gather_records(records: list[dict]) -> list[dict] | None:
    """Every rank's records (plain dicts), concatenated in rank order on rank 0; None
    elsewhere. Collective over the world."""
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, everyone, dst=0)
    if everyone is None:
        return None
    return [r for rank_records in everyone for r in rank_records]


def median(seconds: Sequence[float]) -> float:
    """The median of a record's repetitions (a slow moment of the machine lands on one)."""
    return statistics.median(seconds)
