"""Stand-ins for torch calls that need a GPU, which check what a CPU test hands them the way
torch does (the smoke test once crashed on `device_id` without an index: a CPU test calling
through these would have caught it)."""

from __future__ import annotations

from collections.abc import Callable


class Reached(Exception):
    """Raised by a stand-in once it has checked its arguments: the code under test got there."""


def checking_init_process_group(seen: dict) -> Callable:
    """An init_process_group that records its backend and device_id in `seen`, refuses a CUDA
    device_id without an index as torch does, then raises Reached."""

    def init_process_group(backend=None, *, device_id=None, **kwargs):
        seen.update(backend=backend, device_id=device_id)
        if device_id is not None and device_id.index is None:
            raise ValueError("Please use a device_id with index.")
        raise Reached

    return init_process_group
