"""Hostile and careless StagedTrainings (issue 34): tenant file paths, objects the operator does
not own, other runs' token Secrets, absurd counts, and reconciles that overrun."""

from __future__ import annotations

import string
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from operators import apply as apply_mod
from operators.decide import ApplyConfigMap, CreateObject, Settings, plan_reconcile
from operators.handlers import Cache, build_loop_settings, find_stuck
from operators.replan import plan_topology
from operators.resource import StagedTrainingSpec, build_crd
from tests.operators.conftest import REPO, T0, make_node, make_training, tiny_spec

NODES = [make_node(f"n{i}") for i in range(3)]
FAST = Settings(backoff_seconds=1, poll_seconds=5)
NVSMI = (REPO / "configs/clusters/l40s-8x-2s.nvsmi.txt").read_text()


def cluster_with(node_type: dict) -> str:
    data = yaml.safe_load((REPO / "configs/clusters/l40s-2node-from-nvsmi.yaml").read_text())
    data["node_types"]["l40s-8x"] = node_type
    return yaml.safe_dump(data)


def config_map_spec() -> StagedTrainingSpec:
    return StagedTrainingSpec.model_validate(
        {**tiny_spec(), "topology": {"source": "config-map", "config_map": "fabric"}})


# --- the operator opens no file a tenant names ------------------------------------------------

@pytest.fixture
def no_file_reads(monkeypatch):
    """Any attempt to read a topology file fails the test."""
    import specs.files

    def refuse(*a, **k):
        raise AssertionError(f"the operator read a file a tenant named: {a}")

    monkeypatch.setattr(specs.files, "read_bounded", refuse)


@pytest.mark.parametrize("key", ["nvidia_smi_topo", "nccl_topo_xml"])
def test_a_tenant_configmap_naming_a_file_is_refused_unread(key, tmp_path, no_file_reads):
    real = tmp_path / "exists.txt"
    real.write_text(NVSMI)
    messages = [plan_topology(config_map_spec(), cluster_with({key: path}))
                for path in (str(real), str(tmp_path / "missing.txt"), "/etc/shadow")]
    assert all(m is not None and f"node_types.l40s-8x.{key}: file references are not read" in m
               and f"{key}_text" in m for m in messages)
    # The same words whether the path exists or not: nothing learnt about the filesystem.
    assert len({m.replace(str(tmp_path), "") for m in messages}) == 1
    assert not any("exists.txt" in m or "shadow" in m for m in messages)


def test_the_topology_inline_is_planned(no_file_reads):
    assert plan_topology(config_map_spec(), cluster_with({"nvidia_smi_topo_text": NVSMI})) is None


def test_render_inlines_the_dumps_the_operator_would_refuse(tmp_path):
    from operators.render import build_cluster_map

    run = tmp_path / "run.yaml"
    (tmp_path / "cluster.yaml").write_text(
        (REPO / "configs/clusters/l40s-2node-from-nvsmi.yaml").read_text())
    (tmp_path / "l40s-8x-2s.nvsmi.txt").write_text(NVSMI)
    cm = build_cluster_map(run, {"name": "r", "resources": {"cluster": "cluster.yaml"}}, "ml")
    shipped = cm["data"]["cluster.yaml"]
    assert "nvidia_smi_topo_text" in shipped and "l40s-8x-2s.nvsmi.txt" not in shipped
    assert plan_topology(config_map_spec(), shipped) is None


@pytest.mark.parametrize("text", [
    "a: &a [*a]",  # a recursive alias
    "name: x\nnode_types: {t: {nvidia_smi_topo_text: 'GPU0 GPU1\\nGPU0 X'}}\nnodes: []\n",
    "name: x\nnode_types: {t: {nccl_topo_xml_text: '<system><cpu'}}\nnodes: []\n",
    "name: x\nnode_types: {t: {nccl_topo_xml_text: 3}}\n",
    "[" * 5000,
    "x" * (2 << 20),
])
def test_a_broken_configmap_is_one_message_never_a_traceback(text, no_file_reads):
    problem = plan_topology(config_map_spec(), text)
    assert isinstance(problem, str) and problem.startswith("ConfigMap fabric")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(string.printable, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "node_types", "nodes", "link_types", "preset", "kind",
                         "nvidia_smi_topo", "nccl_topo_xml", "nvidia_smi_topo_text",
                         "nccl_topo_xml_text", "switches"]) | st.text(max_size=5),
        inner, max_size=5), max_leaves=30)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_any_configmap_content_gets_a_verdict_without_reading_files(data):
    import specs.files

    real, specs.files.read_bounded = specs.files.read_bounded, None  # any read: TypeError
    try:
        problem = plan_topology(config_map_spec(), yaml.safe_dump(data))
    finally:
        specs.files.read_bounded = real
    assert problem is None or (isinstance(problem, str) and problem.startswith("ConfigMap"))
    assert problem is None or "could not be read (TypeError)" not in problem


# --- the run's own token Secret only ----------------------------------------------------------

def test_another_secret_as_auth_secret_is_refused_and_the_own_one_runs():
    other = make_training(ray_cluster={"auth_secret": "prod-ray-token"})
    d = plan_reconcile(other, [], NODES, T0, settings=FAST)
    assert d.of(CreateObject) == [] and d.status.phase == "Failed"
    [cond] = [c for c in d.status.conditions if c.type == "SpecValid"]
    assert cond.message.startswith("spec.ray_cluster.auth_secret: 'prod-ray-token' is not this "
                                   "run's token Secret") and "tiny-ray-token" in cond.message
    own = make_training(ray_cluster={"auth_secret": "tiny-ray-token"})
    job = plan_reconcile(own, [], NODES, T0, settings=FAST).of(CreateObject)[0].body
    assert job["spec"]["rayClusterSpec"]["authOptions"]["secretName"] == "tiny-ray-token"


# --- maxima ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"ray_cluster": {"gpus_per_node": 10**12}}, "gpus_per_node"),
    ({"ray_cluster": {"auth_secret": "../../etc"}}, "auth_secret"),
    ({"ray_cluster": {"storage_claim": "a/b"}}, "storage_claim"),
    ({"topology": {"source": "config-map", "config_map": "x\ny"}}, "config_map"),
    ({"topology": {"node_selector": {f"k{i}": "v" for i in range(65)}}}, "node_selector"),
    ({"image": "a" * 600}, "image"),
])
def test_absurd_values_are_refused_fast_by_the_model(change, field):
    # CPU seconds of this process, not the wall clock: other processes on the shared cores
    # cannot make it look slow (a CI run beside benchmarks saw 1.14 s against the bound)
    started = time.process_time()
    with pytest.raises(ValidationError) as e:
        StagedTrainingSpec.model_validate({**tiny_spec(), **change})
    assert time.process_time() - started < 1.0
    assert field in str(e.value)


def test_the_crd_carries_the_maxima():
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    cluster = spec["properties"]["ray_cluster"]["properties"]
    assert cluster["gpus_per_node"]["maximum"] == 64
    assert cluster["auth_secret"]["maxLength"] == 253 and "pattern" in cluster["auth_secret"]
    group = cluster["template"]["properties"]["workerGroupSpecs"]["items"]["properties"]
    assert group["replicas"]["maximum"] == 10_000


# --- the operator writes only what it owns ----------------------------------------------------

class FakeCore:
    def __init__(self, owners):
        self.cm = SimpleNamespace(data={"run.yaml": "old"},
                                  metadata=SimpleNamespace(owner_references=owners))
        self.patched, self.events = [], []

    def read_namespaced_config_map(self, name, ns):
        return self.cm

    def patch_namespaced_config_map(self, name, ns, body):
        self.patched.append(name)

    def create_namespaced_event(self, ns, body):
        self.events.append(body["reason"])


class FakeCustom:
    def __init__(self):
        self.created, self.status = [], None

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        self.created.append(body["metadata"]["name"])
        return body

    def patch_namespaced_custom_object_status(self, group, version, ns, plural, name, body):
        self.status = body["status"]
        return {"status": body["status"]}


def owner(uid: str, kind: str = "StagedTraining"):
    return SimpleNamespace(uid=uid, kind=kind, api_version="ringpilot.io/v1alpha1")


@pytest.mark.parametrize("owners, owned", [
    (None, False),
    ([owner("uid-other")], False),
    ([owner("uid-1", kind="RayJob")], False),
    ([owner("uid-1")], True),
])
def test_the_run_configmap_is_patched_only_when_owned(monkeypatch, owners, owned):
    core, custom = FakeCore(owners), FakeCustom()
    monkeypatch.setattr(apply_mod.client, "CoreV1Api", lambda api: core)
    monkeypatch.setattr(apply_mod.client, "CustomObjectsApi", lambda api: custom)
    st = make_training()
    decision = plan_reconcile(st, [], NODES, T0, settings=FAST)
    assert decision.of(ApplyConfigMap) and decision.of(CreateObject)
    apply_mod.apply_decision(None, st, decision, T0)
    if owned:
        assert core.patched == ["tiny-run"] and custom.created == ["tiny-s256-a1"]
        return
    assert core.patched == [] and custom.created == []  # nothing after the refused write
    [cond] = [c for c in custom.status["conditions"] if c["type"] == "ResourcesOwned"]
    assert (cond["status"], cond["reason"]) == ("False", "NotOwned")
    assert "ConfigMap tiny-run exists and is not owned by StagedTraining tiny" in cond["message"]
    assert core.events == ["NotOwned"]


# --- bounded reconciles -----------------------------------------------------------------------

def test_find_stuck_names_only_reconciles_past_the_deadline():
    cache = Cache()
    running, done = Future(), Future()
    done.set_result(None)
    cache.inflight = {("ml", "slow"): (running, 100.0), ("ml", "fresh"): (Future(), 109.5),
                      ("ml", "done"): (done, 0.0)}
    assert find_stuck(cache, 5.0, 110.0) == ["ml/slow"]


@pytest.mark.parametrize("env", [{"RINGPILOT_RECONCILE_DEADLINE_SECONDS": "inf"},
                                 {"RINGPILOT_RECONCILE_DEADLINE_SECONDS": "0"},
                                 {"RINGPILOT_RECONCILE_WORKERS": "0"}])
def test_loop_settings_refuse_unbounded_values(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="RINGPILOT_RECONCILE"):
        build_loop_settings()


@pytest.mark.parametrize("change", [
    lambda s: s["resources"].update(workers=10**12),
    lambda s: s.setdefault("ray_cluster", {}).update(gpus_per_node=10**12),
    lambda s: [stage.update(data_parallel_degree=10**12) for stage in s["stages"]],
    lambda s: [stage.update(ring_degree=10**12) for stage in s["stages"]],
], ids=["workers", "gpus-per-node", "dp-degree", "ring-degree"])
def test_counts_of_ten_to_the_twelve_are_refused_within_a_second(change):
    st = make_training()
    change(st["spec"])
    started = time.process_time()
    d = plan_reconcile(st, [], NODES, T0, settings=FAST)
    assert time.process_time() - started < 1.0
    assert d.of(CreateObject) == [] and d.status.phase == "Failed"
    [cond] = [c for c in d.status.conditions if c.type == "SpecValid"]
    assert cond.status == "False" and cond.message.startswith("spec.")


# --- `ringpilot manifests`: no argument can inject a document ---------------------------------

@pytest.mark.parametrize("args, flag", [
    (["--name", "tiny\n---\nkind: Secret"], "--name"),
    (["--namespace", "ml\nkind: Secret"], "--namespace"),
    (["--storage-claim", "../x"], "--storage-claim"),
    (["--image", "ghcr.io/r/r:1\n---"], "--image"),
    (["--node-selector", "a=b\nkind: Secret"], "--node-selector"),
    (["--gpus-per-node", "1000000000000"], "--gpus-per-node"),
    (["--run", "configs/tiny.yaml\n---\nkind: Secret"], "--run"),
])
def test_manifest_arguments_with_newlines_or_bad_syntax_exit_2(args, flag, capsys):
    from operators.cli import main

    argv = ["manifests", "render", "--run", "configs/tiny.yaml", *args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_a_rendered_manifest_is_the_documents_it_should_be(capsys, monkeypatch):
    from operators.cli import main

    monkeypatch.chdir(REPO)
    assert main(["manifests", "render", "--run", "configs/tiny.yaml", "--name", "t-1",
                 "--node-selector", "nvidia.com/gpu.product=NVIDIA-L40S"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["StagedTraining"]
    assert docs[0]["metadata"]["name"] == "t-1"


# --- the ledger: read only inside the runs volume the operator mounts -------------------------

def test_the_ledger_is_read_only_inside_the_runs_root(tmp_path):
    import os

    from operators.handlers import read_ledger

    root, outside = tmp_path / "runs", tmp_path / "elsewhere"
    for base in (root, outside):
        (base / "r").mkdir(parents=True)
        (base / "r" / "ledger.json").write_text('{"run": "r"}')
    os.symlink(outside / "r", root / "link")
    inside = {"storage": {"path": str(root)}, "name": "r"}
    assert read_ledger(inside, str(root)).run == "r"
    assert read_ledger(inside, "") is None  # no runs root configured: nothing is read
    for spec in ({"storage": {"path": str(outside)}, "name": "r"},  # absolute, elsewhere
                 {"storage": {"path": str(root)}, "name": "../elsewhere/r"},  # climbs out
                 {"storage": {"path": str(root)}, "name": "link"},  # a symlink out
                 {"storage": {"path": "/"}, "name": "etc"},
                 {"storage": {"path": 3}, "name": None}):
        assert read_ledger(spec, str(root)) is None, spec
    (root / "r" / "ledger.json").write_bytes(b"\xff\xfe")  # binary: a warning, not a traceback
    assert read_ledger(inside, str(root)) is None
