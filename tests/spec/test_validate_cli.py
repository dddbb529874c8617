"""`ringpilot validate`: summary and exit 0, or field-level lines and exit 2 — never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ringpilot.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY_TEXT = (ROOT / "configs" / "tiny.yaml").read_text()
TINY = yaml.safe_load(TINY_TEXT)
# `path.to.field: problem`, where a path is dotted names and [i] indices, or <file>/<yaml>/<top>.
SEGMENT = r'([A-Za-z_]\w*|\[\d+\]|\["(?:[^"\\]|\\.)*"\])'
ERROR_LINE = re.compile(rf"^  (<file>|<yaml>|<top>|{SEGMENT}(\.?{SEGMENT})*): \S.*$")


def validate(tmp_path: Path, text: str, capsys) -> tuple[int, str, str]:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    rc = main(["validate", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_field_errors(err: str) -> None:
    head, *lines = err.rstrip("\n").split("\n")
    assert re.match(r"^.+: \d+ problems?$", head), head
    assert lines, err
    for line in lines:
        assert ERROR_LINE.match(line), line


def test_valid_run_prints_a_summary(tmp_path, capsys):
    rc, out, err = validate(tmp_path, TINY_TEXT, capsys)
    assert rc == 0 and err == ""
    assert "run tiny:" in out and "s4k" in out and "9,805,975" in out  # auto theta of stage 4


@pytest.mark.parametrize(
    "text, expected",
    [
        # PyYAML's wording, or libyaml's where PyYAML is built with it
        ("name: [\n", r"<yaml>: line 2, column 1: (did not find )?expected (the )?node content"),
        ("- just\n- a list\n", r"<top>: expected a mapping of fields \(got \['just', 'a list'\]"),
        ("", r"<top>: expected a mapping of fields \(got None"),
        (TINY_TEXT.replace("seq_len: 4096", "seq_len: 4095"),
         r"stages\[3\]: seq_len \(4095\) must be divisible by 2 x ring_degree \(4\)"),
        (TINY_TEXT + "extra_section: 1\n",
         r"extra_section: unknown field \(got 1; allowed: name, "),
    ],
)
def test_user_mistakes_exit_2_with_field_lines(tmp_path, capsys, text, expected):
    rc, out, err = validate(tmp_path, text, capsys)
    assert rc == 2 and out == ""
    assert_field_errors(err)
    assert re.search(expected, err), err


def test_missing_file_and_directory(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "<file>: not found (check the path" in capsys.readouterr().err
    assert main(["validate", str(tmp_path)]) == 2
    assert "<file>: is a directory" in capsys.readouterr().err


def test_nothing_to_validate_is_a_usage_error(capsys):
    assert main(["validate"]) == 2
    assert "give a RunSpec file, --cluster FILE, or both" in capsys.readouterr().err


def test_console_command_has_no_traceback_for_bad_input(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: 3\n")
    proc = subprocess.run([sys.executable, "-m", "ringpilot.cli", "validate", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model: Input should be a valid dictionary" in proc.stderr


# --- property: random and mutated YAML only ever gives a valid spec or exit 2 with field lines ---

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["auto", "cpu", "gpu", "bfloat16", "niah_lite", "s256"]),
)
values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=8)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


CLUSTER_TEXT = (ROOT / "configs" / "clusters" / "l40s-2node-leaf.yaml").read_text()
CLUSTER = yaml.safe_load(CLUSTER_TEXT)


@st.composite
def mutated(draw, base):
    import copy
    data = copy.deepcopy(base)
    all_paths = [p for p in _paths(base) if p]
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(all_paths))
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            key = path[-1]
            parent[key]  # the path may have been removed by an earlier mutation
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add_unknown", "tweak_number"]))
        if action == "replace":
            parent[key] = draw(values)
        elif action == "delete":
            del parent[key]
        elif action == "add_unknown" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
        elif action == "tweak_number" and isinstance(parent[key], (int, float)) \
                and not isinstance(parent[key], bool):
            parent[key] = parent[key] * draw(st.sampled_from([-1, 0, 3, 0.5, 1000]))
    return yaml.safe_dump(data, sort_keys=False)


random_text = st.one_of(
    st.text(max_size=200),
    st.builds(lambda v: yaml.safe_dump(v), values),
    st.builds(lambda base, cut: base[:cut], st.just(TINY_TEXT), st.integers(0, len(TINY_TEXT))),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(mutated(TINY), random_text))
def test_random_and_mutated_yaml_is_valid_or_field_errors(tmp_path, capsys, text):
    rc, out, err = validate(tmp_path, text, capsys)
    event(f"exit {rc}")
    if rc == 0:
        assert out.startswith("run ") and err == ""
    else:
        assert rc == 2, (rc, err)
        assert_field_errors(err)


def test_cluster_file_is_validated_alone_and_through_the_run(tmp_path, capsys):
    good = ROOT / "configs" / "clusters" / "l40s-2node-leaf.yaml"
    assert main(["validate", "--cluster", str(good)]) == 0
    assert capsys.readouterr().out.startswith("cluster l40s-2node-leaf: 2 nodes, 16 GPUs")
    # A run naming its cluster validates both; a broken cluster fails the command.
    (tmp_path / "c.yaml").write_text(CLUSTER_TEXT.replace("name: l40s-2node-leaf", "nmae: x"))
    run = tmp_path / "run.yaml"
    run.write_text(TINY_TEXT.replace("  cpus_per_worker: 1\n",
                                     "  cpus_per_worker: 1\n  cluster: c.yaml\n"))
    assert main(["validate", str(run)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("run tiny:")
    assert ("c.yaml: 2 problems" in err
            and "nmae: unknown field (got 'x'; did you mean 'name'?)" in err)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated(CLUSTER))
def test_mutated_cluster_yaml_is_valid_or_field_errors(tmp_path, capsys, text):
    path = tmp_path / "cluster.yaml"
    path.write_text(text, encoding="utf-8")
    rc = main(["validate", "--cluster", str(path)])
    out, err = capsys.readouterr()
    event(f"exit {rc}")
    if rc == 0:
        assert out.startswith("cluster ") and err == ""
    else:
        assert rc == 2, (rc, err)
        assert_field_errors(err)
