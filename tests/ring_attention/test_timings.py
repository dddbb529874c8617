"""RingTimings: the host's clock on CPU; on CUDA, device events read once when the block ends
(their arithmetic checked here with stand-in events: no GPU on this machine)."""

from __future__ import annotations

import time

import torch

from ray_jobs.ring_attention.comm import RingTimings, record_ring_timings, timed_compute


class StandInEvent:
    """What RingTimings.settle uses of a torch.cuda.Event: a time, a wait, an elapsed time."""

    def __init__(self, at_s: float):
        self.at_s, self.synchronized = at_s, False

    def synchronize(self) -> None:
        self.synchronized = True

    def elapsed_time(self, end: StandInEvent) -> float:
        return (end.at_s - self.at_s) * 1000.0  # milliseconds, as CUDA reports


def test_device_spans_become_waits_and_compute_once_settled():
    timings = RingTimings()
    ends = [StandInEvent(0.5), StandInEvent(2.0), StandInEvent(2.25)]
    timings.device_spans = [(True, StandInEvent(0.0), ends[0]),
                            (False, StandInEvent(0.5), ends[1]),
                            (True, StandInEvent(2.0), ends[2])]
    timings.settle()
    assert (timings.wait_s, timings.compute_s, timings.per_step_wait_s) == (0.75, 1.5,
                                                                             [0.5, 0.25])
    assert ends[2].synchronized and not ends[0].synchronized  # one wait, for the last
    assert timings.device_spans == []
    timings.settle()  # nothing new: nothing added
    assert timings.wait_s == 0.75


def test_cpu_compute_is_timed_on_the_host_clock():
    with record_ring_timings() as timings:
        with timed_compute(torch.device("cpu")):
            time.sleep(0.02)
        with timed_compute():
            pass
    assert timings.compute_s > 0 and timings.device_spans == []
    with timed_compute(torch.device("cpu")):  # outside a recording: nothing to add to
        pass
