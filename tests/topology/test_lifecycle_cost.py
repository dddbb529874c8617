"""The lifecycle memory model (topology.cost.lifecycle_memory): load, resume, save and export per
GPU and per host process, on a shape small enough to work by hand, and the refusal of a layout
whose load or export does not fit."""

from __future__ import annotations

import pytest

from specs.degrees import ParallelDims
from topology.cost import (
    READ_CHUNK_BYTES,
    StageDoesNotFit,
    StageShape,
    check_fits,
    check_lifecycle_fits,
    export_file_shares,
    lifecycle_memory,
    lifecycle_peaks,
    memory_per_gpu,
    parameter_shapes,
)
from topology.profile import L40S

NO_RESERVE = L40S.model_copy(update={"memory_reserve_bytes": 0.0})
RESERVE = "reserve (CUDA context, NCCL, fragmentation)"

# vocab 8, hidden 4, intermediate 6, 2 heads of 2 (one K/V head), one layer, fp32 state over 2:
# embedding 8x4 = 32, q 4x4 = 16, k 2x4 = 8, v 8, o 4x4 = 16, gate 6x4 = 24, up 24, down 4x6 = 24,
# two norms 4 each, final norm 4, lm_head 32: 196 parameters.
SMALL = StageShape(seq_len=64, ring=2, dp=1, batch_size=1, grad_accum=1, steps=1, layers=1,
                   hidden=4, intermediate=6, heads=2, kv_heads=1, head_dim=2, vocab=8,
                   params=196, elem_bytes=4, shard=2, state_bytes=4)


def test_the_parameter_list_is_llamas():
    assert sum(rows * row for _, rows, row in parameter_shapes(SMALL)) == SMALL.params
    names = [n for n, _, _ in parameter_shapes(SMALL)]
    assert names[0] == "embed_tokens" and names[-2:] == ["norm", "lm_head"]


def test_the_8b_parameter_list_counts_the_8b_parameters(llama8b_run):
    shape = StageShape.of(llama8b_run, llama8b_run.stages[0], ParallelDims(ring=8))
    assert sum(rows * row for _, rows, row in parameter_shapes(shape)) == shape.params


def test_load_holds_the_sharded_weights_and_one_chunk_worked_by_hand():
    # 196 x 4 bytes over 2 ranks = 392. A 40-byte chunk: the embedding's 4 local rows of 16
    # bytes -> 2 rows (32 bytes); gate/up: 3 rows of 16 -> 2 (32); down: 2 rows of 24 -> 1
    # (24); the norms 2 rows of 4 (8). The largest, 32, on the device; on the host the slice
    # and the file pages it came through.
    parts = lifecycle_memory(SMALL, L40S, chunk_bytes=40)["load"]
    assert parts["device"] == {"weights (sharded)": 392.0, "read chunk": 32, RESERVE: 4e9}
    assert sum(parts["host"].values()) == 64


def test_export_host_is_the_larger_of_writing_a_file_share_and_consolidating_a_tensor():
    # 100-byte files in state-dict order (sizes 128 | 64 32 | 32 64 | 96 | 96 | 96 | 16 16 16 |
    # 128): the largest share of one rank is the embedding's (or lm_head's) 4 rows x 16 = 64;
    # writing it stages 64 and serialises 64 more = 128. Consolidating the embedding: the
    # full 128-byte tensor, a 64-byte piece read as bytes and the copy slicing them makes
    # (torch's _write_sub_tensor_to_file_optimized) = 256, the larger.
    shares = export_file_shares(SMALL, 100)
    assert [size for size, _ in shares] == [128, 96, 96, 96, 96, 96, 48, 128]
    assert [share for _, share in shares] == [64, 48, 48, 48, 48, 48, 24, 64]
    parts = lifecycle_memory(SMALL, NO_RESERVE, file_bytes=100)["export"]
    assert sum(parts["host"].values()) == 256
    assert parts["host"] == {"full tensor consolidated": 128, "shard piece read": 64,
                             "its copy (a bytes slice)": 64}
    # on the device: the state an optimizer step leaves, gradients freed: weights + 2 moments
    assert sum(parts["device"].values()) == 3 * 392


def test_resume_save_and_step_on_the_device():
    peaks = lifecycle_peaks(SMALL, NO_RESERVE)
    assert peaks["resume"]["device"] == 4 * 392  # weights, zero gradients, two moments
    assert peaks["save"]["device"] == 3 * 392
    assert peaks["resume"]["host"] == 2 * 64  # the embedding's rows: bytes read, tensor loaded
    assert peaks["step"]["device"] == sum(memory_per_gpu(SMALL, NO_RESERVE).values())


def test_more_shards_shrink_every_phase_but_the_consolidated_tensor(llama8b_run):
    stage = llama8b_run.stages[0]
    eight, thirty_two = (lifecycle_peaks(StageShape.of(llama8b_run, stage, d), L40S)
                         for d in (ParallelDims(ring=8), ParallelDims(ring=32)))
    for phase in ("load", "resume", "save", "export"):
        assert thirty_two[phase]["device"] < eight[phase]["device"], phase
    # the export's host peak is one full fp32 embedding (128,256 x 4,096 x 4 bytes) and a piece
    # (ceil(128256 / 32) rows), twice: read, and copied by slicing
    embed = 128256 * 4096 * 4
    assert thirty_two["export"]["host"] == embed + 2 * 4008 * 4096 * 4
    # at 8B and every layout, each phase below the step: a layout the step fits, loads
    for phase in ("load", "resume", "save", "export"):
        assert eight[phase]["device"] < eight["step"]["device"]


def test_the_chunk_and_the_file_size_are_the_trainers():
    from ray_jobs.train.checkpoint import EXPORT_FILE_BYTES as WRITER
    from ray_jobs.train.model import READ_CHUNK_BYTES as LOADER
    from topology.cost import EXPORT_FILE_BYTES

    assert READ_CHUNK_BYTES == LOADER
    assert EXPORT_FILE_BYTES == WRITER


def test_a_layout_whose_export_does_not_fit_is_refused_with_the_number(llama8b_run):
    shape = StageShape.of(llama8b_run, llama8b_run.stages[0], ParallelDims(ring=8))
    peaks = lifecycle_peaks(shape, L40S)
    small_gpu = L40S.model_copy(update={"hbm_bytes": peaks["save"]["device"] - 1})
    with pytest.raises(StageDoesNotFit, match=r"stage '65k': its resume needs 20\.1 GB per GPU "
                       r"with the model sharded over 8 GPUs, above the 16 GB of a NVIDIA L40S; "
                       r"shard the model over more GPUs \(raise ring_degree or shard_degree\)"):
        check_lifecycle_fits("65k", shape, small_gpu)
    # the host: 4 ranks each consolidating an fp32 embedding (2.10 GB) and an eighth of it
    # (0.26 GB, read and copied) at once: 10.5 GB, on an 8 GB host
    with pytest.raises(StageDoesNotFit, match=r"stage '65k': its export needs 10\.5 GB of host "
                       r"memory \(4 ranks of 2\.6 GB\) with the model sharded over 8 GPUs, "
                       r"above the host's 8 GB"):
        check_lifecycle_fits("65k", shape, L40S, host_bytes=8e9, ranks_per_host=4)
    check_lifecycle_fits("65k", shape, L40S, host_bytes=64e9, ranks_per_host=4)  # fits
    assert check_fits("65k", shape, L40S) == pytest.approx(peaks["step"]["device"])


def test_the_plan_report_shows_every_phase_per_gpu_rank_and_host(tmp_path):
    """`ringpilot plan` of the tiny run on two CPU workers of one node: plan.json carries each
    stage's lifecycle peaks (the cost model's, for the planned layout) and report.md a row per
    stage with the two ranks the node runs."""
    from topology_helpers import ROOT

    from ringpilot.cli import main
    from specs.loading import load_model
    from specs.plan import Plan
    from specs.run import RunSpec
    from topology.profile import get_profile

    code = main(["plan", "--run", str(ROOT / "configs" / "tiny.yaml"), "--cluster",
                 str(ROOT / "configs" / "clusters" / "local-cpu.yaml"), "--out", str(tmp_path)])
    assert code == 0
    run = load_model(ROOT / "configs" / "tiny.yaml", RunSpec)
    plan = Plan.model_validate_json((tmp_path / "plan.json").read_text())
    profile = get_profile(plan.profile)
    for sp, stage in zip(plan.stages, run.stages):
        shape = StageShape.of(run, stage, sp.dims, sp.activation_checkpointing)
        want = lifecycle_peaks(shape, profile)
        got = sp.prediction.lifecycle_gb
        assert list(got) == ["load", "resume", "step", "save", "export"]
        for phase, sides in want.items():
            assert got[phase]["device"] == pytest.approx(sides["device"] / 1e9)
            assert got[phase]["host"] == pytest.approx(sides["host"] / 1e9)
    report = (tmp_path / "report.md").read_text()
    section = report[report.index("## Memory by phase"):report.index("## Where the time goes")]
    rows = [line for line in section.splitlines() if line.startswith("| s")][1:]  # no header
    assert [r.split(" | ")[:3] for r in rows] == [[f"| {s.name}", "2", "2"] for s in run.stages]
    assert "per host (a host runs one rank process per GPU" in section
    assert "modelled from torch's and safetensors' code, not traced" in section
