"""Keeping ring attention's results through activation checkpointing (the `attention` policy).

A checkpointed decoder layer keeps only its input and runs its forward again in backward; with
ring attention inside, that second forward sends every K/V block around the ring again and
computes every attention block again, only to rebuild what the ring's backward needs: the
output and its log-sum-exp. Under `saving_contexts()` (the `context_fn` of
torch.utils.checkpoint's non-reentrant checkpoint) the first forward keeps the ring's output and
log-sum-exp aside, and the recomputing forward takes them back instead of running the ring: the
projections, norms, RoPE and MLP are recomputed as before; the ring runs once forward and once
backward. Cost: the output (tokens x heads x head_dim in the compute dtype) and the fp32
log-sum-exp (tokens x heads) of every layer, held from its forward to its backward.

The slot belongs to one checkpointed call: torch asks `context_fn` for a pair of context
managers each time a wrapped layer runs, so each layer call gets its own slot, and backward
passes in any order (gradient accumulation, several losses) find their own results. Inside a
slot the ring calls replay in the order they were recorded (a layer calls its attention once;
the order is the layer's own code either way).
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator

import torch

_STATE = threading.local()  # .slot: the active _Slot, .replaying: bool


class _Slot:
    """The ring results of one checkpointed call, from its forward to its recomputation."""

    def __init__(self) -> None:
        self.results: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    @contextmanager
    def active(self, replaying: bool) -> Iterator[None]:
        # Set per thread: the recomputation runs in whichever thread runs the backward (on CUDA,
        # autograd's device thread), and enters its context manager there.
        previous = getattr(_STATE, "slot", None), getattr(_STATE, "replaying", False)
        _STATE.slot, _STATE.replaying = self, replaying
        try:
            yield
        finally:
            _STATE.slot, _STATE.replaying = previous


def saving_contexts():
    """`context_fn` for torch.utils.checkpoint.checkpoint(use_reentrant=False): (the first
    forward's context, the recomputation's context) of one call, sharing one slot."""
    slot = _Slot()
    return slot.active(replaying=False), slot.active(replaying=True)


def kept_result() -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inside a recomputation: the ring's (out, lse) kept by the first forward, in call order.
    None outside one (run the ring)."""
    slot = getattr(_STATE, "slot", None)
    if slot is None or not getattr(_STATE, "replaying", False):
        return None
    if not slot.results:
        raise RuntimeError("a recomputed layer called ring attention more often than its first "
                           "forward did; the `attention` checkpointing policy needs the same "
                           "calls in both (no data-dependent control flow around attention)")
    return slot.results.popleft()


def keep_result(out: torch.Tensor, lse: torch.Tensor) -> None:
    """In a checkpointed first forward: keep the ring's (out, lse) for the recomputation (a
    forward without grad never recomputes, and its slot goes with it)."""
    slot = getattr(_STATE, "slot", None)
    if slot is not None and not getattr(_STATE, "replaying", False):
        slot.results.append((out.detach(), lse.detach()))
