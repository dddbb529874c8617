"""Ring health: which K/V hop of a ring is slow and which rank stopped, as pure functions of what
the workers record (docs/observability.md, "Ring health").

Slow hops. Every step each rank records how long it waited for the K/V blocks arriving from its
ring's previous rank (`kv_wait_s`: the wait on exactly one incoming hop, prev -> rank). Lateness
travels down a ring: a rank that waited posts its own sends late, so the ranks after it wait too,
less and less. The hop where a delay enters is the one whose receiver waited more than its sender
did; that excess (receiver's wait less sender's) sums to zero around a ring and is large and
positive on exactly one hop when one link or sender is slow. A hop is slow in a step when its
excess is `factor` times the median excess (floored at 0) of its ring's other hops, is at least
MIN_WAIT_SHARE of the step, and (when the plan predicts one) its wait is `factor` times the
predicted exposed K/V time. The comparison with the ring's own hops is what makes it robust:
they share the step's compute, its load and the same prediction error, so on a CPU run, whose
prediction is rough or absent, the ring is its own reference. A hop is reported once it was slow
in `slow_steps` of its last `window` steps, and again only after a whole window without a slow
step: a single stall is never a finding, and a slow link is one finding, not one per step. A ring
whose hops are all equally slow is not singled out here (it shows as step time against the
prediction in the summary).

Hangs. Every rank's heartbeat says which step and phase it is in, when that last changed, and
whether its training thread is waiting on the others (inside torch.distributed, the ring's
exchange or Ray Train's report) or elsewhere. When no rank has progressed for `timeout` seconds,
the ranks that wait tell which did not: a rank with no heartbeat, a rank whose heartbeat stopped,
a rank outside any wait, or else a rank behind the others' step. If every rank waits in a
collective at the same step, no single rank is named (a transfer that never completes: NCCL's
watchdog and its flight recorder dump tell which).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from topology.graph import Link, gpu_vertex

# A hop whose extra wait is below this share of the step is not worth a finding, however many
# times its ring's others it is: near-zero waits (a hidden exchange) make large ratios of noise.
MIN_WAIT_SHARE = 0.05
# Training phases in which a stopped rank may be ended (its group then restarts): once a rank
# steps, its peers' waits are bounded by a step or a checkpoint. Before that (start, load) a
# slow filesystem can hold one rank for long while the others wait: reported only.
ENDABLE_PHASES = ("step", "checkpoint")


@dataclass(frozen=True)
class SlowHop:
    """A hop (sender -> receiver, global ranks) found persistently slow at `step`; the seconds
    are medians over its slow steps in the window."""

    step: int
    sender: int
    receiver: int
    ring: tuple[int, ...]  # the hop's ring, in sending order
    wait_s: float  # the receiver's K/V wait per step
    excess_s: float  # that wait less the sender's own
    peers_s: float  # the other hops' median excess (floored at 0)
    predicted_s: float | None  # the plan's exposed K/V time per step, when it has one
    sender_compute: float | None  # sender's attention compute over its ring's median
    slow_steps: int
    window: int


@dataclass
class _HopWindow:
    steps: deque = field(default_factory=deque)  # (slow?, wait, excess, peers, compute ratio)
    reported: bool = False


def rings_of(prevs: Sequence[int | None]) -> list[tuple[int, ...]]:
    """The rings, each in sending order from its lowest rank, from every rank's previous peer
    (None: a ring of one). ValueError when `prevs` is not a set of cycles."""
    pairs = [(p, r) for r, p in enumerate(prevs) if p is not None and p != r]
    next_of = dict(pairs)
    if len(next_of) != len(pairs) or not set(next_of) <= set(range(len(prevs))):
        raise ValueError(f"ring_prev {list(prevs)} is not a set of rings: a rank is the previous "
                         "peer of two ranks, or not a rank")
    rings, seen = [], set()
    for start in sorted(next_of):
        if start in seen:
            continue
        ring, rank = [start], next_of[start]
        while rank != start:
            if rank not in next_of:
                raise ValueError(f"ring_prev {list(prevs)}: rank {rank} ends a ring that does "
                                 "not close")
            ring.append(rank)
            rank = next_of[rank]
        seen.update(ring)
        rings.append(tuple(ring))
    return rings


class SlowHopDetector:
    """Rolling windows of every hop's wait; `observe` one step at a time, in step order."""

    def __init__(self, window: int, slow_steps: int, factor: float,
                 predicted_wait_s: float | None = None):
        if not 1 <= slow_steps <= window:
            raise ValueError(f"slow_steps {slow_steps} must be in 1..window ({window})")
        self.window, self.slow_steps, self.factor = window, slow_steps, factor
        self.predicted_wait_s = predicted_wait_s
        self.hops: dict[tuple[int, int], _HopWindow] = {}

    def observe(self, step: int, step_s: float, waits: Sequence[float],
                prevs: Sequence[int | None],
                computes: Sequence[float] | None = None) -> list[SlowHop]:
        """Feed one step: every rank's wait on its incoming hop, its previous peer and (when
        recorded) its attention compute. Returns the hops that became persistently slow."""
        found = []
        for ring in rings_of(prevs):
            excess = {r: waits[r] - waits[prevs[r]] for r in ring}
            for receiver in ring:
                sender = prevs[receiver]
                peers = statistics.median(max(0.0, excess[r]) for r in ring if r != receiver)
                ratio = _ratio(computes, sender, ring)
                slow = self._slow(waits[receiver], excess[receiver], peers, step_s)
                hop = self.hops.setdefault((sender, receiver), _HopWindow())
                hop.steps.append((slow, waits[receiver], excess[receiver], peers, ratio))
                if len(hop.steps) > self.window:
                    hop.steps.popleft()
                count = sum(s[0] for s in hop.steps)
                if count >= self.slow_steps and not hop.reported:
                    hop.reported = True
                    found.append(self._finding(step, sender, receiver, ring, hop, count))
                elif hop.reported and count == 0 and len(hop.steps) == self.window:
                    hop.reported = False  # a whole window healthy: a new slowdown is news
        return found

    def healthy(self) -> list[tuple[int, int]]:
        """The hops without a slow step in their window (sender, receiver)."""
        return [key for key, hop in self.hops.items() if not any(s[0] for s in hop.steps)]

    def _slow(self, wait: float, excess: float, peers: float, step_s: float) -> bool:
        if excess <= self.factor * peers or excess < MIN_WAIT_SHARE * step_s:
            return False
        return self.predicted_wait_s is None or wait > self.factor * self.predicted_wait_s

    def _finding(self, step: int, sender: int, receiver: int, ring: tuple[int, ...],
                 hop: _HopWindow, count: int) -> SlowHop:
        bad = [s for s in hop.steps if s[0]]
        ratios = [s[4] for s in bad if s[4] is not None]
        return SlowHop(step=step, sender=sender, receiver=receiver, ring=ring,
                       wait_s=statistics.median(s[1] for s in bad),
                       excess_s=statistics.median(s[2] for s in bad),
                       peers_s=statistics.median(s[3] for s in bad),
                       predicted_s=self.predicted_wait_s,
                       sender_compute=statistics.median(ratios) if ratios else None,
                       slow_steps=count, window=len(hop.steps))


def _ratio(computes: Sequence[float] | None, rank: int, ring: tuple[int, ...]) -> float | None:
    """`rank`'s attention compute over the median of its ring's others (None: not recorded)."""
    if computes is None:
        return None
    others = statistics.median(computes[r] for r in ring if r != rank)
    return computes[rank] / others if others > 0 else None


def suspect_links(route: Callable[[str, str], list[Link]], hop: tuple[str, str],
                  healthy: Iterable[tuple[str, str]]) -> list[Link]:
    """The directed links of `hop`'s route (GPU vertices) that no healthy hop's route crosses:
    where the slowness can be, since every link a healthy hop uses carries it fine."""
    clean = {link for a, b in healthy for link in route(a, b)}
    return [link for link in route(*hop) if link not in clean]


@dataclass(frozen=True)
class Beat:
    """One rank's heartbeat (ray_jobs/train/heartbeat.py writes it)."""

    rank: int
    world: int
    node: str
    gpu: int  # the local device index the plan places it by
    pid: int
    node_id: str  # its Ray node, where its process can be ended
    started: float  # its process's start (kernel clock ticks after boot): who the pid is
    step: int  # steps begun in the stage
    phase: str  # start, load, step or checkpoint
    beat_at: float  # its own clock, only compared with its own earlier beats
    waiting: bool  # its training thread waits on the others
    where: str  # file:line in function, of its training thread
    ring_prev: int | None

    @property
    def vertex(self) -> str:
        return gpu_vertex(self.node, self.gpu)

    @classmethod
    def from_json(cls, data: dict) -> Beat:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RankView:
    """A rank's newest beat and, on the watcher's clock, when its progress (step, phase) and
    its beat last changed: the watcher compares its own times, never the nodes' clocks."""

    beat: Beat
    progressed_at: float
    beat_seen_at: float


@dataclass(frozen=True)
class Hang:
    """No rank progressed for `stalled_s` seconds; `stopped` are the ranks the others wait for
    (empty: every rank waits at the same step), `missing` ranks never sent a heartbeat."""

    step: int
    stalled_s: float
    stopped: tuple[Beat, ...]
    missing: tuple[int, ...]
    waiting: tuple[int, ...]  # ranks waiting on the others
    frozen: tuple[int, ...]  # stopped ranks whose heartbeat stopped too (dead or wedged)

    @property
    def endable(self) -> tuple[Beat, ...]:
        """Stopped ranks that may be ended: past their first step, with a process to end."""
        return tuple(b for b in self.stopped if b.phase in ENDABLE_PHASES)


def diagnose_hang(views: dict[int, RankView], now: float, timeout: float) -> Hang | None:
    """A Hang when no rank has progressed for `timeout` seconds while some rank still beats
    (a group whose every heartbeat stopped is gone: Ray Train handles dead workers); else
    None."""
    if not views:
        return None
    newest = max(v.progressed_at for v in views.values())
    alive = [v for v in views.values() if now - v.beat_seen_at <= timeout]
    if now - newest <= timeout or not alive:
        return None
    world = max(v.beat.world for v in views.values())
    missing = tuple(r for r in range(world) if r not in views)
    frozen = tuple(r for r, v in sorted(views.items()) if now - v.beat_seen_at > timeout)
    stopped = [v.beat for r, v in sorted(views.items())
               if r in frozen or not v.beat.waiting]
    step = max(v.beat.step for v in views.values())
    if not stopped and not missing:  # all wait: one behind the others' step is the one
        stopped = [v.beat for _, v in sorted(views.items()) if v.beat.step < step]
    named = {b.rank for b in stopped}
    waiting = tuple(r for r, v in sorted(views.items()) if r not in named and v.beat.waiting)
    return Hang(step=step, stalled_s=now - newest, stopped=tuple(stopped), missing=missing,
                waiting=waiting, frozen=frozen)


# What a hang finding calls each phase of a worker (ray_jobs/train/heartbeat.py marks them).
PHASE_WORDS = {"start": "while starting", "load": "while loading", "step": "inside the step",
               "checkpoint": "while saving a checkpoint"}
MAX_NAMED_LINKS = 8  # a finding stays one readable line; the ledger keeps every link


def render_slow_hop(hop: SlowHop, places: dict[int, Beat], links: list[Link] | None,
                    factor: float) -> str:
    """The finding in one line: the hop, its places, how slow against what, and where to look:
    the sender when its attention compute is `factor` times its ring's, else the links of the
    hop no healthy hop shares (`links` None: no cluster description to route on)."""
    src, dst = places.get(hop.sender), places.get(hop.receiver)
    where = f" ({src.vertex} -> {dst.vertex})" if src is not None and dst is not None else ""
    predicted = (f", predicted exposed K/V {hop.predicted_s:.3f} s"
                 if hop.predicted_s is not None else "")
    if hop.sender_compute is not None and hop.sender_compute >= factor:
        suspects = (f"its sender's attention compute is {hop.sender_compute:.1f}x its ring's: "
                    "suspect the sender, not the link")
    elif links is None:
        suspects = "links unknown (no cluster description: resources.cluster)"
    elif links:
        more = len(links) - MAX_NAMED_LINKS
        suspects = "suspect links " + ", ".join(
            f"{a} -> {b}" for a, b in links[:MAX_NAMED_LINKS]) + (
            f" and {more} more" if more > 0 else "")
    else:
        suspects = "healthy hops share every link of its route: suspect its endpoints"
    return (f"slow ring hop rank {hop.sender} -> rank {hop.receiver}{where}: rank "
            f"{hop.receiver} waited {hop.wait_s:.3f} s/step for K/V, {hop.excess_s:.3f} s more "
            f"than its sender (its ring's other hops: {hop.peers_s:.3f} s){predicted}; slow in "
            f"{hop.slow_steps} of the last {hop.window} steps; {suspects}")


def render_hang(hang: Hang, action: str, dump: str | None) -> str:
    """The finding in one line: who stopped, where, for how long, what the driver did."""
    if hang.stopped or hang.missing:
        parts = [f"rank {b.rank} (node {b.node}, GPU {b.vertex}, pid {b.pid}) stopped at step "
                 f"{b.step} {PHASE_WORDS.get(b.phase, b.phase)}"
                 + (", its heartbeat too" if b.rank in hang.frozen else f", at {b.where}")
                 for b in hang.stopped]
        parts += [f"rank {r} never sent a heartbeat" for r in hang.missing]
        waiting = (f"; ranks {', '.join(map(str, hang.waiting))} wait for it"
                   if hang.waiting else "")
        who = "; ".join(parts) + waiting
    else:
        who = (f"every rank waits in a collective at step {hang.step} (a transfer that never "
               "completes, not a rank)")
    trace = f"; NCCL flight recorder dumps to {dump}<rank>" if dump else ""
    return f"hang, no progress for {hang.stalled_s:.0f} s: {who}; {action}{trace}"
