"""How `make test` spreads the suite over two pytest-xdist workers.

The tests that start Ray (marked `ray`, or using the `local_ray` fixture) and those that time
the machine (marked `timing`) must run one after another on one worker, at normal priority: two
local Ray clusters on this machine's two cores starve each other's heartbeats and health
windows, and a link timed beside busy CPUs reads slow. tests/conftest.py puts them in one
xdist_group, `front`, and lowers the other worker below Ray's workers; this checks that the
installed pytest and pytest-xdist honour the group (pytest 9.2 silently stopped doing so:
pytest-xdist#1386), on a small suite run the way the Makefile runs the real one.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SUITE = {
    "conftest.py": """
        import pytest
        from tests.conftest import (  # noqa: F401
            pytest_collection_modifyitems,
            pytest_itemcollected,
            pytest_runtest_setup,
        )

        @pytest.fixture(scope="session")
        def local_ray():
            yield "127.0.0.1:0"
        """,
    "test_plain.py": """
        import os
        import sys
        import threading
        import time
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_plain(i):
            time.sleep(0.2)
            if sys.platform.startswith("linux"):  # below Ray's workers (nice 15)
                assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 18
        """,
    "test_cluster.py": """
        import time
        import pytest

        @pytest.mark.parametrize("i", range(3))
        def test_uses_the_cluster(local_ray, i):
            time.sleep(0.2)

        @pytest.mark.ray
        def test_starts_its_own_head():
            time.sleep(0.2)

        @pytest.mark.timing
        def test_times_a_link():
            time.sleep(0.2)
        """,
}


def test_the_ray_tests_run_first_and_on_one_worker(tmp_path):
    for name, text in SUITE.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
    ran = re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED (\S+)", out.stdout)
    assert len(ran) == 11, out.stdout
    ray = [(worker, test) for worker, test in ran if "test_cluster.py" in test]
    assert len(ray) == 5 and {worker for worker, _ in ray} == {ray[0][0]}, \
        f"the Ray and timing tests were split: {ray}"
    assert all(test.endswith("@front") for _, test in ray), ray
    assert not any(test.endswith("@front") for _, test in ran if "test_plain.py" in test), ran
    # the group went out first: its worker's first test is one of them
    first_on_its_worker = next(test for worker, test in ran if worker == ray[0][0])
    assert "test_cluster.py" in first_on_its_worker, out.stdout


LEAKY_SUITE = {
    "conftest.py": """
        import tests.conftest as project
        from tests.conftest import _placement_groups_released, local_ray  # noqa: F401

        project.PLACEMENT_GROUP_GRACE_S = 1
        """,
    "test_leak.py": """
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        def test_fails_holding_a_group(local_ray):
            group = placement_group([{"CPU": 1}, {"CPU": 1}])
            ray.get(group.ready())
            assert False, "failed midway, as a gang test did on a loaded machine"

        def test_the_next_test_has_the_cpus(local_ray):
            assert all(info["state"] == "REMOVED" for info in placement_group_table().values())
            assert ray.available_resources().get("CPU") == 4
        """,
}


@pytest.mark.ray
def test_a_failed_ray_test_leaves_no_placement_group_to_the_next(tmp_path):
    for name, text in LEAKY_SUITE.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0"})
    assert "test_fails_holding_a_group FAILED" in out.stdout, out.stdout + out.stderr
    assert "test_the_next_test_has_the_cpus PASSED" in out.stdout, out.stdout + out.stderr
