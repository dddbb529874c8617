"""One writer per run: a superseded driver attempt writes nothing; paths stay inside the run;
a broken ledger is an error, never reset."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import pytest

from ray_jobs.train.checkpoint import clear_stale_staging, prune_checkpoints
from ray_jobs.train.driver import main
from specs.checkpoint import STATE_DIR, checkpoint_dir, stage_dir, staging_dir
from specs.ledger import COMMITTED, Fenced, Ledger, LedgerError, contained, mark_committed
from tests.support.worlds import run_world
from tests.train import parallel_worlds as worlds
from tests.train.conftest import mini_spec, write_spec


def _committed(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text("weights")
    mark_committed(path)
    return path


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".ledger.lock"}


def test_each_driver_attempt_takes_the_next_epoch(tmp_path):
    first = Ledger(tmp_path, "r").begin_attempt()
    second = Ledger(tmp_path, "r").begin_attempt()
    assert (first.epoch, second.epoch) == (1, 2)
    doc = Ledger(tmp_path).read()
    assert doc.epoch == 2 and f"pid {os.getpid()}" in doc.holder


def test_a_superseded_attempt_writes_nothing(tmp_path):
    old = Ledger(tmp_path, "r").begin_attempt()
    old.start_stage("s64")
    kept = _committed(checkpoint_dir(tmp_path, "s64", 2))
    old.commit_checkpoint("s64", 2, kept)
    old.commit_checkpoint("s64", 3, _committed(checkpoint_dir(tmp_path, "s64", 3)))
    new = Ledger(tmp_path, "r").begin_attempt()
    # the old attempt's straggler has a checkpoint written and marked in its staging dir
    target = checkpoint_dir(tmp_path, "s64", 4)
    staged = _committed(staging_dir(target, old.epoch))
    before = _snapshot(tmp_path)

    stale_writes = {
        "ledger update": lambda: old.finish_stage("s64", "done"),
        "checkpoint commit": lambda: old.commit_checkpoint("s64", 4, target, staged=staged),
        "start record": lambda: old.record_start("s64", 4),
        "metrics line": lambda: old.append_line(tmp_path / "metrics" / "s64.jsonl", {"step": 4}),
        "prune": lambda: prune_checkpoints(old, "s64", keep_last=1),
    }
    for what, write in stale_writes.items():
        with pytest.raises(Fenced, match="driver attempt 1 was superseded by attempt 2"):
            write()
        assert _snapshot(tmp_path) == before, f"the stale {what} changed the run"
    assert not target.exists() and kept.is_dir()

    new.commit_checkpoint("s64", 4, target, staged=_committed(staging_dir(target, new.epoch)))
    assert [c.epoch for c in Ledger(tmp_path).read().stages["s64"].checkpoints] == [1, 1, 2]
    err = pickle.loads(pickle.dumps(Fenced(1, 2, "host pid 7")))  # crosses ranks and Ray
    assert (err.mine, err.current, err.holder) == (1, 2, "host pid 7")


def _take_over(run_dir: str, ready, go) -> None:
    ready.set()
    go.wait(10)
    Ledger(run_dir, "r").begin_attempt()


def test_a_takeover_waits_for_a_write_in_progress_and_then_fences_the_next(tmp_path):
    """The check and the write are one step under the lock: a new attempt taking the run while
    an old writer is inside `fenced()` waits for it, and the old writer's next write fails."""
    old = Ledger(tmp_path, "r").begin_attempt()
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_take_over, args=(str(tmp_path), ready, go))
    proc.start()
    ready.wait(10)
    with old.fenced():
        go.set()
        proc.join(0.5)
        assert proc.is_alive()  # blocked on the lock while the old writer writes
        (tmp_path / "inside.txt").write_text("written while the run was still ours")
    proc.join(20)
    assert proc.exitcode == 0
    with pytest.raises(Fenced):
        old.append_line(tmp_path / "metrics.jsonl", {"late": True})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_staging_of_older_attempts_is_cleared_never_a_newer_ones(tmp_path):
    staged = stage_dir(tmp_path, "s64")
    names = [".step-000004.epoch-1", ".step-000006.epoch-2", ".step-000004.epoch-2",
             ".step-000006.epoch-3"]
    for n in names:
        (staged / n).mkdir(parents=True)
    clear_stale_staging(staged, 2, "step-000004")
    assert sorted(p.name for p in staged.iterdir()) == [".step-000006.epoch-2",
                                                        ".step-000006.epoch-3"]


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_worker_group_of_a_superseded_attempt_stops_at_its_checkpoint(tmp_path, when):
    """save_checkpoint over two gloo ranks: the newer attempt takes the run before the old
    one's checkpoint starts, or while it is written; both old ranks raise Fenced and nothing
    of the checkpoint is left behind."""
    got = run_world(2, worlds.stale_checkpoint_refused, str(tmp_path), when, timeout_s=120)
    fenced = "driver attempt 1 was superseded by attempt 2"
    assert [g["fenced"] for g in got] == [fenced, fenced]
    if when == "during":  # refused at the commit, with every file written (no export: not final)
        assert {"config.json", "tokenizer.json", "dcp", STATE_DIR} <= set(got[0]["staged"][0])
    staged = stage_dir(tmp_path, "s")
    if when == "before":  # refused before anything was written
        assert not staged.exists()
    else:
        assert list(staged.iterdir()) == []  # no step dir, the staging dir removed
    assert Ledger(tmp_path).read().stages.get("s") is None


@pytest.mark.parametrize("path", ["../other-run/checkpoints/s/step-000002", "/etc",
                                  "checkpoints/../../x"])
def test_a_ledger_path_outside_the_run_is_refused_when_read(tmp_path, path):
    doc = {"run": "r", "stages": {"s": {"checkpoints": [
        {"step": 2, "path": path, "committed_at": "2026-01-01T00:00:00+00:00"}]}}}
    (tmp_path / "ledger.json").write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match=r"stages\.s\.checkpoints\.0\.path: .*is not a path "
                                          r"inside the run directory"):
        Ledger(tmp_path).read()


def test_a_symlink_out_of_the_run_is_refused_and_nothing_outside_is_deleted(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "precious"
    _committed(outside)
    ledger = Ledger(run_dir, "r")
    for step in (2, 4):
        ledger.commit_checkpoint("s", step, _committed(checkpoint_dir(run_dir, "s", step)))
    first = checkpoint_dir(run_dir, "s", 2)
    for f in first.iterdir():
        f.unlink()
    first.rmdir()
    first.symlink_to(outside)  # the ledger's path now leads out of the run
    with pytest.raises(LedgerError, match="outside the run directory"):
        prune_checkpoints(ledger, "s", keep_last=1)
    assert (outside / COMMITTED).is_file()
    with pytest.raises(LedgerError, match="'../x' leads to"):
        contained(run_dir, "../x", "pointer.json path")
    assert contained(run_dir, "checkpoints/s/step-000004", "x") == checkpoint_dir(run_dir, "s", 4)


@pytest.mark.parametrize("damage", ["truncated", "not a ledger"])
def test_a_broken_ledger_stops_the_driver_with_one_message_and_is_left_as_it_was(
        tmp_path, capsys, damage):
    spec = write_spec(tmp_path / "run.yaml", mini_spec(tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "mini"
    ledger = Ledger(run_dir, "mini")
    ledger.commit_checkpoint("s64", 2, _committed(run_dir / "checkpoints" / "s64" / "step-2"))
    text = ledger.path.read_text()
    broken = text[: len(text) // 2] if damage == "truncated" else '{"run": "mini", "stages": 3}'
    ledger.path.write_text(broken)

    assert main(["--run", str(spec)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[0].endswith("cannot start") and len(lines) == 2, err
    want = ("it is not complete JSON (truncated or overwritten)" if damage == "truncated"
            else "stages: Input should be an object")
    assert f"not a valid run ledger: {want}" in lines[1]
    assert "ringpilot does not reset a ledger" in lines[1]
    assert ledger.path.read_text() == broken  # not reset, not rewritten
    assert (run_dir / "checkpoints" / "s64" / "step-2" / COMMITTED).is_file()
