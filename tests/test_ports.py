"""Ports for the servers the project starts, and a Ray head that dies under the demo.

CI once lost a `make demo` test to a port race: the launcher took its Ray head's listener ports
from the kernel's ephemeral range (bind port 0, close, hand the number on), and before the
dashboard agent bound its port, one of the hundreds of connections a starting head opens took it
as its local end; the agent died, `ray start --block` stopped the head, and the launcher, which
only said "ray job submit kept failing", never said why.
"""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from ray_jobs import ray_setup
from ray_jobs.ray_setup import free_port
from ringpilot.launch import Demo, StopSignals


def test_ports_come_from_below_the_ephemeral_range_and_above_rays_workers():
    low = int(ray_setup.EPHEMERAL_RANGE.read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50, "a port was handed out twice"
    assert all(ray_setup.RAY_MAX_WORKER_PORT < p < low for p in ports), ports
    for p in ports[:5]:  # free when handed out: a server can bind it
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_in_use_is_never_handed_out(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        # the picker's random choice is forced to the busy port first, then to a free one
        choices = iter([busy, busy, 21000 if busy != 21000 else 21001])
        monkeypatch.setattr(ray_setup._random, "randint", lambda a, b: next(choices))
        monkeypatch.setattr(ray_setup, "_given", set())
        monkeypatch.setattr(ray_setup, "RAY_MAX_WORKER_PORT", 0)  # busy may lie anywhere
        monkeypatch.setattr(ray_setup, "EPHEMERAL_RANGE", ray_setup.Path("/nonexistent"))
        got = free_port()
    assert got != busy


@pytest.fixture
def dying_ray(tmp_path):
    """A `ray` executable that starts, says which of its processes died, and exits 1, as
    `ray start --block` does when a process of the head dies."""
    ray = tmp_path / "ray"
    ray.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, time
        print("Local node IP: 127.0.0.1", flush=True)
        print("Some Ray subprocesses exited unexpectedly:", flush=True)
        print("  dashboard_agent [exit code=1]", flush=True)
        print("Remaining processes will be killed.", flush=True)
        sys.exit(1)
        """))
    ray.chmod(ray.stat().st_mode | stat.S_IXUSR)
    return ray


def test_a_head_that_dies_says_why(dying_ray):
    with StopSignals() as signals:
        demo = Demo(str(dying_ray), {}, signals)
        with pytest.raises(RuntimeError) as e:
            demo.start_head(free_port(), 1)
        signals.stopping = True
        demo.stop()
    message = str(e.value)
    assert "the Ray head exited with code 1" in message
    assert "dashboard_agent [exit code=1]" in message
    assert demo.head_log.exists(), "the log the message names was removed"
    demo.head_log.unlink()


def test_a_head_that_dies_after_the_dashboard_answered_stops_the_submission(dying_ray):
    with StopSignals() as signals:
        demo = Demo(str(dying_ray), {}, signals)
        demo.url = "http://127.0.0.1:1"
        demo.head_log = dying_ray.parent / "head.log"
        demo.head = subprocess.Popen([str(dying_ray)], stdout=demo.head_log.open("w"))
        demo.head.wait()
        with pytest.raises(RuntimeError, match="dashboard_agent"):
            demo.submit("job", "run.yaml")
        assert demo.job is None
