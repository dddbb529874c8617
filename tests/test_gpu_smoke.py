"""benchmarks/gpu_smoke.py: skips cleanly without CUDA, and its checks pass on the CPU kernels
(every step of it but the CUDA kernels themselves runs here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert report["selected_kernel"]["kernel"] == "torch-cpu-flash"
    errors = report["kernels"]["torch-cpu-flash"]
    assert sorted(errors) == sorted(f"{m}_{t}" for m in ("causal", "full")
                                    for t in ("out", "lse", "dq", "dk", "dv"))
    assert all(0 < e < 2e-2 for e in errors.values())  # bf16 against fp32: small, not zero
    assert sorted(report["emulated_ring"]) == ["p2", "p3", "p4"]
    assert report["llama_ring_vs_sdpa"]["grad_rel_err_max"] < 5e-2
    # fp32 master weights move everywhere at lr 2e-5; bf16 storage would lose most updates
    assert report["share_of_weights_changed_lr2e-5"] == 1.0
    assert report["share_of_weights_changed_lr2e-5_bf16_storage"] < 0.9
