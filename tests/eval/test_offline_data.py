"""eval.data_dir: all 13 RULER tasks and BABILong built by lm-eval's own generators from a local
folder (made here, in the real files' schemas) with every network connection refused; the
folder's check; the effective length; the report beside the published curves."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from ray_jobs.eval.lm_eval import adapter, babilong, ruler
from ray_jobs.eval.lm_eval import offline_data as od
from ray_jobs.eval.lm_eval.effective_length import (
    REFERENCE_CURVES,
    THRESHOLD,
    effective_length,
    summarize,
)
from specs.run import RULER_OFFLINE_TASKS, BabilongSpec, RulerSpec
from tests.support import eval_fixtures as fixtures
from tests.support.lm_eval_backends import CONSTANT_NAME, ORACLE_NAME, register_test_backends
from tests.support.offline_data import write_data_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

adapter.require_lm_eval()
register_test_backends()

LENGTHS = [1024, 1536]  # two lengths for a curve, both short: generation is the slow part
LIMIT = 2
CONSTANT = "I do not know, maybe 42."  # tests/support/lm_eval_backends.py's constant answer


@pytest.fixture(scope="module")
def no_network():
    """Every attempt to reach another host raises, loudly, and is recorded: lm-eval's
    generators swallow some errors (nltk's downloader prints and returns), so the tests also
    assert that none was attempted."""
    attempts: list[str] = []
    real_connect = socket.socket.connect

    def refuse(what):
        def raise_(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what == 'connect' else args}")
            raise OSError(f"network use in an offline test: {what} {args[1:]}")
        return raise_

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return refuse("connect")(sock, address)
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
        mp.setattr(socket, "create_connection", refuse("create_connection"))
        yield attempts



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_dir(tmp_path_factory.mktemp("data") / "lm-eval-data",
                          babilong_configs=("1k",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = fixtures.ruler_tokenizer()
    model = fixtures.build_tiny_model(len(tokenizer), max(LENGTHS))
    return fixtures.save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "step-1")


@pytest.fixture(scope="module")
def prepared(checkpoint, data_dir, no_network):
    # cached: the report's test evaluates these same samples through the actors' entry point
    return ruler.prepare_tasks_cached(checkpoint, ruler.RULER_TASKS, LENGTHS,
                                      data_dir=str(data_dir))


@pytest.fixture(scope="module")
def prepared_babilong(checkpoint, data_dir, no_network):
    return babilong.prepare_babilong(checkpoint, LENGTHS, data_dir=data_dir)


def test_all_13_ruler_tasks_and_babilong_build_their_samples_offline(
        prepared, prepared_babilong, data_dir, no_network):
    assert prepared.unavailable == {}
    assert sorted(prepared.tasks) == sorted(ruler.RULER_TASKS) and len(prepared.tasks) == 13
    for name, task in prepared.tasks.items():
        assert {d["max_length"] for d in task.eval_docs} == set(LENGTHS), name
    # the essay tasks' haystack is the folder's essays (lm-eval's sentence split, its needles)
    essay_words = set(od._essay_haystack(od.DataDir(data_dir)))
    doc = next(d for d in prepared.tasks["niah_single_2"].eval_docs
               if d["max_length"] == max(LENGTHS))
    assert "One of the special magic numbers" in doc["input"]
    assert len(set(doc["input"].split()) & essay_words) > 100
    assert "Document 1:" in prepared.tasks["ruler_qa_squad"].eval_docs[0]["input"]
    # BABILong: each length runs the largest config it holds (1k = 1,024 tokens), from the folder
    assert prepared_babilong.configs == {"1k": [1024, 1536]}
    assert prepared_babilong.unavailable == {}
    assert sorted(prepared_babilong.tasks["1k"]) == sorted(babilong.LONG_TASKS)
    assert no_network == []


def test_oracle_scores_100_on_every_task(prepared, prepared_babilong, tmp_path, no_network):
    report = ruler.evaluate_prepared(prepared, tmp_path / "ruler", limit=LIMIT, model=ORACLE_NAME)
    assert [r.length for r in report.rows] == LENGTHS
    for row in report.rows:
        assert row.tasks == {t: 100.0 for t in ruler.RULER_TASKS}, row
    doc = babilong.evaluate_babilong(prepared_babilong, tmp_path / "babilong", limit=LIMIT,
                                     model=ORACLE_NAME)
    assert [r["config"] for r in doc["rows"]] == ["1k"]
    for row in doc["rows"]:
        assert row["tasks"] == {t: 100.0 for t in babilong.LONG_TASKS}, row
    assert no_network == []


def _ruler_metric(outputs: list[str]) -> float:
    """RULER's string_match_all for the constant answer, computed here from the documents."""
    return sum(r.lower() in CONSTANT.lower() for r in outputs) / len(outputs)


def test_constant_backend_scores_what_rulers_metric_gives(prepared, prepared_babilong, tmp_path):
    report = ruler.evaluate_prepared(prepared, tmp_path / "ruler", limit=LIMIT,
                                     model=CONSTANT_NAME)
    for row in report.rows:
        for name, score in row.tasks.items():
            docs = [d for d in prepared.tasks[name].eval_docs
                    if d["max_length"] == row.length][:LIMIT]
            expected = 100 * sum(_ruler_metric(d["outputs"]) for d in docs) / len(docs)
            assert score == pytest.approx(expected), (name, row.length)
    # the folder's first QA answer is "42", which the constant answer contains: 1 of 2
    assert report.rows[0].tasks["ruler_qa_squad"] == 50.0
    doc = babilong.evaluate_babilong(prepared_babilong, tmp_path / "babilong", limit=LIMIT,
                                     model=CONSTANT_NAME)
    for name, score in doc["rows"][0]["tasks"].items():
        docs = list(prepared_babilong.tasks["1k"][name].eval_docs)[:LIMIT]
        assert score == pytest.approx(
            100 * sum(d["target"].lower() in CONSTANT.lower() for d in docs) / len(docs))


# -- the folder's check: one error naming the file and the format, nothing written --------------

def _break(root: Path, how: str) -> str:
    """Damage the folder; returns what the error must say."""
    if how == "no squad":
        (root / od.SQUAD).unlink()
        return r"missing .*squad/dev-v2\.0\.json: SQuAD v2\.0's dev JSON .*rajpurkar"
    if how == "hotpot not json":
        (root / od.HOTPOT).write_text("{not json")
        return r"malformed .*hotpot_dev_distractor_v1\.json: not JSON .*expected HotpotQA"
    if how == "hotpot too small":
        (root / od.HOTPOT).write_text(json.dumps(json.loads((root / od.HOTPOT).read_text())[:3]))
        return r"hotpot_dev_distractor_v1\.json: 3 questions, and lm-eval reads one per sample"
    if how == "no punkt":
        (root / od.PUNKT / "sent_starters.txt").unlink()
        return r"punkt_tab/english/\{sent_starters\.txt\}: nltk's punkt_tab"
    if how == "essay not utf-8":
        (root / od.ESSAYS / "essay-0001.txt").write_bytes(b"\xff\xfe\x00bad")
        return r"malformed .*essays/\*\.txt: Paul Graham's essays as UTF-8 .*essay-0001\.txt"
    if how == "no essays":
        shutil.rmtree(root / od.ESSAYS)
        return r"missing .*essays/\*\.txt: .*baber/paul_graham_essays"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no squad", "hotpot not json", "hotpot too small", "no punkt",
                                 "essay not utf-8", "no essays"])
def test_a_missing_or_malformed_file_is_one_error_and_nothing_is_written(
        how, data_dir, checkpoint, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    expected = _break(root, how)
    out = tmp_path / "out"
    with pytest.raises(od.DataDirError, match=r"\(1 problem\(s\)\)") as e:
        ruler.run_ruler(checkpoint, ruler.RULER_TASKS, [1024], out, data_dir=root)
    assert re.search(expected, str(e.value)), str(e.value)
    assert not out.exists()


def test_a_babilong_config_not_in_the_folder_is_named(data_dir, checkpoint):
    with pytest.raises(od.DataDirError, match=r"missing .*babilong/4k: BABILong's 4k config as "
                                              r"a `datasets.save_to_disk` DatasetDict"):
        babilong.prepare_babilong(checkpoint, [4096], data_dir=data_dir)


def test_without_data_dir_what_did_not_run_is_listed(checkpoint, no_network):
    """Today's behaviour, and proof that the guard sees what lm-eval tries: without the folder
    the SQuAD task reaches for the web, is refused, and is listed with the way out."""
    prepared = ruler.prepare_tasks(checkpoint, ["niah_single_1", "ruler_qa_squad"], [1024])
    assert list(prepared.tasks) == ["niah_single_1"]
    assert "give eval.data_dir" in prepared.unavailable["ruler_qa_squad"]
    assert any("rajpurkar.github.io" in a for a in no_network), no_network
    no_network.clear()


# -- the effective length ---------------------------------------------------------------------

def test_effective_length_reproduces_the_published_ones():
    assert THRESHOLD == 85.6
    for curve in REFERENCE_CURVES:
        assert effective_length(dict(zip(curve.lengths, curve.scores))) == \
            curve.effective_length, curve.model
        assert "NVIDIA/RULER" in curve.source
    assert effective_length({4096: 85.6, 8192: 90.0}) is None  # strictly above, from the start


def test_fewer_than_13_tasks_is_partial_and_has_no_effective_length():
    rows = [{"length": 4096, "score": 99.0, "tasks": {t: 99.0 for t in RULER_OFFLINE_TASKS}}]
    s = summarize(rows, RULER_OFFLINE_TASKS)
    assert (s["complete"], s["effective_length"]) == (False, None)
    assert s["label"] == "partial: 6 of 13 tasks, no effective length"
    assert len(s["tasks_missing"]) == 7


# -- the report of a tiny run -------------------------------------------------------------------

def test_report_shows_average_effective_length_and_published_curves(
        checkpoint, data_dir, count_tokens, tmp_path, prepared, no_network):
    from ray_jobs.eval.pipeline import EvalRequest, add_babilong, add_ruler
    from ray_jobs.eval.report import RULER_CURVES_PNG, render_run_report, save_results
    from ray_jobs.eval.results import load_results
    from ray_jobs.eval.runner import evaluate
    from specs.checkpoint import eval_dir
    from specs.ledger import EvalEntry, Ledger
    from tests.eval.oracle import oracle

    run = tmp_path / "tiny"
    ledger = Ledger(run)
    for step, tasks in ((1, ["niah_single_1"]), (2, list(ruler.RULER_TASKS))):
        ckpt = f"checkpoints/s2k/step-{step:06d}"
        shutil.copytree(checkpoint, run / ckpt)
        req = EvalRequest(stage="s2k", checkpoint=ckpt, step=step, run_dir=run, attempt=1,
                          tasks=("niah_lite",), lengths=(256,), depths=(0.0,), samples=1,
                          seed=0, gpus=0, max_length=max(LENGTHS),
                          ruler=RulerSpec(tasks=tasks, samples=1), ruler_lengths=tuple(LENGTHS),
                          babilong=BabilongSpec(samples=1), babilong_lengths=tuple(LENGTHS),
                          data_dir=str(data_dir))
        res = evaluate(oracle, count_tokens, checkpoint=str(run / ckpt), stage="s2k", step=step,
                       tasks=["niah_lite"], lengths=[256], depths=[0.0], samples=1, seed=0,
                       out_dir=eval_dir(run, "s2k", step))
        add_ruler(res, req, str(run / ckpt), "cpu", model=ORACLE_NAME)
        add_babilong(res, req, str(run / ckpt), "cpu", model=ORACLE_NAME)
        path = save_results(res, req.out_dir)
        ledger.record_eval("s2k", ckpt, EvalEntry(status="done", attempts=1, scores=res.scores,
                                                  results=os.path.relpath(path, run)))
    partial, full = (load_results(eval_dir(run, "s2k", s) / "results.json") for s in (1, 2))
    assert full.ruler["average"] == {"1024": 100.0, "1536": 100.0}
    assert (full.ruler["complete"], full.ruler["effective_length"]) == (True, 1536)
    assert full.scores["ruler@1536"] == 1.0 and full.scores["ruler_effective_length"] == 1536
    assert [r["score"] for r in full.babilong["rows"]] == [100.0]
    assert full.scores["babilong@1024"] == 1.0
    assert partial.ruler["label"] == "partial: 1 of 13 tasks, no effective length"
    assert "ruler_partial@1024" in partial.scores and "ruler@1024" not in partial.scores
    assert ledger.read().stages["s2k"].eval[
        "checkpoints/s2k/step-000002"].scores["ruler_effective_length"] == 1536
    _, page = render_run_report(run)
    html = page.read_text()
    assert "effective length 1,536" in html and "partial: 1 of 13 tasks" in html
    assert "1,024: 100.0, 1,536: 100.0" in html
    for curve in REFERENCE_CURVES:
        assert curve.model in html and f"effective length {curve.effective_length // 1024}K" \
            in html
    assert "github.com/NVIDIA/RULER" in html and "85.6" in html
    assert f"<img src='{RULER_CURVES_PNG}'" in html and "BABILong per config" in html
    assert (run / "eval" / RULER_CURVES_PNG).read_bytes()[:4] == b"\x89PNG"
    assert no_network == []


def test_fetch_data_refuses_an_existing_folder_or_an_unknown_config(tmp_path, capsys):
    """Only the argument checks, which come before any download (the tests never fetch)."""
    from ringpilot.cli import main as ringpilot

    assert ringpilot(["eval", "fetch-data", str(tmp_path)]) == 2
    assert "exists; give a new folder" in capsys.readouterr().err
    assert ringpilot(["eval", "fetch-data", str(tmp_path / "new"),
                      "--babilong-configs", "3k"]) == 2
    assert "BABILong has no config ['3k']" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_the_scheduler_checks_eval_data_dir_before_evaluating(data_dir, tmp_path):
    """Relative to the run file; all 13 RULER tasks by default with it; a folder lacking a file
    stops the scheduler at construction with the file named."""
    from ray_jobs.eval.scheduler import EvalScheduler
    from tests.eval.test_scheduler import tiny_run

    shutil.copytree(data_dir, tmp_path / "data")
    run = tiny_run(tmp_path, ruler=dict(samples=1), data_dir="data",
                   babilong=dict(samples=1), context_lengths=[1024])
    assert run.eval.ruler.tasks == list(ruler.RULER_TASKS)
    scheduler = EvalScheduler(run, tmp_path / run.name, spec_dir=tmp_path)
    assert scheduler.data_dir == str(tmp_path / "data")
    (tmp_path / "data" / od.HOTPOT).unlink()
    with pytest.raises(od.DataDirError,
                       match=r"(?s)eval.data_dir .* missing .*hotpot_dev_distractor"):
        EvalScheduler(run, tmp_path / run.name, spec_dir=tmp_path)
