"""`ringpilot preflight`: bad input refused in one line before anything starts, the ranks'
configuration for a launch by hand, and the whole command on local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ray_jobs.preflight.run import PreflightConfig
from ringpilot.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--run", str(ROOT / "configs/tiny.yaml"),
        "--cluster", str(ROOT / "configs/clusters/local-cpu.yaml")]


@pytest.mark.parametrize(("extra", "message"), [
    (["--stage", "s2k"], "--stage: no stage 's2k' in the run (stages: s64, s256, s1k, s4k)"),
    (["--max-bytes", "0"], "--max-bytes 0: give a message size of 1 byte or more"),
    (["--reps", "0"], "--reps 0: give at least 1 timed repetition"),
    (["--slow-factor", "1"], "--slow-factor 1.0: give a number above 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    assert main(["preflight", *TINY, "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ringpilot preflight: {message}") and "\n" not in err, err
    assert not any(tmp_path.iterdir())


def test_write_config_plans_for_ranks_started_by_hand(tmp_path, capsys):
    path = tmp_path / "ranks.json"
    assert main(["preflight", *TINY, "--stage", "s4k", "--out", str(tmp_path / "out"),
                 "--max-bytes", "65536", "--write-config", str(path)]) == 0
    assert "python -m ray_jobs.preflight.rank --config" in capsys.readouterr().out
    config = PreflightConfig.from_json(path.read_text())
    assert json.loads(config.to_json()) == json.loads(path.read_text())  # it round-trips
    (stage,) = config.stages
    assert stage.stage == "s4k" and stage.rings == [["local/gpu0", "local/gpu1"]]
    assert stage.kv_bytes == 65536  # 2 sequences x 2 MiB of K/V, capped
    assert stage.numerics.heads == 8 and stage.numerics.dtype == "float32"
    assert not (tmp_path / "out").exists()  # nothing probed


@pytest.mark.ray
def test_preflight_of_the_tiny_run_on_local_ray(tmp_path, local_ray, capsys):
    """Every stage on one group of two Ray Train workers, the short ones data-parallel (1 x 2:
    two rings of one). The factors are set so high that no timing of this shared machine can
    make a finding (local-cpu's loopback number is a placeholder, several times off gloo
    here): exit 0 then says the command ran its rounds, collectives and numerics and wrote
    each report."""
    run = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    for stage in run["stages"][:2]:
        stage.update(ring_degree=1, data_parallel_degree=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    out = tmp_path / "out"
    code = main(["preflight", "--run", str(path), *TINY[2:], "--out", str(out), "--max-bytes",
                 str(2**18), "--reps", "2", "--slow-factor", "1000", "--fabric-factor", "1000"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for stage in ("s64", "s256"):  # data-parallel: two rings of one, nothing to send
        doc = json.loads((out / stage / "preflight.json").read_text())
        assert doc["exit_code"] == 0 and doc["stage"] == stage
        assert doc["rings"] == [["local/gpu0"], ["local/gpu1"]]
        assert doc["rounds"] == [] and doc["numerics"]["ok"]
        assert [c["op"] for c in doc["collectives"]] == ["all_reduce"]  # replicas' gradients
        assert f"[{stage}] 2 workers: no ring hops (ring_degree 1), 2 repetitions" in printed
        assert (f"[{stage}] no finding: no ring hop to time (ring_degree 1: K/V never travels "
                "a ring)") in printed
    for stage in ("s1k", "s4k"):
        doc = json.loads((out / stage / "preflight.json").read_text())
        assert doc["exit_code"] == 0 and doc["stage"] == stage
        assert doc["rings"] == [["local/gpu0", "local/gpu1"]]
        hops = doc["rounds"][0]["hops"]
        assert {(h["src"], h["dst"]) for h in hops} == {("local/gpu0", "local/gpu1"),
                                                        ("local/gpu1", "local/gpu0")}
        assert all(h["measured_s"] > 0 and h["predicted_s"] > 0 for h in hops)
        assert doc["numerics"]["ok"] and len(doc["numerics"]["ranks"]) == 2
        assert {c["op"] for c in doc["collectives"]} == {"all_gather", "reduce_scatter"}
        assert f"[{stage}] no finding" in printed
