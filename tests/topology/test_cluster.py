"""ClusterSpec validation, presets, YAML examples and the networkx graph built from them."""

import networkx as nx
import pytest
import yaml
from pydantic import ValidationError
from topology_helpers import ROOT

from specs.cluster import ClusterSpec
from specs.loading import SpecError
from topology.graph import Router, TopologyError, _check_connected, apply_degrade_link, build_graph
from topology.presets import build_l40s_server, build_leaf_spine_cluster
from topology.sources import build_cluster, load_cluster


def _two_nodes() -> dict:
    return yaml.safe_load((ROOT / "configs/clusters/l40s-2node-leaf.yaml").read_text())


@pytest.mark.parametrize("name", ["l40s-8x-2s", "l40s-2node-leaf", "l40s-64-leaf-spine",
                                  "l40s-64-1nic-4to1"])
def test_example_yaml_loads_and_builds(name):
    spec = load_cluster(ROOT / f"configs/clusters/{name}.yaml")
    g = build_graph(spec)
    assert sum(1 for _, k in g.nodes(data="kind") if k == "gpu") == spec.num_gpus
    assert nx.is_connected(g)
    assert spec.name in spec.summary()


def test_written_out_server_equals_preset():
    spec = load_cluster(ROOT / "configs/clusters/l40s-8x-2s.yaml")
    preset = build_l40s_server()
    assert spec.node_types["l40s-8x"] == preset.node_types["l40s-8x"]


def test_graph_vertices_and_edges_of_one_server():
    g = build_graph(build_l40s_server())
    kinds = sorted(k for _, k in g.nodes(data="kind"))
    # 8 GPUs, 4 switches, 2 sockets, 4 NICs
    assert kinds.count("gpu") == 8 and kinds.count("pcie_switch") == 4
    assert kinds.count("socket") == 2 and kinds.count("nic") == 4
    # 8 GPU links + 4 NIC links + 4 switch uplinks + 1 socket link
    assert g.number_of_edges() == 17
    assert g.edges["node-000/cpu0", "node-000/cpu1"]["bandwidth"] == 16.0
    assert g.edges["node-000/gpu0", "node-000/sw0"]["bandwidth"] == 25.2


def test_leaf_uplink_is_downlinks_over_oversubscription():
    spec = build_leaf_spine_cluster(4, nodes_per_leaf=2, oversubscription=2.0)
    g = build_graph(spec)
    # 2 nodes x 4 NICs x 22.5 GB/s down, 2:1 -> 90 GB/s up
    assert g.edges["leaf-00", "spine"]["bandwidth"] == pytest.approx(90.0)


def test_graph_is_deterministic():
    a = build_graph(build_leaf_spine_cluster(6, 4, 3.0))
    b = build_graph(build_leaf_spine_cluster(6, 4, 3.0))
    assert list(a.nodes(data=True)) == list(b.nodes(data=True))
    assert list(a.edges(data=True)) == list(b.edges(data=True))


def test_routes_follow_the_hierarchy():
    spec = build_leaf_spine_cluster(2, nodes_per_leaf=1)
    r = Router(spec, build_graph(spec))
    assert r.route("node-000/gpu0", "node-000/gpu1") == [
        ("node-000/gpu0", "node-000/sw0"), ("node-000/sw0", "node-000/gpu1")]
    cross = r.route("node-000/gpu7", "node-001/gpu0")
    assert ("node-000/nic3", "leaf-00") in cross and ("leaf-00", "spine") in cross
    assert ("spine", "leaf-01") in cross and cross[-1] == ("node-001/sw0", "node-001/gpu0")


def test_zero_bandwidth_is_refused():
    data = _two_nodes()
    data["link_types"]["pcie"]["bandwidth_gb_s"] = 0
    with pytest.raises(ValidationError, match=r"bandwidth_gb_s must be > 0 GB/s, got 0"):
        ClusterSpec.model_validate(data)


def test_negative_uplink_is_refused():
    data = _two_nodes()
    data["switches"][1]["uplink_gb_s"] = -5
    with pytest.raises(ValidationError, match=r"uplink_gb_s must be > 0 GB/s, got -5"):
        ClusterSpec.model_validate(data)


def test_link_to_unknown_leaf_is_refused():
    data = _two_nodes()
    data["nodes"][1]["leaf"] = "leaf-99"
    with pytest.raises(ValidationError, match=r"links to leaf 'leaf-99', an unknown vertex"):
        ClusterSpec.model_validate(data)


def test_unknown_parent_switch_is_refused():
    data = _two_nodes()
    data["switches"][1]["parent"] = "spine-x"
    with pytest.raises(ValidationError, match=r"parent 'spine-x', an unknown vertex"):
        ClusterSpec.model_validate(data)


def test_unknown_link_type_is_refused():
    data = _two_nodes()
    data["node_types"]["l40s-8x"]["sockets"][0]["switches"][0]["uplink"] = "pcie5"
    with pytest.raises(ValidationError, match=r"uses link type 'pcie5', which is not in"):
        ClusterSpec.model_validate(data)


def test_node_without_leaf_is_disconnected():
    data = _two_nodes()
    del data["nodes"][1]["leaf"]
    with pytest.raises(ValidationError, match=r"node 'node-001' has no NIC connected to a leaf.*"
                       "disconnected"):
        ClusterSpec.model_validate(data)


def test_socket_without_link_is_disconnected():
    data = _two_nodes()
    data["node_types"]["l40s-8x"]["socket_link"] = None
    with pytest.raises(ValidationError, match=r"GPUs of cpu1 would be disconnected"):
        ClusterSpec.model_validate(data)


def test_build_graph_names_disconnected_gpus():
    # Past spec validation, a graph can still lose a link (e.g. edited by a what-if): the check
    # names the GPUs cut off.
    g = build_graph(build_l40s_server())
    g.remove_edge("node-000/gpu7", "node-000/sw3")
    with pytest.raises(TopologyError, match=r"GPUs \['node-000/gpu7'\] \(1 in all\) are "
                       "disconnected"):
        _check_connected(g)


def test_two_tops_without_common_parent_are_disconnected():
    data = _two_nodes()
    data["switches"] = [{"name": "leaf-00", "level": "leaf"}, {"name": "leaf-01", "level": "leaf"}]
    data["nodes"][1]["leaf"] = "leaf-01"
    with pytest.raises(ValidationError, match=r"several top switches \['leaf-00', 'leaf-01'\]"):
        ClusterSpec.model_validate(data)


def test_degrade_link_parses_dashed_names_and_scales():
    spec = build_leaf_spine_cluster(2, nodes_per_leaf=1)
    g = build_graph(spec)
    a, b, f = apply_degrade_link(g, "node-000/cpu0-node-000/cpu1=0.25")
    assert (a, b, f) == ("node-000/cpu0", "node-000/cpu1", 0.25)
    assert g.edges[a, b]["bandwidth"] == pytest.approx(4.0)
    with pytest.raises(TopologyError, match=r"no link between two vertices"):
        apply_degrade_link(g, "node-000/gpu0-node-001/gpu0=0.5")


def test_without_nodes_names_unknown_node():
    spec = build_leaf_spine_cluster(2, nodes_per_leaf=1)
    assert [n.name for n in spec.without_nodes(["node-001"]).nodes] == ["node-000"]
    with pytest.raises(ValueError, match=r"--without-node 'node-9': no such node"):
        spec.without_nodes(["node-9"])


def test_preset_form_rejects_extra_fields():
    with pytest.raises(SpecError, match=r"preset: give only name/description"):
        build_cluster({"preset": {"nodes": 2}, "nodes": []}, source="c.yaml")


def test_preset_expands_to_the_written_out_spec():
    data = {"name": "two", "preset": {"kind": "l40s-leaf-spine", "nodes": 2}}
    spec = build_cluster(data, source="c.yaml")
    assert spec.name == "two" and len(spec.nodes) == 2
    with pytest.raises(SpecError, match=r"preset: .*see topology.presets"):
        build_cluster({"preset": {"kind": "l40s-leaf-spine", "bogus": 1}}, source="c.yaml")


def test_cluster_schema_reads_no_file():
    """A node-type file reference is the loader's business; the schema rejects it as data."""
    data = _two_nodes()
    data["node_types"]["l40s-8x"] = {"nvidia_smi_topo": "l40s-8x-2s.nvsmi.txt"}
    with pytest.raises(ValidationError, match=r"nvidia_smi_topo"):
        ClusterSpec.model_validate(data)


def test_gpus_send_through_the_nearest_cabled_nic():
    # Only nic3 (socket 1) of node-001 is cabled: its socket-0 GPUs cross the socket link to it.
    data = _two_nodes()
    data["nodes"][1] = {"name": "node-001", "node_type": "l40s-8x",
                        "nic_leaves": {"nic3": "leaf-00"}}
    spec = ClusterSpec.model_validate(data)
    r = Router(spec, build_graph(spec))
    assert r.nic_of("node-001", 0) == "nic3" and r.nic_of("node-000", 0) == "nic0"
    route = r.route("node-001/gpu0", "node-000/gpu0")
    assert ("node-001/cpu0", "node-001/cpu1") in route and ("node-001/nic3", "leaf-00") in route
