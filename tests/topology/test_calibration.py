"""Calibrated profiles: validated, refused when they do not fit the cluster, and used."""

import re

import pytest
import yaml
from topology_helpers import ROOT, small_run

from ringpilot.cli import main as ringpilot
from specs.loading import SpecError, load_model
from topology.calibration import CalibratedProfile, CalibrationError, apply_profile
from topology.presets import build_leaf_spine_cluster
from topology.run_plan import plan_run


def measured(value, spread=0.02, samples=5):
    return {"value": value, "spread": spread, "samples": samples}


def profile(spec, **fields) -> CalibratedProfile:
    doc = {"cluster": spec.name, "node_type": next(iter(spec.node_types)),
           "measured_at": "2026-12-01T00:00:00Z", "tool": "test",
           "links": {name: {"bandwidth_gb_s": measured(link.bandwidth_gb_s),
                            "latency_us": measured(link.latency_us or 1.0)}
                     for name, link in spec.link_types.items()}}
    doc.update(fields)
    return CalibratedProfile.model_validate(doc)


def dp_sync(spec, run, cal=None):
    prof, notes = None, None
    if cal is not None:
        spec, prof, notes = apply_profile(spec, cal)
    plan = plan_run(spec, run, profile=prof, notes=notes)
    return plan, plan.stages[0].prediction.parts_seconds


def test_half_the_bandwidth_doubles_the_exposed_communication():
    """Two rings of 8 on two nodes: the data-parallel all-reduce crosses the NICs and is not
    overlapped. Every link measured at half its bandwidth (latencies as given) doubles it."""
    spec = build_leaf_spine_cluster(2, nodes_per_leaf=2)
    run = small_run(ring=8, dp=2, batch=2, workers=16)
    _, base = dp_sync(spec, run)
    half = profile(spec, links={
        name: {"bandwidth_gb_s": measured(link.bandwidth_gb_s / 2),
               "latency_us": measured(link.latency_us)}
        for name, link in spec.link_types.items()})
    plan, slow = dp_sync(spec, run, half)
    assert base["data-parallel sync"] > 0.01  # a communication-bound part
    ratio = slow["data-parallel sync"] / base["data-parallel sync"]
    assert 1.99 < ratio <= 2.0
    assert slow["dense compute"] == pytest.approx(base["dense compute"])  # compute untouched
    assert plan.assumptions[0].startswith(f"calibrated profile: measured on {spec.name}")


def test_measured_throughput_replaces_the_assumed_utilisation():
    spec = build_leaf_spine_cluster(1, nodes_per_leaf=1)
    run = small_run(ring=8, dp=1, workers=8)
    _, base = dp_sync(spec, run)
    peak = 362e12
    cal = profile(spec, links={}, dense_flops=measured(0.225 * peak),  # half the assumed 0.45
                  attention_flops=measured(0.40 * peak))
    plan, got = dp_sync(spec, run, cal)
    assert got["dense compute"] == pytest.approx(2 * base["dense compute"])
    assert got["attention compute"] == pytest.approx(base["attention compute"])
    assert not any(a.startswith("mfu_dense:") for a in plan.assumptions)  # measured, not assumed
    kept = [a for a in plan.assumptions if a.startswith("link type ")]
    assert len(kept) == len(spec.link_types) and "not measured; kept" in kept[0]


@pytest.mark.parametrize("change, message", [
    ({"cluster": "other"}, "measured on cluster 'other', but the plan is for"),
    ({"node_type": "h100"}, "node_type 'h100' is not a node type of cluster"),
    ({"links": {"nvlink": {"bandwidth_gb_s": measured(100)}}},
     "links ['nvlink'] are not link types of cluster"),
    ({"links": {"nic": {"bandwidth_gb_s": measured(30.0)}}},
     "links.nic.bandwidth_gb_s 30 GB/s is above the nic line rate of 25 GB/s"),
    ({"dense_flops": measured(5e14)}, "dense_flops 5e+14 FLOP/s is above the NVIDIA L40S peak"),
    ({"dense_flops_at": {4096: measured(5e14)}}, "dense_flops_at.4096 5e+14 FLOP/s is above"),
    ({"collectives": {"all_gather/8": measured(40.0)}},
     "collectives.all_gather/8 40 GB/s is above every link's line rate"),
    ({"base_profile": "h100"}, "unknown hardware profile 'h100'"),
])
def test_a_profile_that_does_not_fit_the_cluster_is_refused(change, message):
    spec = build_leaf_spine_cluster(2, nodes_per_leaf=2)
    with pytest.raises((CalibrationError, ValueError), match=message.replace("[", r"\[")
                       .replace("]", r"\]").replace("+", r"\+")):
        apply_profile(spec, profile(spec, **change))


@pytest.mark.parametrize("doc, message", [
    ({"links": {}}, "the profile measures nothing"),
    ({"links": {"pcie": {"bandwidth_gb_s": {"value": -3}}}}, "greater than 0"),
    ({"kind": "something-else"}, "ringpilot.io/calibrated-profile"),
    ({"links": {"x": {"bandwidth_gb_s": measured(1.0)}}, "comm_overlap": measured(1.5)},
     "less than or equal to 1"),
])
def test_a_malformed_profile_file_is_one_clear_error(tmp_path, doc, message):
    base = {"cluster": "c", "node_type": "n", "measured_at": "2026-12-01"}
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump({**base, **doc}))
    with pytest.raises(SpecError) as e:
        load_model(path, CalibratedProfile)
    assert message in e.value.render()


def test_plan_with_a_profile_for_another_cluster_is_one_line(tmp_path, capsys):
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump({"cluster": "somewhere-else", "node_type": "l40s-8x",
                                    "measured_at": "2026-12-01",
                                    "links": {"pcie": {"bandwidth_gb_s": measured(20.0)}}}))
    rc = ringpilot(["plan", "--run", str(ROOT / "configs/llama3-8b-1m.yaml"), "--cluster",
                    str(ROOT / "configs/clusters/l40s-64-leaf-spine.yaml"), "--out",
                    str(tmp_path / "out"), "--profile", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "--profile: measured on cluster 'somewhere-else', but the plan is for" in err


def _trained(run_dir, stage, step, seconds, ring=8, dp=1, parts=None):
    """A run directory whose stage has one committed checkpoint with its measured seconds."""
    from specs.checkpoint import STATE_DIR, TrainerState, checkpoint_dir, write_state
    from specs.ledger import Ledger, mark_committed

    path = checkpoint_dir(run_dir, stage, step)
    (path / STATE_DIR).mkdir(parents=True)
    write_state(path, TrainerState(stage=stage, stage_index=0, step=step, seconds=seconds,
                                   ring_degree=ring, dp_degree=dp, parts_seconds=parts or {}))
    mark_committed(path)
    Ledger(run_dir, "small").commit_checkpoint(stage, step, path)


def test_plan_compare_puts_measured_step_time_beside_the_prediction(tmp_path, capsys):
    from topology.measured import compare_rows, measured_steps

    spec = build_leaf_spine_cluster(1, nodes_per_leaf=1)
    run = small_run(ring=8, dp=1, workers=8)
    plan = plan_run(spec, run)
    predicted = plan.stages[0].prediction.step_seconds
    _trained(tmp_path, "s1", step=10, seconds=20 * predicted,
             parts={"data": 0.01, "forward + backward": 0.5, "optimizer": 0.2,
                    "loss all-reduce": 0.01})
    rows = compare_rows(plan, measured_steps(tmp_path))
    assert rows[1][0] == "s1" and rows[1][5] == "0.50x"
    assert rows[1][3] == f"{2 * predicted:.4f} (10)"
    # the phases per step, in ms: the stage's seconds over its 10 steps
    assert rows[1][7] == "forward + backward 50.0, optimizer 20.0, other 2.0"
    parts = plan.stages[0].prediction.parts_seconds
    assert rows[1][6].startswith("forward + backward ") and \
        f"optimizer {parts['optimizer'] * 1e3:.1f}" in rows[1][6]
    _trained(tmp_path / "other", "s1", step=4, seconds=4 * predicted, ring=4, dp=2)
    other = compare_rows(plan, measured_steps(tmp_path / "other"))[1]
    assert other[5] == "1.00x (other layout)" and other[7] == "not recorded"
    with pytest.raises(FileNotFoundError, match="has no ledger.json"):
        measured_steps(tmp_path / "nowhere")

    rc = ringpilot(["plan", "--run", str(ROOT / "configs/llama3-8b-1m.yaml"), "--out",
                    str(tmp_path / "out"), "--compare", str(tmp_path / "nowhere")])
    assert rc == 2 and "has no ledger.json" in capsys.readouterr().err


@pytest.mark.parametrize("seconds, parts, bad", [
    (float("inf"), None, "seconds = inf"),
    (float("nan"), None, "seconds = nan"),
    (-5.0, None, "seconds = -5.0"),
    (1.0, {"optimizer": float("inf")}, "parts_seconds.optimizer = inf"),
])
def test_compare_refuses_a_trainer_state_with_non_finite_seconds(tmp_path, seconds, parts,
                                                                 bad):
    # A tampered or corrupt state file must not become an inf/nan ratio (or 0.00x) in the report.
    from topology.measured import measured_steps

    _trained(tmp_path, "s1", step=10, seconds=seconds, parts=parts)
    with pytest.raises(ValueError, match=rf"stage 's1' has {re.escape(bad)}, not a finite "
                       r"number of seconds >= 0"):
        measured_steps(tmp_path)


def test_plan_compare_with_an_infinite_trainer_state_exits_2(tmp_path, capsys):
    _trained(tmp_path / "run", "s4k", step=10, seconds=float("inf"))
    rc = ringpilot(["plan", "--run", str(ROOT / "configs/tiny.yaml"), "--cluster",
                    str(ROOT / "configs/clusters/local-cpu.yaml"), "--search-seconds", "0.05",
                    "--out", str(tmp_path / "out"), "--compare", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "stage 's4k' has seconds = inf, not a finite number" in err, err
