"""One stage on its own GPUs: `--stage 65k` of the 8B recipe passes the real preflight on a
cluster file of one 8-GPU node; the whole recipe there is refused, naming the GPU counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ray_jobs.train import driver, placement
from ray_jobs.train.driver import PreflightError, check_ray_capacity, main, preflight
from ray_jobs.train.model import llama_config
from ray_jobs.train.placement import PLAN_FILE, check_capacity, write_plan
from specs.run import RunSpec
from tests.train.conftest import mini_spec, write_spec

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "llama3-8b-1m.yaml"
ONE_NODE = ROOT / "configs" / "clusters" / "l40s-8x-2s.yaml"  # one 8x L40S server


@pytest.fixture(autouse=True)
def short_search(monkeypatch):
    """The planner's placement search is budgeted in moves, not seconds: a smaller budget keeps
    these tests fast on a loaded machine without changing what is planned or checked."""
    monkeypatch.setattr(placement, "SEARCH_SECONDS", 0.02)


def recipe_here(tmp_path: Path, **resources) -> Path:
    """The 8B recipe with only what lives on the training cluster's disks moved under tmp_path
    (storage, the model's tokenizer.json, the data sources); stages, degrees, resources as
    published, its cluster file an absolute path."""
    doc = yaml.safe_load(RECIPE.read_text())
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")  # the preflight checks it is there
    # and that config.json describes the model the spec does (its weights are never read here)
    spec = RunSpec.model_validate({**doc, "model": {**doc["model"], "path": None}})
    llama_config(spec.model, spec.stages[0].seq_len, spec.stage_rope(0)).save_pretrained(model)
    doc["model"]["path"] = str(model)
    doc["storage"]["path"] = str(tmp_path / "runs")
    (tmp_path / "docs.jsonl").write_text('{"text": "a long document"}\n')
    for source in doc["data"]["prepared"]["sources"]:
        source["paths"] = [str(tmp_path / "docs.jsonl")]
    doc["resources"]["cluster"] = str(RECIPE.parent / doc["resources"]["cluster"])
    doc["resources"].update(resources)
    return write_spec(tmp_path / "llama3-8b-1m.yaml", doc)


def load(spec: Path) -> RunSpec:
    return RunSpec.model_validate(yaml.safe_load(spec.read_text()))


def test_first_stage_passes_the_preflight_on_one_node(tmp_path):
    run = load(recipe_here(tmp_path, cluster=str(ONE_NODE)))
    assert run.stages[0].name == "65k" and run.resources.workers == 512
    prepared = preflight(run, tmp_path, run.run_dir, [0])
    assert [s.name for s in prepared.plan.stages] == ["65k"]
    stage = prepared.plan.stage("65k")
    assert stage.dims.world == 8 and stage.dims.ring * stage.dims.ulysses == 8
    assert sorted((w.node, w.gpu) for r in stage.rings for w in r) == \
        [("node-000", g) for g in range(8)]
    assert prepared.workers == 8 and prepared.workers_from.startswith("--stage 65k (ring x dp")


class ReachedRay(Exception):
    """Raised where the driver would join Ray: everything before it passed."""


def test_stage_flag_on_one_node_through_the_cli(tmp_path, monkeypatch, capsys):
    """The command the README shows, up to joining Ray: the preflight passes and plan.json
    pins the stage's 8 workers to the one node."""
    spec = recipe_here(tmp_path)
    monkeypatch.setattr(driver, "build_tokenizer", lambda *a, **k: None)
    joined = []

    def connect(address, local_cpus):
        joined.append(local_cpus)
        raise ReachedRay

    monkeypatch.setattr(driver, "connect_ray", connect)
    with pytest.raises(ReachedRay):
        main(["--run", str(spec), "--stage", "65k", "--cluster", str(ONE_NODE)])
    assert joined == [8 * 8 + 2]  # a local Ray gets the stage's 8 workers' CPUs, not 512's
    plan = json.loads((tmp_path / "runs" / "llama3-8b-1m" / PLAN_FILE).read_text())
    assert plan["cluster"] == "l40s-8x-2s" and [s["name"] for s in plan["stages"]] == ["65k"]
    assert {w["node"] for r in plan["stages"][0]["rings"] for w in r} == {"node-000"}
    assert "cannot start" not in capsys.readouterr().err


def test_whole_recipe_on_one_node_is_refused(tmp_path, capsys):
    spec = recipe_here(tmp_path)
    assert main(["--run", str(spec), "--cluster", str(ONE_NODE)]) == 2
    err = capsys.readouterr().err
    assert ("resources: stage '262k': ring_degree x data_parallel_degree = 32 x 1 = 32 workers, "
            "but the cluster offers 8 GPUs; lower the degrees or add nodes; or train one stage "
            "at a time on its own GPUs (--stage NAME)") in err
    assert not (tmp_path / "runs" / "llama3-8b-1m" / PLAN_FILE).exists()


def test_a_later_stage_alone_on_one_node_is_refused(tmp_path, capsys):
    """262k's ring of 32 does not fit one node even alone: the capacity error, no hint."""
    spec = recipe_here(tmp_path)
    assert main(["--run", str(spec), "--stage", "262k", "--cluster", str(ONE_NODE)]) == 2
    err = capsys.readouterr().err
    assert "= 32 x 1 = 32 workers, but the cluster offers 8 GPUs; lower the degrees" in err
    assert "--stage NAME" not in err


def test_missing_cluster_file(tmp_path, capsys):
    spec = recipe_here(tmp_path)
    assert main(["--run", str(spec), "--stage", "65k", "--cluster",
                 str(tmp_path / "nowhere.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"--cluster: no file {tmp_path / 'nowhere.yaml'} (give a ClusterSpec YAML" in err


def test_ray_capacity_counts_the_stage_alone(tmp_path, monkeypatch):
    """Ray is asked for the stage's world, not resources.workers (no Ray started: its answer
    about the cluster is what the check reads)."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 128.0, "GPU": 8.0})
    run = load(recipe_here(tmp_path))
    check_ray_capacity(run, 8, "--stage 65k (ring x dp x ulysses = 8 x 1 x 1)")
    with pytest.raises(PreflightError, match=r"--stage 65k \(ring x dp x ulysses = 8 x 1 x 1\): "
                       r"16 gpu workers need 16 GPU but the Ray cluster has 8; add nodes or "
                       r"lower the stage's degrees"):
        check_ray_capacity(run, 16, "--stage 65k (ring x dp x ulysses = 8 x 1 x 1)")
    with pytest.raises(PreflightError, match=r"resources.workers: 512 gpu workers need 512 GPU "
                       r"but the Ray cluster has 8; add nodes or lower resources.workers"):
        check_ray_capacity(run)


def test_a_stage_plan_joins_the_earlier_ones_in_plan_json(tmp_path):
    run = RunSpec.model_validate(mini_spec(tmp_path / "runs"))
    both = check_capacity(run)
    write_plan(tmp_path, both)
    alone = both.model_copy(update={"stages": [both.stage("s128").model_copy(
        update={"notes": ["planned alone"]})]})
    saved = json.loads(write_plan(tmp_path, alone, keep_others=True).read_text())["stages"]
    assert [(s["name"], s["notes"][-1]) for s in saved] == \
        [("s64", both.stage("s64").notes[-1]), ("s128", "planned alone")]
    saved = json.loads(write_plan(tmp_path, alone).read_text())["stages"]
    assert [s["name"] for s in saved] == ["s128"]
