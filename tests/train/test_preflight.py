"""Bad RunSpecs fail with a clear message before any worker (or Ray) starts."""

from __future__ import annotations

import json

from ray_jobs.train.driver import ARCHITECTURE, main, preflight
from specs.checkpoint import checkpoint_dir
from specs.ledger import Ledger, mark_committed
from specs.run import RunSpec
from tests.train.conftest import mini_spec, write_spec


def _run(tmp_path, capsys, **overrides) -> str:
    spec = write_spec(tmp_path / "run.yaml", mini_spec(tmp_path / "runs", **overrides))
    assert main(["--run", str(spec)]) == 2
    assert not (tmp_path / "runs" / "mini" / "ray").exists()  # no trainer was ever started
    return capsys.readouterr().err


def test_ring_that_does_not_divide_the_workers(tmp_path, capsys):
    err = _run(tmp_path, capsys, **{"stages.0.data_parallel_degree": "auto",
                                    "resources.workers": 3})
    assert ("stages[0] (s64): ring_degree 2 does not divide the 3 workers (resources.workers is "
            "3); use one that does (e.g. [1]) or set data_parallel_degree") in err


def test_a_stage_may_use_fewer_workers(tmp_path):
    """The layout's world is what train_stage starts for the stage (WorkerConfig.workers)."""
    run = RunSpec.model_validate(mini_spec(tmp_path / "runs", **{"stages.0.ring_degree": 1}))
    layout = preflight(run, tmp_path, run.run_dir).layout
    assert layout.stage("s64").dims.world == 1 and layout.stage("s128").dims.world == 2
    assert any("uses 1 of 2 workers" in n for n in layout.stage("s64").notes)


def test_auto_ring_is_resolved_before_workers_start(tmp_path):
    """66 tokens zigzag over rings of 1 or 3 (2 x 2 and 2 x 4 do not divide 66): without a
    cluster description the largest ring that fits the 4 workers, one of them idle."""
    run = RunSpec.model_validate(mini_spec(
        tmp_path / "runs", **{"stages.0.seq_len": 66, "stages.0.ring_degree": "auto",
                              "stages.0.data_parallel_degree": "auto", "resources.workers": 4}))
    stage = preflight(run, tmp_path, run.run_dir).layout.stage("s64")
    assert (stage.dims.ring, stage.dims.dp) == (3, 1)


def test_degrees_beyond_workers_are_a_spec_error(tmp_path, capsys):
    err = _run(tmp_path, capsys, **{"stages.0.data_parallel_degree": 2})
    assert "stages[0] (s64): ring_degree x data_parallel_degree = 2 x 2 = 4 workers" in err


def test_seq_len_not_divisible_by_two_rings(tmp_path, capsys):
    err = _run(tmp_path, capsys, **{"stages.0.seq_len": 66})
    assert "seq_len (66) must be divisible by 2 x ring_degree (4)" in err


def test_missing_tokenizer_path(tmp_path, capsys):
    err = _run(tmp_path, capsys, **{"data.tokenizer": {"path": "nowhere/tok", "vocab_size": 512}})
    assert "data.tokenizer.path: no tokenizer.json at" in err
    assert "nowhere/tok" in err


def test_unwritable_storage(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    spec = write_spec(tmp_path / "run.yaml", mini_spec(blocker / "runs"))
    assert main(["--run", str(spec)]) == 2
    assert "storage.path: cannot write the run directory" in capsys.readouterr().err


def test_stage_flag_needs_previous_stage_done(tmp_path, capsys):
    spec = write_spec(tmp_path / "run.yaml", mini_spec(tmp_path / "runs"))
    assert main(["--run", str(spec), "--stage", "s128"]) == 2
    assert ("--stage s128: the previous stage 's64' is not started in the ledger"
            in capsys.readouterr().err)


def test_unknown_stage_name(tmp_path, capsys):
    spec = write_spec(tmp_path / "run.yaml", mini_spec(tmp_path / "runs"))
    assert main(["--run", str(spec), "--stage", "s9"]) == 2
    assert "--stage: no stage 's9' in the run (stages: s64, s128)" in capsys.readouterr().err


def test_bad_field_is_reported_by_path(tmp_path, capsys):
    spec = write_spec(tmp_path / "run.yaml",
                      mini_spec(tmp_path / "runs", **{"failure.report_every": 0}))
    assert main(["--run", str(spec)]) == 2
    assert "failure.report_every" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    """A run directory reused after the model changed: refused before Ray starts."""
    spec = mini_spec(tmp_path / "runs")
    ckpt = checkpoint_dir(tmp_path / "runs" / "mini", "s64", 3)
    ckpt.mkdir(parents=True)
    config = {k: spec["model"][k] for k in ARCHITECTURE} | {"hidden_size": 64}
    (ckpt / "config.json").write_text(json.dumps(config))
    mark_committed(ckpt)
    Ledger(tmp_path / "runs" / "mini", "mini").commit_checkpoint("s64", 3, ckpt)
    err = _run(tmp_path, capsys)
    assert "the checkpoint it starts from" in err and "is another model: hidden_size 64 " \
        "(model.hidden_size is 32)" in err


def test_gpu_run_computing_in_float32_is_refused(tmp_path, capsys):
    """No CUDA flash kernel computes in fp32: refused before any worker, with the fix."""
    err = _run(tmp_path, capsys, **{"resources.device": "gpu",
                                    "training": {"mixed_precision": "none"}})
    assert ("training.mixed_precision: attention would compute in float32 on GPUs, which torch's "
            "CUDA flash kernel and flash-attn do not support; use mixed_precision: bf16") in err


def test_gpu_run_with_an_odd_head_dim_is_refused(tmp_path, capsys):
    err = _run(tmp_path, capsys, **{"resources.device": "gpu", "model.hidden_size": 40,
                                    "model.intermediate_size": 80})
    assert "model: head_dim 10 (hidden_size / num_attention_heads) must be a multiple of 8" in err


def test_missing_or_empty_kamradt_haystack(tmp_path, capsys):
    err = _run(tmp_path, capsys, **{"eval.enabled": True,
                                    "eval.kamradt": {"haystack": ["essays/*.txt"]}})
    assert "eval.kamradt.haystack: 'essays/*.txt' matches no file" in err
    (tmp_path / "essays").mkdir()
    (tmp_path / "essays" / "a.txt").write_text("  \n")
    err = _run(tmp_path, capsys, **{"eval.enabled": True,
                                    "eval.kamradt": {"haystack": ["essays/*.txt"]}})
    assert "a.txt is empty" in err


def test_stage_flag_asks_ray_for_the_stage_alone(tmp_path):
    """Without a cluster file too, --stage plans its own stage and needs only its world."""
    run = RunSpec.model_validate(mini_spec(tmp_path / "runs", **{"stages.0.ring_degree": 1}))
    whole = preflight(run, tmp_path, run.run_dir)
    assert (whole.workers, whole.workers_from) == (2, "resources.workers")
    alone = preflight(run, tmp_path, run.run_dir, [0])
    assert [s.name for s in alone.layout.stages] == ["s64"]
    assert (alone.workers, alone.workers_from) == (1, "--stage s64 (ring x dp x ulysses = "
                                                      "1 x 1 x 1)")


def test_failure_preflight_runs_the_fabric_preflight_first_and_stops_on_a_finding(
        tmp_path, capsys, monkeypatch):
    """failure.preflight: the driver runs `python -m ray_jobs.preflight` on its stages, cluster
    file and Ray cluster before it owns the run; a finding (exit 1) stops it there."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = write_spec(tmp_path / "run.yaml", mini_spec(tmp_path / "runs", **{
        "failure.preflight": True,
        "resources.cluster": str(root / "configs/clusters/local-cpu.yaml")}))
    ran = []

    def fake_run(cmd, *args, **kwargs):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert main(["--run", str(spec), "--address", "127.0.0.1:1", "--stage", "s64"]) == 1
    [cmd] = ran
    assert cmd[1:3] == ["-m", "ray_jobs.preflight"]
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert args == {"--run": str(spec.resolve()),
                    "--cluster": str(root / "configs/clusters/local-cpu.yaml"),
                    "--out": str(tmp_path / "runs" / "mini" / "preflight"),
                    "--address": "127.0.0.1:1", "--stage": "s64"}
    assert "set failure.preflight: false" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mini" / "ledger.json").exists()  # it never owned the run


def test_failure_preflight_needs_a_cluster_description(tmp_path, capsys):
    spec = write_spec(tmp_path / "run.yaml",
                      mini_spec(tmp_path / "runs", **{"failure.preflight": True}))
    assert main(["--run", str(spec)]) == 2
    assert "give resources.cluster (or --cluster CLUSTER.yaml)" in capsys.readouterr().err


def test_gpu_run_with_document_attention_is_not_refused_for_it(tmp_path, capsys):
    """Document masking runs on GPUs too (its mixed blocks in torch's variable-length flash
    op): a GPU run asking for it is refused only for its other problem (a ring that does not
    divide the workers), never for attention 'document'."""
    err = _run(tmp_path, capsys, **{"resources.device": "gpu",
                                    "training": {"mixed_precision": "bf16"},
                                    "stages.0.attention": "document",
                                    "stages.1.attention": "document",
                                    "stages.1.position_ids": "per_document",
                                    "stages.0.data_parallel_degree": "auto",
                                    "resources.workers": 3})
    assert "ring_degree 2 does not divide the 3 workers" in err
    assert "run.yaml: 1 problem" in err and "attention" not in err.split("run.yaml")[-1]
