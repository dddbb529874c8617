"""Fixtures shared across test areas: one local Ray cluster on 127.0.0.1 per test session."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from ray_jobs.eval.lm_eval.adapter import offline_environment

ROOT = Path(__file__).resolve().parents[1]
# lm-eval's RULER tasks stay off the network in every test (and in the Ray workers the tests
# start, which inherit this environment): set before anything imports huggingface_hub or nltk.
offline_environment()
PLACEMENT_GROUP_GRACE_S = 30
FRONT = "front"  # the xdist group of the tests that need the CPUs on time (below)


def _in_the_front_group(item: pytest.Item) -> bool:
    """Tests that start Ray (marked `ray`, or on the session's cluster) or time the machine
    (marked `timing`)."""
    return (item.get_closest_marker("ray") is not None
            or item.get_closest_marker("timing") is not None
            or "local_ray" in item.fixturenames)


def pytest_itemcollected(item):
    """`make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`). The tests that
    start Ray or time the machine form one group, `front`, run in turn on one worker at normal
    priority while the other takes everything else at a low one: two Ray clusters at once on
    this machine's two cores would starve each other's heartbeats, and a link timed while other
    tests take the CPUs reads slow (a fabric test named an unthrottled hop 3x slow that way).
    (Marked here, as each test is collected: xdist reads the groups in its own
    pytest_collection_modifyitems, which can run before this file's.)"""
    if _in_the_front_group(item):
        item.add_marker(pytest.mark.xdist_group(FRONT))


# The nice value of the worker that runs the tests outside the front group: below Ray's workers
# (15, which the raylet gives them) so that the Ray tests' training, health windows and gangs
# and the timing tests are not starved by unit tests on the other worker; above 19, so that a
# test of code that lowers a thread to 19 still sees it lowered.
UNIT_WORKER_NICE = 18


def pytest_runtest_setup(item):
    """On an xdist worker, before its first test outside the front group, every thread of the
    worker drops to UNIT_WORKER_NICE (Linux: nice is per thread; later threads inherit it). A CI run
    without this took 75 minutes: the Ray tests' workers, at nice 15, got a sliver of the two
    cores beside the unit tests at nice 0, and a gang test ran out of its 300 s."""
    if (os.environ.get("PYTEST_XDIST_WORKER") and sys.platform.startswith("linux")
            and not _in_the_front_group(item)):
        for tid in os.listdir("/proc/self/task"):
            try:
                if os.getpriority(os.PRIO_PROCESS, int(tid)) < UNIT_WORKER_NICE:
                    os.setpriority(os.PRIO_PROCESS, int(tid), UNIT_WORKER_NICE)
            except OSError:  # the thread ended meanwhile
                pass


def pytest_collection_modifyitems(config, items):
    """The front group goes first, so that one worker starts on it at once (loadgroup hands
    out work in collection order) and the long Ray tests overlap the many short ones. In one
    process the order stays the collection's."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    front = [item for item in items if _in_the_front_group(item)]
    ids = {id(item) for item in front}
    items[:] = front + [item for item in items if id(item) not in ids]


@pytest.fixture(autouse=True)
def _placement_groups_released(request):
    """A Ray test that fails midway can leave a placement group behind, holding CPUs: an
    evaluation gang whose scheduler was still retrying when the test gave up, say. Every later
    test that needs those CPUs then waits for them for ever, in a ray.get that pytest-timeout's
    signal does not interrupt (a CI run once hung that way: a gang test failed on a loaded
    machine, and the four-worker test after it never got its workers). After each test on the
    session's cluster, the groups it created are given a moment to go (Ray Train removes its own
    from an actor, just after fit returns) and then removed."""
    if "local_ray" not in request.fixturenames:
        yield
        return
    import ray
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    request.getfixturevalue("local_ray")
    before = set(placement_group_table())
    yield

    def left() -> list[str]:
        return [pg for pg, info in placement_group_table().items()
                if pg not in before and info["state"] != "REMOVED"]

    deadline = time.monotonic() + PLACEMENT_GROUP_GRACE_S
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    removed = left()
    for pg in removed:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg)))
    # the raylet returns a removed group's CPUs a moment later: the next test finds them free
    deadline = time.monotonic() + PLACEMENT_GROUP_GRACE_S
    while time.monotonic() < deadline and any(
            name.endswith(pg) for name in ray.available_resources() for pg in removed):
        time.sleep(0.2)


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A test that runs Ray Train's trainer in this process leaves its SIGINT handler installed;
    put back what was there, so no later test sees another's handlers."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        if signal.getsignal(s) is not handler:
            signal.signal(s, handler)


@pytest.fixture(scope="session")
def local_ray():
    """Start Ray once for every area that needs it (two `ray.init`s in one process fail).

    Four logical CPUs: two training workers plus evaluation actors and drivers beside them.
    Returns the GCS address, for drivers started in subprocesses.
    """
    import ray

    from ray_jobs.ray_setup import start_local_ray

    yield start_local_ray(4, log_to_driver=False,
                          env_vars={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                    "RAY_USAGE_STATS_ENABLED": "0"})
    ray.shutdown()
