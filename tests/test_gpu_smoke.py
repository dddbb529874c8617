"""benchmarks/gpu_smoke.py: skips cleanly without CUDA, its checks pass on the CPU kernels (every
step of it but the CUDA kernels themselves runs here), alone and as two torchrun ranks; the
arguments it hands torch for a GPU are the ones torch accepts; an unknown check is a failure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.cuda_calls import Reached, checking_init_process_group

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


def _run(*args: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: it runs instead")
def test_without_cuda_it_skips_with_a_reason():
    rc, report = _run()
    assert rc == 0 and "no CUDA device here" in report["skipped"]


def test_its_checks_pass_on_the_cpu_kernels():
    rc, report = _run("--device", "cpu", "--quick")
    assert rc == 0 and report["ok"] is True, report
    assert report["world_size"] == 1 and report["selected_kernel"]["kernel"] == "torch-cpu-flash"
    # every check of the mode ran and passed; gloo cannot send to itself, so no self-exchange
    assert report["checks"] == {name: True for name in (
        "kernel_parity", "emulated_ring", "document_blocks", "llama_loss", "llama_grads",
        "policy_moves_every_weight")}
    errors = report["kernels"]["torch-cpu-flash"]
    assert sorted(errors) == sorted(f"{m}_{t}" for m in ("causal", "full")
                                    for t in ("out", "lse", "dq", "dk", "dv"))
    assert all(0 < e < 2e-2 for e in errors.values())  # bf16 against fp32: small, not zero
    assert sorted(report["emulated_ring"]) == ["p2", "p3", "p4"]
    documents = dict(report["document_blocks"])
    assert documents.pop("blocks") >= 10  # mixed blocks of plain and balanced layouts
    assert sorted(documents) == ["dk", "dq", "dv", "lse", "out"]
    assert all(0 < e < 2e-2 for e in documents.values())
    assert report["llama_ring_vs_sdpa"]["grad_rel_err_max"] < 5e-2
    # fp32 master weights move everywhere at lr 2e-5; bf16 storage would lose most updates
    assert report["share_of_weights_changed_lr2e-5"] == 1.0
    assert report["share_of_weights_changed_lr2e-5_bf16_storage"] < 0.9


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke = _load_script()


# The arguments handed to torch for CUDA: no GPU runs CI, so they are checked here.

@pytest.mark.parametrize("local_rank", [0, 1, 3, 7])
def test_the_cuda_device_is_indexed_by_local_rank(monkeypatch, local_rank):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    device = smoke.build_device("cuda", smoke.local_rank())
    assert device.type == "cuda" and device.index == local_rank
    args = smoke.process_group_args(device, smoke.local_rank())
    assert args["backend"] == "nccl"
    assert args["device_id"] == torch.device("cuda", local_rank)
    assert args["device_id"].index == local_rank  # torch 2.13 refuses device_id without one


def test_alone_the_rank_is_0_and_the_cpu_takes_gloo(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert smoke.local_rank() == 0
    assert smoke.build_device("cuda", smoke.local_rank()) == torch.device("cuda", 0)
    cpu = smoke.build_device("cpu", 0)
    assert smoke.process_group_args(cpu, 0) == {"backend": "gloo", "device_id": None}


@pytest.mark.parametrize("device", [torch.device("cuda"), torch.device("cuda", 1)])
def test_an_unindexed_or_foreign_gpu_is_refused_before_torch_sees_it(device):
    with pytest.raises(ValueError, match=r"NCCL needs device_id cuda:<LOCAL_RANK> = cuda:0"):
        smoke.process_group_args(device, 0)


@pytest.mark.parametrize("world", [1, 2])
def test_what_each_mode_hands_init_process_group_on_cuda(monkeypatch, world):
    """Both modes' own call into torch, up to init_process_group, with that call replaced by
    torch's device_id checks (which need a GPU to run for real)."""
    seen = {}
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(smoke.dist, "init_process_group",
                        checking_init_process_group(seen))
    monkeypatch.setattr(smoke.dist, "TCPStore", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.update(set_device=device))
    device = smoke.build_device("cuda", smoke.local_rank())
    with pytest.raises(Reached):
        if world == 1:
            smoke.init_world_of_one(device)
        else:
            smoke.multi_rank(device, smoke.LAYER_QUICK, corrupt_rank=None)
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 1)
    if world > 1:
        assert seen["set_device"] == torch.device("cuda", 1)


# Unknown is failure: a check that did not run, or could not say, fails the run.

def test_ok_only_when_every_rank_passed_every_check():
    expected = ("a", "b")
    assert smoke.all_passed([{"a": True, "b": True}, {"a": True, "b": True}], expected)
    for broken in ({"a": True, "b": None}, {"a": True}, {"a": True, "b": False},
                   {"a": True, "b": 1}, {"a": True, "b": "skipped"}):
        assert not smoke.all_passed([{"a": True, "b": True}, broken], expected), broken
    assert not smoke.all_passed([], expected)
    assert not smoke.all_passed([{"a": True}], ())


def _torchrun(*args: str) -> tuple[int, list[str]]:
    from ray_jobs.ray_setup import free_port

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(SCRIPT),
         "--device", "cpu", "--quick", *args],
        capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout.strip().splitlines()


def test_two_ranks_run_the_ring_layer_against_sdpa_on_cpu():
    rc, lines = _torchrun()
    report = json.loads(lines[-1])
    assert rc == 0 and report["world_size"] == 2 and report["ok"] is True, report
    assert sum(line.startswith("{") for line in lines) == 1  # rank 1 prints no second report
    errors = report["ring_vs_sdpa_errors"]
    assert sorted(errors) == sorted(("out", "input_grad", "attn_out", "attn_input_grad"))
    # bf16 ring against the fp32 reference: small, and not zero (the two really differ)
    assert all(0 < e < 2e-2 for e in errors.values()), errors
    assert report["ring_vs_sdpa_max_err"] == max(errors.values())
    assert report["failed_checks"] == [] and report["ring_max_memory_allocated_gib"] is None


def test_one_broken_rank_turns_ok_false_on_rank_0():
    rc, lines = _torchrun("--corrupt-rank", "1")
    report = json.loads(lines[-1])
    assert rc == 1 and report["ok"] is False, report
    assert report["failed_checks"] == ["ring_vs_sdpa_attn_out"]
    assert report["ring_vs_sdpa_errors"]["attn_out"] > 0.5
