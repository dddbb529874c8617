"""`ringpilot plan --exclude`: nodes, GPUs, devices and links a preflight found slow, planned
around (topology.exclusions and the plan command)."""

import json

import pytest
import yaml
from topology_helpers import ROOT

from ringpilot.cli import main as ringpilot
from topology.exclusions import (
    EXCLUDED_LINK_FACTOR,
    Exclusions,
    apply_exclusions,
    degrade_excluded,
    parse_exclusions,
)
from topology.graph import TopologyError, build_graph
from topology.sources import load_cluster

NETNS = ROOT / "configs/clusters/netns-4x2.yaml"


@pytest.fixture(scope="module")
def spec():
    return load_cluster(NETNS)


def tiny_run(tmp_path, ring, dp, workers=8):
    """configs/tiny.yaml's model in one stage of ring x dp on `workers` CPU workers."""
    run = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    stage = {**run["stages"][2], "ring_degree": ring, "data_parallel_degree": dp,
             "batch_size": 12, "steps": 10}  # 12: a data-parallel degree of 3 or 4 divides it
    run.update(stages=[stage], resources={**run["resources"], "workers": workers})
    run["storage"]["path"] = str(tmp_path / "storage")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def plan(tmp_path, run, *args) -> dict:
    out = tmp_path / "plan"
    assert ringpilot(["plan", "--run", str(run), "--cluster", str(NETNS), "--out", str(out),
                      *args]) == 0
    return json.loads((out / "plan.json").read_text())


def placed(doc) -> set[str]:
    return {f"{w['node']}/gpu{w['gpu']}" for s in doc["stages"] for r in s["rings"] for w in r}


def test_excluding_a_node_removes_its_gpus_from_every_ring(tmp_path, capsys):
    run = tiny_run(tmp_path, ring=2, dp="auto")
    before = plan(tmp_path, run)
    assert {g for g in placed(before) if g.startswith("host1/")} == {"host1/gpu0", "host1/gpu1"}
    after = plan(tmp_path, run, "--exclude", "host1")
    assert after["excluded"] == ["host1"]
    assert placed(after) and not any(g.startswith("host1/") for g in placed(after))
    assert after["stages"][0]["dp_degree"] == 3  # 6 GPUs left for rings of 2
    assert any(a.startswith("excluded (ringpilot plan --exclude): nodes host1 not placed")
               for a in after["assumptions"])


def test_excluding_a_gpu_keeps_its_node_and_the_other_gpus_numbers(tmp_path):
    run = tiny_run(tmp_path, ring=2, dp="auto")
    doc = plan(tmp_path, run, "--exclude", "host2/gpu1")
    assert "host2/gpu1" not in placed(doc) and doc["excluded"] == ["host2/gpu1"]
    assert len(placed(doc)) == 6 and "host2/gpu0" not in placed(doc)  # alone: no ring of 2


def test_excluding_a_link_places_the_ring_away_from_it(tmp_path, capsys):
    """A ring of 4 on 8 GPUs: the planner has GPUs to spare, so the host behind the excluded
    link is left out; without the exclusion it is not."""
    run = tiny_run(tmp_path, ring=4, dp=1)
    around = plan(tmp_path, run, "--exclude", "host0/nic0 -> leaf0")
    assert around["excluded"] == ["host0/nic0->leaf0"]
    assert not any(g.startswith("host0/") for g in placed(around))
    assert any(g.startswith("host0/") for g in placed(plan(tmp_path, run)))


def test_a_bad_name_is_one_error_with_this_clusters_spellings(tmp_path, capsys):
    run = tiny_run(tmp_path, ring=2, dp="auto")
    rc = ringpilot(["plan", "--run", str(run), "--cluster", str(NETNS), "--out",
                    str(tmp_path / "p"), "--exclude", "host1,host9"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err == ("ringpilot plan: --exclude 'host9': not a node, GPU, device or link in "
                   "cluster 'netns-4x2'; give a node (host0), a GPU (host0/gpu0), a device "
                   "(host0/nic0) or a link as preflight findings print it (host0/nic0->leaf0), "
                   "several separated by commas\n")


def test_parse_sorts_names_by_kind_and_refuses_links_that_do_not_exist(spec):
    graph = build_graph(spec)
    ex = parse_exclusions(spec, graph, ["host1, host2/gpu0", "leaf0,host3/nic0->leaf0",
                                        "host1"])
    assert ex == Exclusions(nodes=("host1",), gpus=("host2/gpu0",), devices=("leaf0",),
                            links=(("host3/nic0", "leaf0"),))
    assert ex.names == ["host1", "host2/gpu0", "leaf0", "host3/nic0->leaf0"]
    with pytest.raises(TopologyError, match="'host0/gpu0->leaf0': no link between two vertices"):
        parse_exclusions(spec, graph, ["host0/gpu0->leaf0"])


def test_apply_drops_whole_nodes_and_copies_node_types_without_gpus(spec):
    ex = Exclusions(nodes=("host0",), gpus=("host1/gpu0", "host1/gpu1", "host2/gpu1"))
    out = apply_exclusions(spec, ex)
    assert [n.name for n in out.nodes] == ["host2", "host3"]
    assert out.nodes[0].node_type == "netns-2-without-gpu1"
    assert out.node_types["netns-2-without-gpu1"].gpus == [0]
    assert out.num_gpus == 3
    with pytest.raises(TopologyError, match="nothing of cluster 'netns-4x2' is left"):
        apply_exclusions(spec, Exclusions(nodes=("host0", "host1", "host2", "host3")))


def test_degrade_slows_both_directions_of_links_and_every_link_of_a_device(spec):
    graph = build_graph(spec)
    before = {tuple(sorted(e)): d["bandwidth"] for *e, d in graph.edges(data=True)}
    degrade_excluded(graph, Exclusions(devices=("host2/nic0",),
                                       links=(("leaf0", "host0/nic0"),)))
    changed = {e for *e2, d in graph.edges(data=True)
               if d["bandwidth"] != before[e := tuple(sorted(e2))]}
    assert changed == {("host0/nic0", "leaf0"), ("host2/nic0", "leaf0"),
                       ("host2/nic0", "host2/sw0")}
    assert graph.edges["host0/nic0", "leaf0"]["bandwidth"] == pytest.approx(
        before[("host0/nic0", "leaf0")] * EXCLUDED_LINK_FACTOR)
