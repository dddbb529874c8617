"""The State API of a cluster that start_local_ray made answers its actors.

Ray Train's placement-group cleaner (an actor every TorchTrainer.fit starts) asks the State API
each second whether the controller still lives, and a stage's shutdown waits for the cleaner to
stop. In a cluster started by ray.init an actor had no way to find the API server: each check
spent 40 s looking for a GCS address, so every fit waited out the cleaner's 12 s stop timeout.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_an_actor_reads_its_own_state_from_this_clusters_api(local_ray):
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def own_state(self) -> tuple[str, str]:
            import os

            from ray.util.state import get_actor

            me = ray.get_runtime_context().get_actor_id()
            return os.environ.get("RAY_API_SERVER_ADDRESS", ""), get_actor(me, timeout=10).state

    probe = Probe.remote()
    try:
        api, state = ray.get(probe.own_state.remote(), timeout=60)
    finally:
        ray.kill(probe)
    assert api.startswith("http://127.0.0.1:"), api  # this cluster's dashboard, on loopback
    assert state == "ALIVE"
