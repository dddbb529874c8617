"""Bounded work for every input: absurd counts, inf/nan, alias bombs and deep nesting are refused
in well under a second with one line naming the field, by `ringpilot validate` and by the
trainer's spec loading (before Ray starts); the loaders' only outcomes are a model or SpecError."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_jobs.train.driver import main as train_main
from ringpilot.cli import main as ringpilot_main
from specs.cluster import ClusterSpec
from specs.degrees import degree_options, divisors, zigzag_problem
from specs.loading import MAX_YAML_DEPTH, SpecError, load_model, parse_yaml, validate_data
from specs.run import RunSpec
from topology.presets import build_leaf_spine_cluster
from topology.sources import build_cluster, load_cluster

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
CLUSTER = yaml.safe_load((ROOT / "configs" / "clusters" / "l40s-2node-leaf.yaml").read_text())
HUGE = 10**12
FAST = 1.0  # seconds: generous, the refusals take milliseconds

# Every count and size of a RunSpec, as a path into tiny.yaml's mapping.
RUN_COUNTS = [
    ("model", "vocab_size"), ("model", "hidden_size"), ("model", "intermediate_size"),
    ("model", "num_hidden_layers"), ("model", "num_attention_heads"),
    ("model", "num_key_value_heads"), ("model", "pretrain_seq_len"),
    ("stages", 0, "seq_len"), ("stages", 0, "steps"), ("stages", 0, "batch_size"),
    ("stages", 0, "grad_accum_steps"), ("stages", 0, "warmup_steps"),
    ("stages", 0, "ring_degree"), ("stages", 0, "data_parallel_degree"),
    ("stages", 0, "shard_degree"), ("stages", 0, "ulysses_degree"),
    ("resources", "workers"), ("resources", "cpus_per_worker"),
    ("training", "loss_chunk_tokens"), ("data", "seed"), ("data", "tokenizer", "vocab_size"),
    ("eval", "samples"), ("eval", "seed"), ("eval", "max_retries"),
    ("eval", "max_tokens_per_evaluator"), ("eval", "gang_size"), ("eval", "ruler", "samples"),
    ("eval", "ruler", "min_length"), ("storage", "checkpoint_every"), ("storage", "keep_last"),
    ("failure", "max_failures"), ("failure", "stage_retries"), ("failure", "report_every"),
]
RUN_FLOATS = [
    ("model", "rope_theta"), ("stages", 0, "rope_theta"), ("stages", 0, "lr"),
    ("training", "grad_clip"), ("data", "mix", "passkey"), ("data", "mix", "kv_retrieval"),
    ("eval", "cpus"), ("eval", "gpus"), ("eval", "gang_place_timeout_s"),
]


def with_value(doc: dict, path: tuple, value: object) -> dict:
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    return out


def dotted(path: tuple) -> str:
    """A path as SpecError lines spell it: `a.b[0]`, `a["odd-key"]`."""
    text = ""
    for key in path:
        if isinstance(key, int):
            text += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", key):
            text += f".{key}" if text else key
        else:
            text += f'["{key}"]'
    return text


def write(tmp_path: Path, doc: object, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    return path


@contextlib.contextmanager
def timed():
    """Yields a one-item list that holds the CPU seconds this process took once the block ends:
    CPU time, not the wall clock, so that other processes on the shared cores (a parallel test
    run put 10 on 2) cannot make a refusal look slow (seen: 1.01 s of wall clock against the 1 s
    bound). The garbage collector is paused inside: what is timed is the refusal, not a full
    collection of the heap that importing the trainer (torch, Ray) left."""
    gc.disable()
    took = [math.inf]
    start = time.process_time()
    try:
        yield took
    finally:
        took[0] = time.process_time() - start
        gc.enable()


def validate_timed(path: Path, capsys, *args: str) -> tuple[int, str, float]:
    with timed() as took:
        rc = ringpilot_main(["validate", *args, str(path)] if path else ["validate", *args])
    return rc, capsys.readouterr().err, took[0]


def train_timed(path: Path, capsys) -> tuple[int, str, float]:
    with timed() as took:
        rc = train_main(["--run", str(path)])
    return rc, capsys.readouterr().err, took[0]


@pytest.fixture(autouse=True)
def no_ray_started(monkeypatch):
    """A refused spec must not start or join Ray: any ray.init during the test fails it. (Not
    `ray.is_initialized()` afterwards: in the whole suite, the session's local Ray is up.)"""
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    yield
    assert not calls, f"a refused spec started Ray: ray.init({calls[0]})"


@pytest.mark.parametrize("path", RUN_COUNTS, ids=dotted)
def test_each_count_at_10_to_12_is_refused_fast_by_validate_and_trainer(tmp_path, capsys, path):
    spec = write(tmp_path, with_value(TINY, path, HUGE))
    rc, err, elapsed = validate_timed(spec, capsys)
    assert rc == 2 and elapsed < FAST, (rc, elapsed, err)
    assert re.search(rf"^  {re.escape(dotted(path))}: (Input )?should be less than or equal to "
                     r"\d+", err, re.M), err
    assert "Traceback" not in err
    rc, err, elapsed = train_timed(spec, capsys)
    assert rc == 2 and elapsed < FAST, (rc, elapsed, err)
    assert re.search(rf"^  {re.escape(dotted(path))}: (Input )?should be less than or equal to "
                     r"\d+", err, re.M), err


def test_every_count_at_10_to_12_at_once_is_refused_fast(tmp_path, capsys):
    doc = TINY
    for path in RUN_COUNTS:
        doc = with_value(doc, path, HUGE)
    spec = write(tmp_path, doc)
    for run in (validate_timed, train_timed):
        rc, err, elapsed = run(spec, capsys)
        assert rc == 2 and elapsed < FAST, (run.__name__, rc, elapsed)
        named = {dotted(p) for p in RUN_COUNTS if f"  {dotted(p)}: " in err}
        assert len(named) >= len(RUN_COUNTS) - 2, sorted({dotted(p) for p in RUN_COUNTS} - named)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("path", RUN_FLOATS, ids=dotted)
def test_non_finite_floats_are_refused_naming_the_field(tmp_path, capsys, path, value):
    text = yaml.safe_dump(with_value(TINY, path, "PLACEHOLDER")).replace("PLACEHOLDER", value)
    rc, err, elapsed = validate_timed(write(tmp_path, text), capsys)
    assert rc == 2 and elapsed < FAST, err
    assert f"  {dotted(path)}: " in err and "Traceback" not in err, err
    assert "finite number" in err or value == "-.inf", err  # -inf also fails `> 0` first


def test_auto_rope_theta_that_leaves_the_floats_is_one_line(tmp_path, capsys):
    doc = with_value(with_value(TINY, ("model", "pretrain_seq_len"), 7),
                     ("model", "rope_theta"), 1e12)
    rc, err, _ = validate_timed(write(tmp_path, doc), capsys)
    assert rc == 2 and "rope_theta 'auto' gives a RoPE base above" in err, err


CLUSTER_NUMBERS = [
    (("link_types", "pcie", "bandwidth_gb_s"), ".inf", "finite number"),
    (("link_types", "pcie", "bandwidth_gb_s"), ".nan", "finite number"),
    (("link_types", "nic", "latency_us"), ".inf", "finite number"),
    (("switches", 1, "oversubscription"), ".inf", "finite number"),
    (("switches", 1, "uplink_gb_s"), ".nan", "finite number"),
    (("node_types", "l40s-8x", "sockets", 0, "switches", 0, "gpus", 0), "-1",
     "greater than or equal to 0"),
    (("node_types", "l40s-8x", "sockets", 0, "switches", 0, "gpus", 0), str(HUGE),
     "less than or equal to"),
]


@pytest.mark.parametrize(("path", "value", "problem"), CLUSTER_NUMBERS,
                         ids=[f"{dotted(p)}={v}" for p, v, _ in CLUSTER_NUMBERS])
def test_cluster_numbers_are_finite_and_in_range(tmp_path, capsys, path, value, problem):
    text = yaml.safe_dump(with_value(CLUSTER, path, "PLACEHOLDER")).replace("PLACEHOLDER", value)
    rc, err, elapsed = validate_timed(None, capsys, "--cluster",
                                      str(write(tmp_path, text, "cluster.yaml")))
    assert rc == 2 and elapsed < FAST, err
    assert f"  {dotted(path)}: " in err and problem in err, err


@pytest.mark.parametrize("preset", [
    {"kind": "l40s-leaf-spine", "nodes": 10**8},
    {"kind": "l40s-leaf-spine", "nodes": 64, "nodes_per_leaf": HUGE},
    {"kind": "l40s-leaf-spine", "nodes": 64, "leaves_per_spine": 0},
    {"kind": "l40s-leaf-spine", "nodes": 2, "gpus": HUGE},
    {"kind": "l40s-leaf-spine", "nodes": "64"},
    {"kind": "l40s-server", "gpus": 4 * HUGE},
])
def test_absurd_presets_are_refused_before_a_graph_is_built(tmp_path, capsys, preset):
    path = write(tmp_path, {"name": "big", "preset": preset}, "cluster.yaml")
    rc, err, elapsed = validate_timed(None, capsys, "--cluster", str(path))
    assert rc == 2 and elapsed < FAST, (elapsed, err)
    assert "  preset: " in err and "Traceback" not in err, err


def test_preset_count_ceilings_are_those_of_the_schema():
    with pytest.raises(ValueError, match=r"nodes=100000000 is out of range: give 1 to 32768"):
        build_leaf_spine_cluster(10**8)


def test_a_cluster_of_too_many_gpus_is_refused_fast():
    nodes = [{"name": f"n{i}", "node_type": "l40s-8x", "leaf": "leaf-00"} for i in range(20_000)]
    with timed() as took:
        with pytest.raises(SpecError, match=r"nodes: 160000 GPUs in all, more than the 131072"):
            build_cluster({**CLUSTER, "nodes": nodes}, source="c.yaml")
    assert took[0] < 2 * FAST  # 20,000 nodes to validate


def test_a_switch_chain_deeper_than_a_fabric_is_refused_in_linear_time():
    chain = [{"name": f"s{i}", "level": "spine", "parent": f"s{i + 1}" if i < 9_999 else None}
             for i in range(10_000)]
    data = {**CLUSTER, "switches": [*CLUSTER["switches"], *chain]}
    with timed() as took:
        with pytest.raises(SpecError, match=r"levels deep under its top switch 's9999'; a fabric "
                                            r"has at most 8 levels"):
            build_cluster(data, source="c.yaml")
    assert took[0] < FAST


def test_a_switch_cycle_is_still_named():
    data = {**CLUSTER, "switches": [{"name": "a", "level": "spine", "parent": "b"},
                                    {"name": "b", "level": "spine", "parent": "a"},
                                    {"name": "leaf-00", "level": "leaf", "parent": "a"}]}
    with pytest.raises(SpecError, match=r"switch parents form a cycle through 'a'"):
        build_cluster(data, source="c.yaml")


# ---- YAML ----------------------------------------------------------------------------------

def alias_bomb(levels: int = 9, width: int = 9) -> str:
    names = [f"l{i}" for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [" + ", ".join(['"lol"'] * width) + "]"]
    for prev, name in zip(names, names[1:]):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * width) + "]")
    return "\n".join(lines) + "\n"


BAD_YAML = {
    "alias bomb": (alias_bomb(), r"aliases expand the document past \d+ values"),
    "many aliases": ("a: &a 1\nb: [" + ", ".join(["*a"] * 500) + "]\n",
                     r"more than 100 aliases"),
    "recursive alias": ("a: &a [1, *a]\n", r"an alias refers to a value that contains it"),
    "20,000-deep flow nesting": ("a: " + "[" * 20_000 + "]" * 20_000 + "\n",
                                 rf"nested more than {MAX_YAML_DEPTH} levels deep"),
    "20,000-deep flow mappings": ("a: " + "{b: " * 20_000 + "1" + "}" * 20_000 + "\n",
                                  rf"nested more than {MAX_YAML_DEPTH} levels deep"),
    "20,000-deep block sequences": ("- " * 20_000 + "x\n",
                                    rf"nested more than {MAX_YAML_DEPTH} levels deep"),
    "deep block mappings": ("".join(" " * i + f"k{i}:\n" for i in range(2_000)) + " " * 2_000 + "v",
                            rf"nested more than {MAX_YAML_DEPTH} levels deep"),
    "4 MiB flat list": ("a: [" + "1," * (2 * 1024 * 1024 - 10) + "1]\n",
                        r"more than 32768 values"),
    "1M-line block list": ("a:\n" + "- 1\n" * (1024 * 1024 - 10), r"more than 32768 values"),
    "5,000-digit integer": ("name: " + "9" * 5_000 + "\n", r"a value cannot be read"),
    "impossible date": ("name: 2001-13-45\n", r"a value cannot be read"),
    "empty tagged integer": ("name: !!int ''\n", r"explicit tag 'tag:yaml.org,2002:int'"),
    "tagged bool": ("name: !!bool x\n", r"explicit tag 'tag:yaml.org,2002:bool'"),
    "tagged mapping": ("name: !!map [1]\n", r"explicit tag 'tag:yaml.org,2002:map'"),
    "python tag": ("!!python/name:os.system x\n", r"explicit tag 'tag:yaml.org,2002:python"),
}


@pytest.mark.parametrize("name", BAD_YAML)
def test_hostile_yaml_is_one_spec_error_fast(tmp_path, capsys, name):
    text, problem = BAD_YAML[name]
    path = write(tmp_path, text)
    with timed() as took:
        with pytest.raises(SpecError) as e:
            load_model(path, RunSpec)
    assert took[0] < FAST
    assert len(e.value.lines) == 1 and e.value.lines[0].startswith("<yaml>: "), e.value.lines
    assert re.search(problem, e.value.lines[0]), e.value.lines[0]
    rc, err, elapsed = validate_timed(path, capsys)
    assert rc == 2 and elapsed < FAST and "Traceback" not in err, err
    rc, err, elapsed = train_timed(path, capsys)
    assert rc == 2 and elapsed < FAST and "<yaml>: " in err, err


def test_text_from_an_api_with_a_lone_surrogate_is_one_error():
    with pytest.raises(SpecError, match=r"<yaml>: not valid Unicode text \(surrogates not "
                                        r"allowed at character 3"):
        parse_yaml("a: \ud800", "ConfigMap topo")


def test_ordinary_anchors_and_merge_keys_still_load():
    doc = parse_yaml("base: &b {lr: 1.0e-3, steps: 10}\n"
                     "stages: [{<<: *b, name: a}, {<<: *b, name: b, steps: 20}]\n", "x.yaml")
    assert doc["stages"] == [{"lr": 1e-3, "steps": 10, "name": "a"},
                             {"lr": 1e-3, "steps": 20, "name": "b"}]


def test_a_huge_integer_is_reported_without_printing_it(tmp_path, capsys):
    text = yaml.safe_dump(with_value(TINY, ("resources", "workers"), "X")).replace(
        "X", "0x" + "f" * 5_000)
    rc, err, _ = validate_timed(write(tmp_path, text), capsys)
    assert rc == 2 and "resources.workers: Input should be less than or equal to 131072 " \
        "(got <a number of 20000 bits>;" in err, err


# ---- degree search -------------------------------------------------------------------------

@settings(max_examples=200, deadline=500)
@given(st.integers(1, 5_000), st.one_of(st.none(), st.integers(1, 6_000)))
def test_divisors_match_trial_division(n, at_most):
    expect = [d for d in range(1, (at_most or n) + 1) if d <= n and n % d == 0]
    assert divisors(n, at_most) == expect


class Stage:
    name = "s"
    shard_degree = "auto"

    def __init__(self, seq_len, batch_size, ring, dp, ulysses):
        self.seq_len, self.batch_size = seq_len, batch_size
        self.ring_degree, self.data_parallel_degree, self.ulysses_degree = ring, dp, ulysses


def options_by_trial(stage: Stage, world: int) -> list[tuple[int, int]]:
    """degree_options' answer for 'auto' ring and dp, by trying every number up to the world."""
    u, positions = stage.ulysses_degree, world // stage.ulysses_degree
    rings = [x for x in range(1, positions + 1) if zigzag_problem(stage.seq_len, x, u) is None]
    return [(x, y) for x in rings for y in range(positions // x, 0, -1)
            if stage.batch_size % y == 0]


@settings(max_examples=200, deadline=500)
@given(st.sampled_from([1, 2, 6, 64, 96, 100, 1024, 3 * 2**10]), st.integers(1, 48),
       st.sampled_from([1, 2, 3, 4]), st.integers(4, 96))
def test_auto_degree_options_equal_the_trial_search(seq_len, batch, ulysses, world):
    stage = Stage(seq_len, batch, "auto", "auto", ulysses)
    expect = options_by_trial(stage, world)
    if not expect:
        return
    assert degree_options(stage, world, "resources.workers", strict=False) == expect


@pytest.mark.parametrize(("seq_len", "batch", "world"), [
    (2**24, 2**20, 2**17), (2**24 - 2, 720_720, 2**17), (3 * 5 * 7 * 11 * 13 * 2**8, 2**20, 2**17),
])
def test_degree_options_at_the_ceilings_are_fast(seq_len, batch, world):
    with timed() as took:
        options = degree_options(Stage(seq_len, batch, "auto", "auto", 1), world, "w", strict=False)
    assert options and took[0] < FAST


# ---- fuzzing: the only outcomes are a model or one SpecError --------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from([0, 1, -1, HUGE, "auto", "", ".inf", "full", 2**63]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def paths_of(doc: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths_of(v, (*prefix, i))
    return out


RUN_PATHS = paths_of(TINY)
CLUSTER_PATHS = paths_of(CLUSTER)


def mutated(doc: dict, paths: list[tuple]):
    return st.lists(st.tuples(st.sampled_from(paths), VALUES), min_size=1, max_size=4).map(
        lambda changes: _apply(doc, changes))


def _apply(doc: dict, changes) -> dict:
    out = copy.deepcopy(doc)
    for path, value in changes:
        node = out
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change replaced a parent
    return out


def load_text(text: str, loader):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return loader(path)
        except SpecError as e:
            assert e.lines and all(isinstance(line, str) and line for line in e.lines)
            return e


def run_loader(path: Path) -> RunSpec:
    return load_model(path, RunSpec)


FUZZ = settings(max_examples=100, deadline=2_000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(mutated(TINY, RUN_PATHS))
def test_fuzz_runspec_mutations(doc):
    result = load_text(yaml.safe_dump(doc, allow_unicode=True), run_loader)
    assert isinstance(result, (RunSpec, SpecError))


@FUZZ
@given(mutated(CLUSTER, CLUSTER_PATHS))
def test_fuzz_clusterspec_mutations(doc):
    result = load_text(yaml.safe_dump(doc, allow_unicode=True), load_cluster)
    assert isinstance(result, (ClusterSpec, SpecError))


YAMLISH = st.lists(st.sampled_from(
    ["a", ":", " ", "\n", "- ", "[", "]", "{", "}", ",", "&x ", "*x", "<<: ", "!!int ", "'",
     '"', "#", "|", ">", "1e999", ".nan", "0x", "9" * 50, "name: t", "stages:", "\t", "\u00e9",
     "? ", "---", "...", "%YAML 1.1\n", "!!python/object:os.system ", "&a [*a]"]),
    max_size=60).map("".join)


@FUZZ
@given(st.one_of(YAMLISH, st.text(max_size=200)))
def test_fuzz_yaml_text(text):
    for loader in (run_loader, load_cluster):
        result = load_text(text, loader)
        assert isinstance(result, (RunSpec, ClusterSpec, SpecError))


@settings(max_examples=100, deadline=2_000)
@given(VALUES)
def test_fuzz_validate_data_on_any_value(value):
    for model in (RunSpec, ClusterSpec):
        try:
            validate_data(value, model, source="x")
        except SpecError:
            pass


def test_the_fuzzers_reach_valid_specs():
    # the unmutated documents load, so the fuzzers explore around valid specs, not only errors
    assert isinstance(validate_data(TINY, RunSpec, source="x"), RunSpec)
    assert isinstance(build_cluster(copy.deepcopy(CLUSTER), source="x"), ClusterSpec)
    assert math.isfinite(validate_data(TINY, RunSpec, source="x").stage_theta(3))


def test_the_operator_refuses_every_count_at_10_to_12_fast():
    import datetime as dt

    from operators.decide import plan_reconcile

    doc = TINY
    for path in RUN_COUNTS:
        doc = with_value(doc, path, HUGE)
    st = {"apiVersion": "ringpilot.io/v1alpha1", "kind": "StagedTraining",
          "metadata": {"name": "tiny", "namespace": "default", "generation": 1, "uid": "u1"},
          "spec": doc}
    with timed() as took:
        decision = plan_reconcile(st, [], [], dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    assert took[0] < FAST
    status = decision.status
    assert status.phase == "Failed"
    message = next(c.message for c in status.conditions if c.type == "SpecValid")
    assert "spec.model.num_attention_heads: Input should be less than or equal to 16384" in message
    assert "spec.resources.workers: Input should be less than or equal to 131072" in message


@pytest.mark.parametrize("name", ["alias bomb", "20,000-deep flow nesting", "empty tagged integer"])
def test_the_operator_reads_a_topology_config_map_with_the_same_limits(name):
    from operators.replan import plan_topology
    from operators.resource import StagedTrainingSpec

    spec = StagedTrainingSpec.model_validate(
        {**TINY, "topology": {"source": "config-map", "config_map": "topo"}})
    with timed() as took:
        problem = plan_topology(spec, BAD_YAML[name][0])
    assert took[0] < FAST
    assert problem is not None and problem.startswith("ConfigMap topo: <yaml>: "), problem
    assert re.search(BAD_YAML[name][1], problem), problem
    assert plan_topology(spec, yaml.safe_dump(CLUSTER)) is None


def test_the_train_command_refuses_a_bad_spec_before_importing_torch_or_ray(tmp_path):
    """`python -m ray_jobs.train` checks the spec first: the refusal costs an interpreter's
    start, not torch's and Ray's imports (seconds), and prints the one message."""
    spec = write(tmp_path, with_value(TINY, RUN_COUNTS[0], HUGE))
    probe = ("import json, runpy, sys\n"
             f"sys.argv = ['ray_jobs.train', '--run', {str(spec)!r}]\n"
             "try:\n    runpy.run_module('ray_jobs.train', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules,"
             " 'ray': 'ray' in sys.modules}))\n")
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert json.loads(got.stdout.splitlines()[-1]) == {"code": 2, "torch": False, "ray": False}
    assert f"  {dotted(RUN_COUNTS[0])}: " in got.stderr and "Traceback" not in got.stderr
