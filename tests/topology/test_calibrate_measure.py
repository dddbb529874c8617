"""`ringpilot calibrate`'s measurements on a 2-process gloo world: every number it claims is
there, positive and physical, and the profile it writes plans."""

import pytest
from topology_helpers import ROOT

from ray_jobs.train.calibrate import Shapes, measure, same_switch_link, to_profile
from specs.loading import load_model
from specs.run import RunSpec
from tests.support.worlds import run_world
from topology.calibration import CalibratedProfile, apply_profile
from topology.run_plan import plan_run
from topology.sources import load_cluster

SHAPES = Shapes(tokens=256, hidden=128, intermediate=352, heads=4, kv_heads=2, head_dim=32,
                dtype="float32")


def _measure(rank, world):
    return measure(SHAPES, repeats=3)


@pytest.fixture(scope="module")
def measured():
    return run_world(2, _measure, timeout_s=120)


def test_every_claimed_number_is_measured(measured):
    got, other = measured
    assert other is None  # rank 0 reports for the group
    for key in ("p2p_gb_s", "p2p_latency_us", "all_reduce/2", "all_gather/2",
                "reduce_scatter/2", "dense_flops", "attention_flops", "attention_bwd_over_fwd",
                "dense_at/256", "attention_at/256", "optimizer_params_per_s"):
        m = got[key]
        assert m["value"] > 0 and m["spread"] >= 0 and m["samples"] >= 3, key
    assert got["p2p_latency_us"]["samples"] >= 20  # small messages: more repeats
    assert 1e8 < got["dense_flops"]["value"] < 1e13  # a CPU core, not a typo of units
    assert got["dense_flops"] == got["dense_at/256"]  # the one (largest) stage's
    assert got["attention_bwd_over_fwd"]["value"] > 1  # backward does more work than forward
    assert 0 <= got["comm_overlap"]["value"] <= 1 and got["comm_overlap"]["samples"] == 3
    assert got["layer_overhead_at/256"]["value"] >= 0  # what the priced parts leave, or none
    assert got["root_overhead_at/256"]["value"] >= 0
    # an FSDP2-sharded layer's clip + AdamW: between 1e4 and 1e10 parameters a second on a core
    assert 1e4 < got["optimizer_params_per_s"]["value"] < 1e10


def test_the_profile_it_writes_plans_the_tiny_run(measured):
    spec = load_cluster(ROOT / "configs/clusters/local-cpu.yaml")
    node_type = next(iter(spec.node_types))
    link = same_switch_link(spec, node_type)
    assert link == "loopback"
    doc = to_profile(measured[0], cluster=spec.name, node_type=node_type, link=link,
                     base_profile=spec.profile, stages=SHAPES, backend="gloo")
    profile = CalibratedProfile.model_validate(doc)
    assert profile.links["loopback"].bandwidth_gb_s.value == measured[0]["p2p_gb_s"]["value"]
    assert profile.links["loopback"].latency_us.value == measured[0]["p2p_latency_us"]["value"] / 2
    assert sorted(profile.collectives) == ["all_gather/2", "all_reduce/2", "reduce_scatter/2"]
    calibrated, hardware, notes = apply_profile(spec, profile)
    assert calibrated.link_types["loopback"].bandwidth_gb_s == pytest.approx(
        measured[0]["p2p_gb_s"]["value"])
    assert hardware.peak_bf16_flops * hardware.mfu_dense == pytest.approx(
        measured[0]["dense_flops"]["value"])
    assert hardware.dense_rate(256) == measured[0]["dense_at/256"]["value"]
    assert hardware.comm_overlap == measured[0]["comm_overlap"]["value"]
    assert hardware.optimizer_params_per_s == measured[0]["optimizer_params_per_s"]["value"]
    assert hardware.collective_gb_s["all_gather/2"] == measured[0]["all_gather/2"]["value"]
    run = load_model(ROOT / "configs/tiny.yaml", RunSpec)
    plan = plan_run(calibrated, run, profile=hardware, notes=notes)
    assert all(s.prediction.step_seconds > 0 for s in plan.stages)
    assert plan.assumptions[0].startswith("calibrated profile: measured on local-cpu")


@pytest.mark.ray
def test_ringpilot_calibrate_writes_a_profile_that_plan_uses(local_ray, tmp_path, capsys):
    """The command end to end: two Ray Train workers measure, the profile validates and fits
    the cluster, and `plan --profile` plans the tiny run with it."""
    from ringpilot.cli import main as ringpilot

    out, cluster = tmp_path / "local.yaml", str(ROOT / "configs/clusters/local-cpu.yaml")
    tiny = str(ROOT / "configs/tiny.yaml")
    assert ringpilot(["calibrate", "--run", tiny, "--cluster", cluster, "--out", str(out),
                      "--repeats", "2"]) == 0
    profile = load_model(out, CalibratedProfile)
    assert (profile.cluster, profile.node_type, sorted(profile.links)) == (
        "local-cpu", "cpu-2", ["loopback"])
    assert profile.dense_flops.samples == 2 and "2 gloo ranks" in profile.tool
    assert ringpilot(["plan", "--run", tiny, "--cluster", cluster, "--profile", str(out),
                      "--out", str(tmp_path / "plan")]) == 0
    assert "calibrated profile: measured on local-cpu" in (tmp_path / "plan" / "report.md"
                                                           ).read_text()


def test_calibrate_refuses_bad_repeats_in_one_line(tmp_path, capsys):
    from ringpilot.cli import main as ringpilot

    rc = ringpilot(["calibrate", "--run", str(ROOT / "configs/tiny.yaml"), "--cluster",
                    str(ROOT / "configs/clusters/local-cpu.yaml"), "--out",
                    str(tmp_path / "p.yaml"), "--repeats", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--repeats: give at least 1" in err and "Traceback" not in err
    assert not (tmp_path / "p.yaml").exists()
