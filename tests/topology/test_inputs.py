"""Each input format (nvidia-smi topo -m, NCCL topology XML, Kubernetes labels) -> ClusterSpec."""

import pytest
from kubernetes.client import V1Node, V1NodeList, V1NodeStatus, V1ObjectMeta
from topology_helpers import FIXTURES

from specs.cluster import ClusterSpec, NodeSpec
from topology.graph import TopologyError, build_graph
from topology.k8s import build_cluster_from_k8s
from topology.ncclxml import build_node_type_from_nccl_xml
from topology.nvsmi import build_node_type_from_nvsmi, parse_topo_matrix
from topology.presets import build_l40s_node_type, build_link_types

NVSMI = (FIXTURES / "l40s-8x-2s.nvsmi.txt").read_text()
NCCL = (FIXTURES / "l40s-8x-2s.nccl-topo.xml").read_text()
TOPO = "network.topology.nvidia.com/"


def _shape(nt):
    """(socket -> [(switch GPUs, NIC names)]) without names that differ between sources."""
    return [[(sw.gpus, len(sw.nics)) for sw in s.switches] for s in nt.sockets]


def test_nvsmi_matrix_parses_paths_legend_and_numa():
    devices, paths, legend, numa = parse_topo_matrix(NVSMI)
    assert devices[:2] == ["GPU0", "GPU1"] and devices[-1] == "NIC3"
    assert paths[("GPU0", "GPU1")] == "PIX" and paths[("GPU0", "GPU2")] == "NODE"
    assert paths[("GPU3", "GPU4")] == "SYS" and paths[("GPU7", "NIC3")] == "PIX"
    assert legend["NIC2"] == "mlx5_2"
    assert numa == {f"GPU{i}": i // 4 for i in range(8)}


def test_nvsmi_node_type_matches_the_l40s_preset():
    nt = build_node_type_from_nvsmi(NVSMI)
    assert _shape(nt) == _shape(build_l40s_node_type(nics=4))
    assert nt.nics == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    # usable as a node type of a cluster
    spec = ClusterSpec(name="one", link_types=build_link_types(), node_types={"smi": nt},
                       nodes=[NodeSpec(name="n0", node_type="smi")])
    assert build_graph(spec).has_edge("n0/cpu0", "n0/cpu1")


def test_nvsmi_phb_gpus_get_root_ports_and_nic_on_socket():
    # 4 GPUs, each on its own root port of one socket (PHB between all), one NIC on the socket.
    rows = ["\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID"]
    for i in range(4):
        cells = ["X" if j == i else "PHB" for j in range(4)] + ["PHB", "0-15", "0", "N/A"]
        rows.append("\t".join([f"GPU{i}", *cells]))
    rows.append("\t".join(["NIC0", "PHB", "PHB", "PHB", "PHB", "X"]))
    nt = build_node_type_from_nvsmi("\n".join(rows) + "\n\nNIC Legend:\n\n  NIC0: mlx5_0\n")
    assert len(nt.sockets) == 1 and nt.socket_link is None
    assert [sw.gpus for sw in nt.sockets[0].switches] == [[0], [1], [2], [3]]
    assert [n.name for n in nt.sockets[0].nics] == ["mlx5_0"]


def test_nvsmi_refuses_nvlink_and_garbage():
    with pytest.raises(TopologyError, match=r"GPU0-GPU1 is NV4 \(NVLink\)"):
        build_node_type_from_nvsmi("\tGPU0\tGPU1\nGPU0\tX\tNV4\nGPU1\tNV4\tX\n")
    with pytest.raises(TopologyError, match=r"no header line starting with GPU0"):
        build_node_type_from_nvsmi("hello")


def test_nccl_xml_node_type_matches_nvsmi():
    nt, links = build_node_type_from_nccl_xml(NCCL)
    assert _shape(nt) == _shape(build_node_type_from_nvsmi(NVSMI))
    assert nt.nics == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    # 16 GT/s x 16 lanes x 128/130 / 8 = 31.5 GB/s, x 0.8 achievable = 25.2
    assert links["pcie"].bandwidth_gb_s == pytest.approx(25.206, abs=1e-3)
    # 200,000 Mb/s / 8000 = 25 GB/s, x 0.9 achievable = 22.5
    assert links["nic-200g"].bandwidth_gb_s == pytest.approx(22.5)


def test_nccl_xml_errors_are_clear():
    with pytest.raises(TopologyError, match=r"does not parse"):
        build_node_type_from_nccl_xml("<system><cpu>")
    with pytest.raises(TopologyError, match=r"root element is <topology>"):
        build_node_type_from_nccl_xml("<topology/>")
    with pytest.raises(TopologyError, match=r"no <gpu> under any <cpu>"):
        build_node_type_from_nccl_xml('<system><cpu numaid="0"/></system>')


def _node(name, gpus, **labels):
    capacity = {"cpu": "64"} if gpus is None else {"cpu": "64", "nvidia.com/gpu": str(gpus)}
    return V1Node(metadata=V1ObjectMeta(name=name, labels=labels),
                  status=V1NodeStatus(capacity=capacity))


def test_topograph_labels_build_leaves_and_spine_and_unknown_bucket():
    nodes = [_node(f"gpu-{i}", 8, **{TOPO + "leaf": f"l{i // 2}", TOPO + "spine": "s0",
                                     TOPO + "accelerator": f"nvl-{i}"}) for i in range(4)]
    nodes += [_node("no-labels", 8), _node("cpu-only", None)]
    spec = build_cluster_from_k8s(V1NodeList(items=nodes), oversubscription=2.0)
    assert [n.name for n in spec.nodes] == ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]
    assert {n.leaf for n in spec.nodes} == {"leaf.l0", "leaf.l1"}
    assert {s.name: s.parent for s in spec.switches} == {
        "leaf.l0": "spine.s0", "leaf.l1": "spine.s0", "spine.s0": None}
    assert [(u.name, u.gpus) for u in spec.unknown_topology] == [("no-labels", 8)]
    assert "unknown topology (left out of plans): no-labels" in spec.summary()
    g = build_graph(spec)
    assert g.edges["leaf.l0", "spine.s0"]["bandwidth"] == pytest.approx(2 * 4 * 22.5 / 2)


def test_kueue_level_labels_and_assumed_top():
    block, rack = "cloud.provider.com/topology-block", "cloud.provider.com/topology-rack"
    nodes = [_node(f"n{i}", 4, **{block: f"b{i // 2}", rack: f"r{i}"}) for i in range(4)]
    spec = build_cluster_from_k8s(nodes)
    assert spec.num_gpus == 16
    parents = {s.name: s.parent for s in spec.switches}
    assert parents["leaf.r0"] == "spine.b0" and parents["leaf.r3"] == "spine.b1"
    # two blocks and no label above them: joined by an assumed top switch, said in its name
    assert parents["spine.b0"] == parents["spine.b1"] == "core.assumed-top"
    build_graph(spec)


def test_k8s_odd_gpu_count_and_no_labels_at_all():
    spec = build_cluster_from_k8s([_node("a", 2, **{TOPO + "leaf": "l0"})])
    assert spec.num_gpus == 2
    with pytest.raises(ValueError, match=r"none of the 1 GPU nodes carries topology labels"):
        build_cluster_from_k8s([_node("b", 8)])


def test_k8s_conflicting_parents_are_refused():
    nodes = [_node("a", 8, **{TOPO + "leaf": "l0", TOPO + "spine": "s0"}),
             _node("b", 8, **{TOPO + "leaf": "l0", TOPO + "spine": "s1"})]
    with pytest.raises(ValueError, match=r"switch 'leaf.l0' has two parents"):
        build_cluster_from_k8s(nodes)


def test_cluster_yaml_reads_node_type_files(tmp_path):
    from topology_helpers import ROOT

    from topology.sources import load_cluster

    spec = load_cluster(ROOT / "configs/clusters/l40s-2node-from-nvsmi.yaml")
    assert spec.node_types["l40s-8x"].nics == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    assert build_graph(spec).has_edge("node-b/mlx5_3", "leaf-rail3")
    # NCCL XML form: its NIC link type comes with it
    (tmp_path / "n.xml").write_text(NCCL)
    (tmp_path / "c.yaml").write_text(
        "name: x\nlink_types: {}\nnode_types: {t: {nccl_topo_xml: n.xml}}\n"
        "nodes: [{name: a, node_type: t}]\n")
    spec = load_cluster(tmp_path / "c.yaml")
    assert spec.link_types["nic-200g"].bandwidth_gb_s == pytest.approx(22.5)
    (tmp_path / "d.yaml").write_text(
        "name: x\nlink_types: {}\nnode_types: {t: {nccl_topo_xml: missing.xml}}\n"
        "nodes: [{name: a, node_type: t}]\n")
    from specs.loading import SpecError
    with pytest.raises(SpecError, match=r"node_types.t.nccl_topo_xml: cannot read .*missing.xml"):
        load_cluster(tmp_path / "d.yaml")
