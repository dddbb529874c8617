"""Ring health as pure functions: slow hops from synthetic per-step records, hangs from synthetic
heartbeats, suspect links on a real cluster graph."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ray_jobs.train.health import (
    MIN_WAIT_SHARE,
    Beat,
    RankView,
    SlowHopDetector,
    diagnose_hang,
    render_hang,
    render_slow_hop,
    rings_of,
    suspect_links,
)

ROOT = Path(__file__).resolve().parents[2]
STEP_S = 1.0
NOISE_S = 0.02  # every hop's wait jitters by up to 2 % of the step


def ring_prevs(rings: list[list[int]]) -> list[int]:
    """Every rank's previous peer, for rings given in sending order."""
    prevs = [0] * sum(map(len, rings))
    for ring in rings:
        for i, rank in enumerate(ring):
            prevs[rank] = ring[i - 1]
    return prevs


RINGS = [[0, 1, 2, 3], [4, 5, 6, 7]]  # two rings of four (dp 2, or Ulysses 2 x ring 4)
PREVS = ring_prevs(RINGS)


def waits(rng: random.Random, slow: dict[int, float] | None = None) -> list[float]:
    """One step's K/V waits per rank: noise, plus for each slow hop (receiver -> added delay)
    the delay as it travels down its ring: its receiver waits it all, each rank after waits
    less, its sender least (a late rank posts its own sends late)."""
    out = [rng.uniform(0, NOISE_S) for _ in PREVS]
    for receiver, delay in (slow or {}).items():
        ring = next(r for r in RINGS if receiver in r)
        start = ring.index(receiver)
        for j in range(len(ring)):
            out[ring[(start + j) % len(ring)]] += delay * (len(ring) - 1 - j) / (len(ring) - 1)
    return out


def detector(**kw) -> SlowHopDetector:
    return SlowHopDetector(**{"window": 10, "slow_steps": 5, "factor": 3.0, **kw})


def test_rings_are_read_from_the_previous_peers():
    assert rings_of(PREVS) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert rings_of([None, None]) == []  # rings of one: no hop
    assert rings_of([1, 0]) == [(0, 1)]
    with pytest.raises(ValueError, match="not a set of rings"):
        rings_of([1, 0, 0])  # rank 0 sends to two ranks


def test_one_slow_hop_is_found_within_its_window_and_named_alone():
    rng, watch, found = random.Random(0), detector(), []
    for step in range(1, 41):
        slow = {2: 0.4} if step > 10 else None  # rank 1 -> rank 2 slows at step 11
        found += watch.observe(step, STEP_S, waits(rng, slow), PREVS)
    [hop] = found
    assert (hop.sender, hop.receiver, hop.ring) == (1, 2, (0, 1, 2, 3))
    assert 11 <= hop.step <= 10 + watch.window  # within one window of the slowdown
    assert hop.wait_s == pytest.approx(0.4, abs=NOISE_S)
    assert hop.excess_s > 0.3 and hop.peers_s < NOISE_S
    # its downstream ranks waited too (0.27 s, 0.13 s): only where the delay enters is named
    assert (1, 2) not in watch.healthy() and (2, 3) in watch.healthy()


def test_healthy_noisy_hops_are_never_reported():
    """3,000 steps of jitter and random one-step stalls of any rank, up to 40 % of a step."""
    rng, watch = random.Random(1), detector()
    for step in range(1, 3001):
        stall = {rng.randrange(8): rng.uniform(0.1, 0.4)} if rng.random() < 0.15 else None
        assert watch.observe(step, STEP_S, waits(rng, stall), PREVS) == [], f"step {step}"


def test_a_slowdown_is_reported_once_and_again_only_after_a_healthy_window():
    rng, watch = random.Random(2), detector()
    steps = {}
    for step in range(1, 121):
        # one stall (step 5), then slow for 40 steps, healthy for 30, slow again
        slow = ({6: 3.0} if step == 5 else {6: 0.4} if 20 <= step < 60 or step >= 90 else None)
        for hop in watch.observe(step, STEP_S, waits(rng, slow), PREVS):
            steps.setdefault((hop.sender, hop.receiver), []).append(hop.step)
    assert list(steps) == [(5, 6)]
    first, second = steps[(5, 6)]
    assert 20 <= first < 30 and 90 <= second < 100  # the stall alone never was a finding


def test_a_hop_below_its_predicted_wait_is_not_slow():
    """With a plan, a hop must also exceed factor x the predicted exposed K/V time."""
    for predicted, reported in ((0.2, False), (0.05, True)):
        rng, watch, found = random.Random(3), detector(predicted_wait_s=predicted), []
        for step in range(1, 21):
            found += watch.observe(step, STEP_S, waits(rng, {1: 0.4}), PREVS)
        assert bool(found) is reported, f"predicted {predicted}"


def test_the_floor_ignores_tiny_waits_however_lopsided():
    rng, watch = random.Random(4), detector()
    for step in range(1, 31):
        tiny = [w * 0.01 for w in waits(rng, {1: MIN_WAIT_SHARE * STEP_S * 0.9 / 0.01})]
        assert watch.observe(step, STEP_S, tiny, PREVS) == []


def test_a_slow_sender_is_told_from_a_slow_link_by_its_compute():
    rng, watch, found = random.Random(5), detector(), []
    for step in range(1, 21):
        computes = [0.1] * 8
        computes[0] = 0.45  # rank 0 computes its blocks 4.5x slower, so it sends late
        found += watch.observe(step, STEP_S, waits(rng, {1: 0.35}), PREVS, computes)
    [hop] = found
    assert hop.sender == 0 and hop.sender_compute == pytest.approx(4.5)
    assert "suspect the sender, not the link" in render_slow_hop(hop, {}, None, 3.0)


def test_suspect_links_are_the_hops_own():
    """Two rings on one L40S server: 0 -> 2 slow, 1 -> 3 healthy. Both cross the sockets'
    links; only the slow hop's first and last PCIe links are its own."""
    from topology.graph import Router, build_graph
    from topology.sources import load_cluster

    spec = load_cluster(ROOT / "configs" / "clusters" / "l40s-2node-leaf.yaml")
    route = Router(spec, build_graph(spec)).route
    n = "node-000"
    healthy = [(f"{n}/gpu2", f"{n}/gpu0"), (f"{n}/gpu1", f"{n}/gpu3"), (f"{n}/gpu3", f"{n}/gpu1")]
    links = suspect_links(route, (f"{n}/gpu0", f"{n}/gpu2"), healthy)
    assert links == [(f"{n}/gpu0", f"{n}/sw0"), (f"{n}/sw1", f"{n}/gpu2")]
    shared = (f"{n}/sw0", f"{n}/cpu0")
    assert shared in route(f"{n}/gpu0", f"{n}/gpu2") and shared not in links


def beat(rank: int, *, step: int = 5, phase: str = "step", waiting: bool = True,
         where: str = "torch/distributed/distributed_c10d.py:10 in wait", world: int = 4) -> Beat:
    return Beat(rank=rank, world=world, node=f"n{rank // 2}", gpu=rank % 2, pid=100 + rank,
                node_id=f"id{rank // 2}", started=1.0, step=step, phase=phase, beat_at=0.0,
                waiting=waiting, where=where, ring_prev=(rank - 1) % world)


def views(*beats: Beat, progressed: float = 0.0, seen: float = 95.0, frozen=()) -> dict:
    return {b.rank: RankView(b, progressed, 0.0 if b.rank in frozen else seen) for b in beats}


def test_the_rank_outside_any_wait_is_the_one_that_stopped():
    stuck = beat(2, waiting=False, where="tests/support/faults.py:9 in __call__")
    hang = diagnose_hang(views(beat(0), beat(1), stuck, beat(3)), now=100.0, timeout=60.0)
    assert [b.rank for b in hang.stopped] == [2] and hang.waiting == (0, 1, 3)
    assert (hang.step, hang.stalled_s, hang.endable) == (5, 100.0, (stuck,))
    line = render_hang(hang, "ended its process", "health/s1/attempt-1/nccl-trace-rank")
    for part in ("rank 2 (node n1, GPU n1/gpu0, pid 102) stopped at step 5 inside the step, at "
                 "tests/support/faults.py:9",
                 "ranks 0, 1, 3 wait for it", "ended its process",
                 "dumps to health/s1/attempt-1/nccl-trace-rank<rank>"):
        assert part in line


@pytest.mark.parametrize("case, make, stopped, missing", [
    ("behind", lambda: views(beat(0), beat(1, step=4), beat(2), beat(3)), [1], ()),
    ("heartbeat stopped", lambda: views(beat(0), beat(1), beat(2), beat(3), frozen=(3,)), [3], ()),
    ("never beat", lambda: views(beat(0), beat(1), beat(2)), [], (3,)),
    ("all wait", lambda: views(beat(0), beat(1), beat(2), beat(3)), [], ()),
])
def test_who_stopped_is_told_by_those_who_wait(case, make, stopped, missing):
    hang = diagnose_hang(make(), now=100.0, timeout=60.0)
    assert [b.rank for b in hang.stopped] == stopped and hang.missing == missing, case
    if case == "all wait":
        assert "every rank waits in a collective at step 5" in render_hang(hang, "", None)


def test_no_hang_while_progress_is_recent_or_once_every_heartbeat_stopped():
    quiet = views(beat(0), beat(1, waiting=False), progressed=50.0)
    assert diagnose_hang(quiet, now=100.0, timeout=60.0) is None  # 50 s < 60 s
    gone = views(beat(0), beat(1, waiting=False), seen=10.0)
    assert diagnose_hang(gone, now=100.0, timeout=60.0) is None  # Ray Train's dead workers
    assert diagnose_hang({}, now=100.0, timeout=60.0) is None


def test_a_rank_stopped_while_loading_is_reported_not_ended():
    hang = diagnose_hang(views(beat(0, phase="load", step=0),
                               beat(1, phase="load", step=0, waiting=False)),
                         now=100.0, timeout=60.0)
    assert [b.rank for b in hang.stopped] == [1] and hang.endable == ()
