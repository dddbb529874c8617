"""The ring: peers in ring order over a process group and the overlapped point-to-point exchange."""

from __future__ import annotations

import contextlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ring:
    """A process group plus the order of its members around the ring (global ranks).

    `torch.distributed.new_group` sorts its ranks, so a group alone cannot express a ring order
    such as [2, 0]; peers are therefore addressed by global rank from `ranks`.
    """

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's position in the ring."""
        return self.ranks.index(dist.get_rank())

    @property
    def next_peer(self) -> int:
        return self.ranks[(self.rank + 1) % self.size]

    @property
    def prev_peer(self) -> int:
        return self.ranks[(self.rank - 1) % self.size]


def resolve_ring(group: "Ring | dist.ProcessGroup | None") -> Ring:
    """A Ring from a Ring, a process group (ring order = group rank order) or None (the world)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "ring attention needs torch.distributed initialised: call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first"
        )
    if isinstance(group, Ring):
        ring = group
    else:
        ranks = (tuple(dist.get_process_group_ranks(group)) if group is not None
                 else tuple(range(dist.get_world_size())))
        ring = Ring(group=group, ranks=ranks)
    me = dist.get_rank()
    if me not in ring.ranks:
        raise ValueError(
            f"global rank {me} is not a member of the ring group {list(ring.ranks)}; pass the ring "
            "group this rank belongs to (see ray_jobs.train.parallelize.build_mesh)"
        )
    return ring


@dataclass
class RingTimings:
    """Seconds spent computing blocks and blocked waiting on ring transfers (this process)."""

    compute_s: float = 0.0
    wait_s: float = 0.0
    exchanges: int = 0
    # ring.py's tags: 1 K/V forward, 2 dK/dV, 3 K/V in backward
    exchanges_by_tag: dict[int, int] = field(default_factory=dict)
    bytes_sent: int = 0
    per_step_wait_s: list[float] = field(default_factory=list)
    # CUDA: (a wait?, start, end) events on the computing stream, not yet read (settle)
    device_spans: list[tuple[bool, torch.cuda.Event, torch.cuda.Event]] = field(
        default_factory=list)

    def settle(self) -> None:
        """Add the CUDA spans recorded so far to compute_s and wait_s. It waits for the last
        span's end, which the device reaches after every other (one stream)."""
        if not self.device_spans:
            return
        self.device_spans[-1][2].synchronize()
        for is_wait, start, end in self.device_spans:
            seconds = start.elapsed_time(end) / 1000.0  # milliseconds
            if is_wait:
                self.wait_s += seconds
                self.per_step_wait_s.append(seconds)
            else:
                self.compute_s += seconds
        self.device_spans.clear()


_TIMINGS: RingTimings | None = None


@contextmanager
def record_ring_timings() -> Iterator[RingTimings]:
    """Collect RingTimings for ring attention calls inside the block (the trainer's per-step
    record, benchmarks).

    On CPU/gloo a wait is the host blocked in `work.wait()`. On CUDA that call returns at once
    (it only makes the computing stream wait), so a wait is timed on the device instead: CUDA
    events on the computing stream around it measure how long the stream stalled for the
    transfer, and a block's compute likewise; they are read when the block ends.
    """
    global _TIMINGS
    previous, _TIMINGS = _TIMINGS, RingTimings()
    timings = _TIMINGS
    try:
        yield timings
        timings.settle()
    finally:
        _TIMINGS = previous


@contextmanager
def _timed(is_wait: bool, on_cuda: bool) -> Iterator[None]:
    """Add the block's time to the current RingTimings: CUDA events on the current stream, or
    the host's clock."""
    timings = _TIMINGS
    if timings is not None and on_cuda:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        timings.device_spans.append((is_wait, start, end))
        return
    begin = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            seconds = time.perf_counter() - begin
            if is_wait:
                timings.wait_s += seconds
                timings.per_step_wait_s.append(seconds)
            else:
                timings.compute_s += seconds


def timed_compute(device: torch.device | None = None) -> contextlib.AbstractContextManager:
    """Time a block's attention compute (on `device`'s stream when it is a GPU)."""
    return _timed(False, device is not None and device.type == "cuda")


# Fault injection, for tests only (tests/support/faults.py delays or stops a rank's sends): called
# with the ring and the tag just before this process posts an exchange. Nothing in ringpilot sets
# it; it is None in every production process.
_before_exchange: Callable[[Ring, int], None] | None = None


def set_exchange_hook(hook: Callable[[Ring, int], None] | None) -> None:
    """Install (or, with None, remove) the test hook called before each exchange is posted."""
    global _before_exchange
    _before_exchange = hook


class Exchange:
    """One posted ring shift: send tensors to the next peer, receive same-shaped ones from
    the previous.

    Post it before computing on the current block, wait after: the transfer runs behind the
    compute. Both peers post their exchanges in the same order, which is what matches sends to
    receives on NCCL; on gloo the tag also separates the two streams that overlap in backward
    (K/V and their gradients).
    """

    def __init__(self, ring: Ring, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor],
                 tag: int = 0) -> None:
        if _before_exchange is not None:
            _before_exchange(ring, tag)
        ops = [dist.P2POp(dist.isend, t, peer=ring.next_peer, group=ring.group, tag=tag)
               for t in send]
        ops += [dist.P2POp(dist.irecv, t, peer=ring.prev_peer, group=ring.group, tag=tag)
                for t in recv]
        self._works = dist.batch_isend_irecv(ops)
        self._on_cuda = any(t.is_cuda for t in recv)
        if _TIMINGS is not None:
            _TIMINGS.exchanges += 1
            _TIMINGS.exchanges_by_tag[tag] = _TIMINGS.exchanges_by_tag.get(tag, 0) + 1
            _TIMINGS.bytes_sent += sum(t.numel() * t.element_size() for t in send)

    def wait(self) -> None:
        with _timed(True, self._on_cuda):
            for work in self._works:
                work.wait()


def shift_tensors(ring: Ring, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Blocking ring shift of contiguous tensors (used to time pure communication)."""
    recv = [torch.empty_like(t) for t in tensors]
    Exchange(ring, tensors, recv).wait()
    return recv
