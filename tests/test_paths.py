"""Paths never leave their run, and readers never trace back (issue 34, classes 3 and 5).

A tampered ledger, results file or trainer state names `.`, `..`, an absolute path or a symlink
out of the run: each is refused with one clear error, and nothing outside the run is read,
written or deleted. Fuzzing the readers: the only outcomes are a valid object or that error.
"""

import json
import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_jobs.eval.results import EvalResults, ResultsError, load_results
from ray_jobs.train.checkpoint import prune_checkpoints
from ringpilot.cli import main as ringpilot
from specs.checkpoint import (
    CheckpointError,
    TrainerState,
    checkpoint_dir,
    eval_dir,
    read_state,
    stage_dir,
)
from specs.ledger import COMMITTED, EvalEntry, Ledger, LedgerDoc, LedgerError, mark_committed
from specs.names import UnsafePath, check_name, check_relative, contained

FUZZ = settings(max_examples=150, deadline=1000,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
BAD_NAMES = [".", "..", "", "/abs", "a/b", "..\\x", ".hidden", "x\n---", "a" * 129, "a\0b",
             "-flag", " s"]
BAD_PATHS = [".", "..", "/abs", "/etc/passwd", "checkpoints/../..", "checkpoints/./s",
             "checkpoints//s", "checkpoints/s/", "../other/checkpoints/s/step-000001",
             "checkpoints\\..\\..", "a" * 129]


def _ledger_with(run_dir, *, stage="s", path="checkpoints/s/step-000001", eval_key=None):
    doc = {"run": "r", "stages": {stage: {"checkpoints": [
        {"step": 1, "path": path, "committed_at": "2026-01-01T00:00:00+00:00"}]}}}
    if eval_key is not None:
        doc["stages"][stage]["eval"] = {eval_key: {"status": "done"}}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ledger.json").write_text(json.dumps(doc))
    return Ledger(run_dir)


def _committed(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    mark_committed(path)
    return path


@pytest.fixture
def sentinel(tmp_path):
    """A file outside the run directory that must survive whatever the run does."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / COMMITTED).write_text("not yours\n")
    (precious / "data.txt").write_text("keep me\n")
    yield precious
    assert (precious / "data.txt").read_text() == "keep me\n"
    assert (precious / COMMITTED).read_text() == "not yours\n"


# ---- the validator ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["s1k", "niah_lite", "step-000050", "a", "A.b_c-9", "a" * 128])
def test_simple_names_pass(name):
    assert check_name(name, "stage") == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_are_not_one_plain_component_are_refused(name):
    with pytest.raises(UnsafePath, match=r"^stage: not a simple name \(got "):
        check_name(name, "stage")


@pytest.mark.parametrize("path", BAD_PATHS)
def test_relative_paths_with_dots_empty_parts_or_roots_are_refused(path):
    with pytest.raises(UnsafePath, match="not a (relative path|path inside the run directory)"):
        check_relative(path, "path")


def test_contained_follows_symlinks(tmp_path, sentinel):
    run = tmp_path / "run"
    run.mkdir()
    (run / "link").symlink_to(sentinel)
    with pytest.raises(UnsafePath, match="'link/data.txt' leads to .*outside the run directory"):
        contained(run, "link/data.txt", "results")
    (run / "loop").symlink_to(run / "loop")
    with pytest.raises(UnsafePath, match="'loop' (cannot be resolved|leads to)"):
        contained(run, "loop", "results")
    assert contained(run, "eval/x", "results") == run / "eval/x"


# ---- tampered ledgers -------------------------------------------------------------------------

@pytest.mark.parametrize("stage", BAD_NAMES[:9])
def test_a_ledger_stage_name_that_is_not_a_simple_name_is_refused(tmp_path, stage):
    ledger = _ledger_with(tmp_path / "run", stage=stage)
    with pytest.raises(LedgerError, match=r"not a valid run ledger: stages: .*not a simple name"):
        ledger.read()


@pytest.mark.parametrize("path", BAD_PATHS)
def test_a_ledger_checkpoint_path_outside_the_run_is_refused(tmp_path, path):
    ledger = _ledger_with(tmp_path / "run", path=path)
    with pytest.raises(LedgerError, match=r"stages\.s\.checkpoints\.0\.path: .*(not a path "
                                          r"inside the run directory|not a relative path)"):
        ledger.read()


@pytest.mark.parametrize("key", [".", "..", "/abs", "../x"])
def test_a_ledger_eval_key_outside_the_run_is_refused(tmp_path, key):
    ledger = _ledger_with(tmp_path / "run", eval_key=key)
    with pytest.raises(LedgerError, match=r"stages\.s\.eval: .*eval key"):
        ledger.read()


def test_a_ledger_cannot_be_written_with_a_stage_name_it_would_refuse(tmp_path):
    ledger = Ledger(tmp_path / "run")
    with pytest.raises(UnsafePath, match="stage name: not a simple name"):
        ledger.start_stage("../escape")
    assert not (tmp_path / "run" / "ledger.json").exists()


def test_pruning_a_dot_entry_deletes_nothing(tmp_path, sentinel):
    run = tmp_path / "run"
    ledger = _ledger_with(run, path=".")
    before = (run / "ledger.json").read_text()
    with pytest.raises(LedgerError, match="not a path inside the run directory"):
        prune_checkpoints(ledger, "s", keep_last=0)
    assert run.is_dir() and (run / "ledger.json").read_text() == before


@pytest.mark.parametrize("entry", ["checkpoints", "checkpoints/s", "checkpoints/other/step-000001",
                                   "checkpoints/s/notastep", "checkpoints/s/step-000001/dcp"])
def test_pruning_keeps_what_is_not_a_checkpoint_of_the_stage(tmp_path, caplog, entry):
    """An entry inside the run but not a checkpoint directory of this stage: logged and kept,
    both its files and its ledger entry."""
    run = tmp_path / "run"
    ledger = Ledger(run, "r")
    real = _committed(checkpoint_dir(run, "s", 1))
    (real / "dcp").mkdir()
    mark_committed(real / "dcp")
    _committed(checkpoint_dir(run, "other", 1))
    (stage_dir(run, "s") / "notastep").mkdir()
    mark_committed(stage_dir(run, "s") / "notastep")
    ledger.commit_checkpoint("s", 2, _committed(checkpoint_dir(run, "s", 2)))
    doc = json.loads((run / "ledger.json").read_text())
    doc["stages"]["s"]["checkpoints"].insert(0, {"step": 0, "path": entry,
                                                 "committed_at": "2026-01-01T00:00:00+00:00"})
    (run / "ledger.json").write_text(json.dumps(doc))
    files_before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with caplog.at_level(logging.WARNING):
        assert prune_checkpoints(ledger, "s", keep_last=1) == []
    assert f"not pruning {run / entry}" in caplog.text
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files_before
    assert [c.path for c in ledger.read().stages["s"].checkpoints][0] == entry


def test_pruning_keeps_a_checkpoint_without_its_marker_and_deletes_a_committed_one(tmp_path):
    run = tmp_path / "run"
    ledger = Ledger(run, "r")
    for step in (1, 2, 3):
        ledger.commit_checkpoint("s", step, _committed(checkpoint_dir(run, "s", step)))
    (checkpoint_dir(run, "s", 1) / COMMITTED).unlink()
    assert prune_checkpoints(ledger, "s", keep_last=1) == ["checkpoints/s/step-000002"]
    assert checkpoint_dir(run, "s", 1).is_dir() and not checkpoint_dir(run, "s", 2).exists()
    assert [c.step for c in ledger.read().stages["s"].checkpoints] == [1, 3]


def test_pruning_refuses_a_checkpoint_that_is_a_symlink_out_of_the_run(tmp_path, sentinel):
    run = tmp_path / "run"
    ledger = Ledger(run, "r")
    for step in (1, 2):
        ledger.commit_checkpoint("s", step, _committed(checkpoint_dir(run, "s", step)))
    first = checkpoint_dir(run, "s", 1)
    for f in first.iterdir():
        f.unlink()
    first.rmdir()
    first.symlink_to(sentinel)
    with pytest.raises(LedgerError, match="outside the run directory"):
        prune_checkpoints(ledger, "s", keep_last=1)
    assert first.is_symlink()


def test_pruning_keeps_a_symlink_to_a_checkpoint_inside_the_run(tmp_path):
    run = tmp_path / "run"
    ledger = Ledger(run, "r")
    for step in (1, 2):
        ledger.commit_checkpoint("s", step, _committed(checkpoint_dir(run, "s", step)))
    target = _committed(run / "elsewhere" / "step-000001")
    first = checkpoint_dir(run, "s", 1)
    for f in first.iterdir():
        f.unlink()
    first.rmdir()
    first.symlink_to(target)
    assert prune_checkpoints(ledger, "s", keep_last=1) == []
    assert (target / COMMITTED).is_file() and first.is_symlink()


def test_a_symlinked_ledger_is_refused(tmp_path, sentinel):
    run = tmp_path / "run"
    run.mkdir()
    (sentinel / "ledger.json").write_text(json.dumps({"run": "r"}))
    (run / "ledger.json").symlink_to(sentinel / "ledger.json")
    with pytest.raises(LedgerError, match="is a symlink"):
        Ledger(run).read()
    (sentinel / "ledger.json").unlink()


@pytest.mark.parametrize("content", [b'{"run": "r", "stages": {"s": {"checkpo', b"\xff\xfe\x00x",
                                     b"[]", b"", b"{" * 50_000])
def test_a_truncated_or_binary_ledger_is_one_clear_error(tmp_path, content):
    (tmp_path / "ledger.json").write_bytes(content)
    with pytest.raises(LedgerError, match=r"ledger\.json: (not a valid run ledger|cannot read)"):
        Ledger(tmp_path).read()


# ---- the trainer state and checkpoint layout --------------------------------------------------

def _state_file(tmp_path, content: bytes):
    (tmp_path / "trainer_state").mkdir()
    (tmp_path / "trainer_state" / "state.json").write_bytes(content)
    return tmp_path


@pytest.mark.parametrize("content", [b'{"stage": "s", "stage_ind', b"\x80\x81", b"[" * 100_000,
                                     b'{"stage": "../x", "stage_index": 0, "step": 1}',
                                     b'{"stage": "s", "stage_index": 0, "step": 1, '
                                     b'"init_from": "/etc"}'])
def test_a_damaged_or_tampered_trainer_state_is_one_clear_error(tmp_path, content):
    with pytest.raises(CheckpointError, match=r"state\.json: (cannot read|not a trainer state)"):
        read_state(_state_file(tmp_path, content))


@pytest.mark.parametrize("stage", ["..", ".", "a/b", "/etc"])
def test_layout_paths_are_never_built_from_an_unsafe_stage(tmp_path, stage):
    for build in (lambda: stage_dir(tmp_path, stage), lambda: checkpoint_dir(tmp_path, stage, 1),
                  lambda: eval_dir(tmp_path, stage, 1)):
        with pytest.raises(UnsafePath, match="stage: not a simple name"):
            build()
    with pytest.raises(ValueError, match="stage"):
        TrainerState(stage=stage, stage_index=0, step=0)


# ---- evaluation results and `eval report` -----------------------------------------------------

def _results(**over) -> dict:
    doc = {"checkpoint": "checkpoints/s/step-000001", "stage": "s", "step": 1,
           "tasks": ["niah_lite"], "lengths": [256], "depths": [0.0], "samples": 1, "seed": 0,
           "max_length": 1024, "started_unix": 0.0, "scores": {"niah_lite": 1.0}}
    return {**doc, **over}


def _evaluated_run(tmp_path, results: bytes | None = None):
    run = tmp_path / "run"
    out = eval_dir(run, "s", 1)
    out.mkdir(parents=True)
    (out / "results.json").write_bytes(results if results is not None
                                       else json.dumps(_results()).encode())
    Ledger(run).record_eval("s", "checkpoints/s/step-000001", EvalEntry(
        status="done", scores={"niah_lite": 1.0},
        results=os.path.relpath(out / "results.json", run)))
    return run, out


@pytest.mark.parametrize("content", [json.dumps(_results()).encode()[:60], b"\x89PNG\r\n\x1a\n\xff",
                                     b"null", json.dumps(_results(tasks=["../x"])).encode(),
                                     json.dumps(_results(files={"h": "../../x.png"})).encode()])
def test_eval_report_on_a_truncated_binary_or_tampered_results_file_exits_2_in_one_line(
        tmp_path, capsys, content):
    run, _ = _evaluated_run(tmp_path, content)
    assert ringpilot(["eval", "report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "results.json" in err and "Traceback" not in err
    assert not (run / "eval" / "report.md").exists()


@pytest.mark.parametrize("content", [b'{"run": "r", "stages": {"s"', b"\x00\xff" * 10,
                                     json.dumps({"run": "r", "stages": {"..": {}}}).encode()])
def test_eval_report_on_a_truncated_binary_or_tampered_ledger_exits_2_in_one_line(
        tmp_path, capsys, content):
    run, _ = _evaluated_run(tmp_path)
    (run / "ledger.json").write_bytes(content)
    assert ringpilot(["eval", "report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "ledger.json" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_eval_report_does_not_follow_a_symlinked_results_file(tmp_path, capsys, sentinel, where):
    run, out = _evaluated_run(tmp_path)
    target = (sentinel if where == "outside" else run) / "other.json"
    target.write_text(json.dumps(_results()))
    (out / "results.json").unlink()
    (out / "results.json").symlink_to(target)
    assert ringpilot(["eval", "report", str(run)]) == 2
    assert ("outside the run directory" if where == "outside" else "is a symlink"
            ) in capsys.readouterr().err
    target.unlink()


def test_eval_report_refuses_a_results_path_through_a_symlinked_folder(tmp_path, capsys,
                                                                      sentinel):
    run, out = _evaluated_run(tmp_path)
    (sentinel / "results.json").write_text(json.dumps(_results()))
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    out.symlink_to(sentinel)
    assert ringpilot(["eval", "report", str(run)]) == 2
    assert "outside the run directory" in capsys.readouterr().err
    (sentinel / "results.json").unlink()


def test_eval_report_never_writes_through_a_symlinked_report_folder(tmp_path, capsys, sentinel):
    run, out = _evaluated_run(tmp_path)
    # eval/ itself leads out of the run: its results are then outside too, and refused
    (run / "eval").rename(tmp_path / "moved")
    (run / "eval").symlink_to(sentinel)
    assert ringpilot(["eval", "report", str(run)]) == 2
    assert "outside the run directory" in capsys.readouterr().err
    assert sorted(p.name for p in sentinel.iterdir()) == [COMMITTED, "data.txt"]


def test_eval_report_replaces_a_symlinked_plot_instead_of_writing_through_it(tmp_path, sentinel):
    run, _ = _evaluated_run(tmp_path)
    (run / "eval" / "score_vs_step_niah_lite.png").symlink_to(sentinel / "data.txt")
    assert ringpilot(["eval", "report", str(run)]) == 0
    plot = run / "eval" / "score_vs_step_niah_lite.png"
    assert not plot.is_symlink() and plot.read_bytes()[:4] == b"\x89PNG"


# ---- fuzzing the readers ----------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
_stage_key = st.sampled_from(["s", "s1k", ".", "..", "/abs", "a/b", ""]) | st.text(max_size=6)
_path_val = st.sampled_from(["checkpoints/s/step-000001", ".", "..", "/x", "a/../b", "a//b"]) \
    | st.text(max_size=12)
_ledgerish = st.fixed_dictionaries({"run": st.text(max_size=5)}, optional={
    "stages": st.dictionaries(_stage_key, st.fixed_dictionaries({}, optional={
        "state": st.sampled_from(["pending", "done", "bogus"]),
        "checkpoints": st.lists(st.fixed_dictionaries(
            {"step": st.integers(-2, 5), "path": _path_val, "committed_at": st.just("t")}),
            max_size=3),
        "eval": st.dictionaries(_path_val, st.fixed_dictionaries(
            {"status": st.sampled_from(["done", "x"])}), max_size=2)}), max_size=3),
    "epoch": st.integers(-1, 3) | st.text(max_size=2)})


def _read_ledger_bytes(tmp_path, data: bytes):
    (tmp_path / "ledger.json").write_bytes(data)
    try:
        doc = Ledger(tmp_path).read()
    except LedgerError as e:
        assert str(e).startswith(str(tmp_path / "ledger.json") + ": ")
        assert "\n" not in str(e)
        return None
    assert isinstance(doc, LedgerDoc)
    for name, entry in doc.stages.items():  # what was accepted is safe to build paths from
        check_name(name, "stage")
        for c in entry.checkpoints:
            contained(tmp_path, check_relative(c.path, "path"), "path")
    return doc


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_ledger_reader_on_random_bytes(tmp_path, data):
    _read_ledger_bytes(tmp_path, data)


@FUZZ
@given(doc=_ledgerish | _json)
def test_fuzz_ledger_reader_on_random_json(tmp_path, doc):
    _read_ledger_bytes(tmp_path, json.dumps(doc).encode())


def _read_results_bytes(tmp_path, data: bytes):
    path = tmp_path / "results.json"
    path.write_bytes(data)
    try:
        res = load_results(path)
    except ResultsError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        return None
    assert isinstance(res, EvalResults)
    for task in [*res.tasks, *(key.partition("@")[0] for key in res.scores)]:
        check_name(task, "task")
    return res


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_results_reader_on_random_bytes(tmp_path, data):
    _read_results_bytes(tmp_path, data)


@FUZZ
@given(over=st.dictionaries(st.sampled_from(["tasks", "scores", "files", "samples", "stage",
                                             "checkpoint", "cells", "bogus"]), _json, max_size=3),
       cut=st.integers(0, 400) | st.none())
def test_fuzz_results_reader_on_random_json(tmp_path, over, cut):
    data = json.dumps(_results(**over)).encode()
    _read_results_bytes(tmp_path, data if cut is None else data[:cut])


def test_a_valid_results_file_reads_back(tmp_path):
    assert _read_results_bytes(tmp_path, json.dumps(_results()).encode()).scores == {
        "niah_lite": 1.0}


def test_rulers_score_per_length_reads_back_and_a_path_in_its_place_does_not(tmp_path):
    """RULER's mean per length is stored as `ruler@<length>` (what every RULER evaluation
    writes); a key that would make the report's plot name a path is still refused."""
    doc = _results(scores={"niah_lite": 1.0, "ruler@4096": 0.25})
    assert _read_results_bytes(tmp_path, json.dumps(doc).encode()).scores["ruler@4096"] == 0.25
    for key in ("ruler@../x", "ruler@", "../x@4096", "ruler@4096@1"):
        bad = _results(scores={key: 0.5})
        assert _read_results_bytes(tmp_path, json.dumps(bad).encode()) is None, key


# ---- evaluation folders, the standalone evaluator, Ray Train's pointer ------------------------

def _request(run, **over):
    from ray_jobs.eval.pipeline import EvalRequest

    fields = dict(stage="s", checkpoint="checkpoints/s/step-000001", step=1, run_dir=run,
                  attempt=1, tasks=("niah_lite",), lengths=(256,), depths=(0.0,), samples=1,
                  seed=0, gpus=0.0, max_length=1024,
                  rope={"rope_type": "default", "rope_theta": 10000.0})
    return EvalRequest(**{**fields, **over})


def test_an_evaluation_folder_is_built_from_a_simple_stage_and_stays_in_the_run(tmp_path,
                                                                               sentinel):
    run = tmp_path / "run"
    run.mkdir()
    assert _request(run).out_dir == run / "eval" / "s" / "step-000001"
    with pytest.raises(UnsafePath, match="stage: not a simple name"):
        _request(run, stage="..").out_dir
    (run / "eval").symlink_to(sentinel)
    with pytest.raises(LedgerError, match="evaluation folder of stage 's'.*outside the run"):
        _request(run).out_dir


@pytest.mark.parametrize("config", [b"\xff\xfe", b'{"rope_theta": ', b"[1, 2]",
                                    b'{"rope_theta": "lots"}', b'{"rope_parameters": 7}'])
def test_a_damaged_checkpoint_config_is_the_evaluation_error_not_a_traceback(tmp_path, config):
    from ray_jobs.eval.pipeline import check_stage_rope

    run = tmp_path / "run"
    ckpt = checkpoint_dir(run, "s", 1)
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_bytes(config)
    with pytest.raises(CheckpointError, match="config.json .* but stage 's' trains with "
                       "rope_theta 10000.0"):
        check_stage_rope(_request(run))
    assert "config.json" in load_results(
        eval_dir(run, "s", 1) / "results.json").error


def test_the_evaluator_refuses_a_checkpoint_whose_stage_folder_is_not_a_name(tmp_path, capsys):
    from ray_jobs.eval.cli import main as evaluate_main

    ckpt = tmp_path / "run" / "checkpoints" / "my stage" / "step-000001"
    ckpt.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json"):
        (ckpt / f).write_text("{}")
    assert evaluate_main(["--checkpoint", str(ckpt)]) == 2
    assert "stage: not a simple name (got 'my stage'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "eval").exists()


@pytest.mark.parametrize("content", [b'{"path": "../../x"}', b'{"path": "/etc"}', b'{"path": 3}',
                                     b"{}", b"[]", b'{"pa', b"\xff"])
def test_a_damaged_or_tampered_ray_pointer_is_one_clear_error(tmp_path, content):
    from specs.checkpoint import read_pointer

    (tmp_path / "pointer.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"pointer\.json: not a checkpoint pointer \("):
        read_pointer(tmp_path / "pointer.json")
    (tmp_path / "pointer.json").write_text('{"path": "checkpoints/s/step-000001", "step": 1}')
    assert read_pointer(tmp_path / "pointer.json") == "checkpoints/s/step-000001"


@pytest.mark.parametrize("planted", [".ledger.lock", "metrics.jsonl"])
def test_a_symlink_planted_in_the_run_is_never_written_through(tmp_path, sentinel, planted):
    run = tmp_path / "run"
    run.mkdir()
    (run / planted).symlink_to(sentinel / "data.txt")
    ledger = Ledger(run)
    with pytest.raises(LedgerError, match=f"{planted}: is a symlink"):
        if planted == ".ledger.lock":
            ledger.start_stage("s")
        else:
            ledger.append_line(run / planted, {"step": 1})


@FUZZ
@given(data=st.binary(max_size=200) | _json.map(lambda d: json.dumps(d).encode())
       | st.fixed_dictionaries({"stage": _stage_key, "stage_index": st.integers(-1, 2),
                                "step": st.integers(-1, 2)},
                               optional={"init_from": _path_val}).map(
                                   lambda d: json.dumps(d).encode()))
def test_fuzz_trainer_state_reader(tmp_path, data):
    path = tmp_path / "trainer_state" / "state.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    try:
        state = read_state(tmp_path)
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        return
    check_name(state.stage, "stage")
    assert state.init_from is None or check_relative(state.init_from, "init_from")


def test_an_oversized_ledger_or_results_file_is_refused_unread(tmp_path, monkeypatch, capsys):
    import specs.files

    run, out = _evaluated_run(tmp_path)
    monkeypatch.setitem(specs.files.LIMITS, "results", 64)
    assert ringpilot(["eval", "report", str(run)]) == 2
    assert "results.json" in (err := capsys.readouterr().err) and "larger than the" in err
    monkeypatch.setitem(specs.files.LIMITS, "ledger", 64)
    with pytest.raises(LedgerError, match="cannot read the run ledger .*larger than"):
        Ledger(run).read()


def test_a_hostile_key_is_shown_quoted_and_the_error_stays_one_line(tmp_path):
    """Found by the fuzzer: a key with a newline broke the one-line error that named it."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results(scores={"\n": None})))
    with pytest.raises(ResultsError, match=r"results\.json: not an evaluation results file: "
                                           r"scores\.'\\n': ") as e:
        load_results(path)
    assert "\n" not in str(e.value)
    (tmp_path / "ledger.json").write_text(json.dumps({"run": "r", "stages": {"a.b\0": {}}}))
    with pytest.raises(LedgerError) as e:
        Ledger(tmp_path).read()
    assert "\0" not in str(e.value) and "\n" not in str(e.value)


def test_a_fifo_in_place_of_a_ledger_or_results_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "ledger.json")
    with pytest.raises(LedgerError, match="not a regular file"):
        Ledger(tmp_path).read()
    os.mkfifo(tmp_path / "results.json")
    with pytest.raises(ResultsError, match="not a regular file"):
        load_results(tmp_path / "results.json")
    (tmp_path / "trainer_state").mkdir()
    os.mkfifo(tmp_path / "trainer_state" / "state.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_state(tmp_path)


@pytest.mark.parametrize("linked", ["checkpoints", "checkpoints/s"])
def test_a_checkpoint_is_never_written_through_a_symlinked_folder(tmp_path, sentinel, linked):
    from ray_jobs.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    (run / linked).parent.mkdir(parents=True, exist_ok=True)
    (run / linked).symlink_to(sentinel)
    state = TrainerState(stage="s", stage_index=0, step=1)
    with pytest.raises(LedgerError, match="the checkpoint folder: .*outside the run directory"):
        save_checkpoint(Ledger(run), None, None, None, None, state, keep_last=1, final=False)
    assert sorted(p.name for p in sentinel.iterdir()) == [COMMITTED, "data.txt"]
