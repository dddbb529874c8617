"""The processes a launcher started, found and stopped by id (Linux /proc; no psutil needed).

A process is named by (pid, start time), so a pid the kernel has since given to another
process is never signalled. `tree(root)` is `root` and every descendant: Ray's head spawns the
GCS, the raylet, workers and, for a job, a driver in a session of its own, all below the
`ray start` process while it lives; snapshot them before stopping it, because orphans are
re-parented away from the tree.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of `pid`, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def tree(root: int) -> set[Proc]:
    """`root` and its descendants now."""
    parents: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parents.setdefault(st[0], []).append((int(entry), st[2]))
    root_stat = _stat(root)
    if root_stat is None:
        return set()
    found, todo = {(root, root_stat[2])}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def alive(procs: set[Proc]) -> set[Proc]:
    """Those of `procs` still running (a zombie, or a new process on the same pid, is not)."""
    out = set()
    for pid, start in procs:
        st = _stat(pid)
        if st is not None and st[2] == start and st[1] != "Z":
            out.add((pid, start))
    return out


def wait_gone(procs: set[Proc], timeout: float, hurry: Callable[[], bool] = lambda: False
              ) -> set[Proc]:
    """Wait up to `timeout` s (less once `hurry()`) for `procs` to end; returns the rest."""
    deadline = time.monotonic() + timeout
    while (left := alive(procs)) and time.monotonic() < deadline and not hurry():
        time.sleep(0.2)
    return left


def kill(procs: set[Proc]) -> None:
    """SIGKILL each of `procs` still running."""
    for pid, _ in alive(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
