"""The probes on a gloo world, and the arguments the CUDA path hands torch (checked here: no GPU
runs these tests)."""

import pytest
import torch
from preflight_worlds import probe_world

from ray_jobs.preflight import rank as rank_module
from ray_jobs.preflight.probe import barrier_kwargs, check_device, time_collective
from tests.support.cuda_calls import Reached, checking_init_process_group
from tests.support.worlds import run_world


@pytest.mark.multiprocess
def test_every_probe_times_what_it_moves_on_three_ranks():
    results = run_world(3, probe_world)
    for rank, got in enumerate(results):
        assert len(got["ring"]) == 3 and all(t > 0 for t in got["ring"])  # 3 timed reps
        assert got["alone"] == []  # a ring of one moves nothing
        assert all(len(got["world"][op]) == 2 for op in got["world"])
        assert (got["pair group"] == []) == (rank == 2)  # outside the group: nothing timed
    # a pair is timed by its receiver, for each repetition of its batch
    assert {r: set(got["pairs"]) for r, got in enumerate(results)} == {
        0: {(1, 0)}, 1: {(2, 1)}, 2: {(0, 2)}}
    assert all(len(t) == 2 and min(t) > 0 for got in results for t in got["pairs"].values())
    assert results[0]["gathered"] == [{"rank": 0}, {"rank": 0, "second": True}, {"rank": 1},
                                      {"rank": 1, "second": True}, {"rank": 2},
                                      {"rank": 2, "second": True}]
    assert results[1]["gathered"] is None and results[2]["gathered"] is None
    assert [got["agreed"] for got in results] == [("batches", 0)] * 3


def test_an_unknown_collective_is_refused_before_any_transfer():
    with pytest.raises(ValueError, match="collective 'broadcast': one of all_reduce"):
        time_collective(None, "broadcast", 1024, 1, torch.device("cpu"))


@pytest.mark.parametrize("local", [0, 1, 7])
def test_the_cuda_path_names_the_ranks_own_gpu(local):
    device = rank_module.worker_device("cuda", local)
    assert device == torch.device("cuda", local) and device.index == local
    assert barrier_kwargs(device) == {"device_ids": [local]}
    kwargs = rank_module.process_group_kwargs(device)
    assert kwargs["backend"] == "nccl" and kwargs["device_id"].index == local
    cpu = rank_module.worker_device("cpu", local)
    assert barrier_kwargs(cpu) == {} and rank_module.process_group_kwargs(cpu)["backend"] == "gloo"


def test_a_gpu_without_an_index_is_refused_where_a_cpu_test_sees_it():
    for build in (check_device, barrier_kwargs, rank_module.process_group_kwargs):
        with pytest.raises(ValueError, match=r"torch.device\('cuda', local_rank\)"):
            build(torch.device("cuda"))


def test_a_rank_started_by_hand_binds_nccl_to_its_local_gpu(tmp_path, monkeypatch):
    """rank.main's own calls into torch on CUDA, up to init_process_group, which is replaced
    by torch's device_id check (it needs a GPU to run for real)."""
    from ray_jobs.preflight.run import PreflightConfig

    seen = {}
    config = tmp_path / "ranks.json"
    config.write_text(PreflightConfig(cluster={}, stages=[], out_dir=str(tmp_path)).to_json())
    monkeypatch.setattr(rank_module.dist, "init_process_group",
                        checking_init_process_group(seen))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.update(set_device=d))
    with pytest.raises(Reached):
        rank_module.main(["--config", str(config), "--node", "host1", "--local", "3",
                          "--device", "cuda"])
    assert seen == {"backend": "nccl", "device_id": torch.device("cuda", 3),
                    "set_device": torch.device("cuda", 3)}
