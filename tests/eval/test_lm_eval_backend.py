"""ringpilot as an lm-eval backend: lm-eval's RULER tasks, generated offline with a tiny local
checkpoint's tokenizer, scored by lm-eval through `lm_eval.simple_evaluate`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ray_jobs.eval.lm_eval import adapter, ruler
from ray_jobs.eval.lm_eval.__main__ import main
from specs.run import RULER_OFFLINE_TASKS
from tests.support import eval_fixtures as fixtures
from tests.support.lm_eval_backends import (
    CONSTANT_NAME,
    ORACLE_NAME,
    answer_from_prompt,
    register_test_backends,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# No importorskip: lm-eval comes with the `dev` extra the tests need anyway, so its absence is a
# broken setup, not a reason to pass quietly.
adapter.require_lm_eval()
register_test_backends()

# The RULER tasks whose data lm-eval makes from the tokenizer alone (no essay/QA downloads).
OFFLINE = list(RULER_OFFLINE_TASKS)
LENGTHS = [1024, 4096]
LIMIT = 2  # samples per task and length


CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% if not loop.last %}</{{ m['role'] }}>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return fixtures.ruler_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    model = fixtures.build_tiny_model(len(tokenizer), max(LENGTHS))
    return fixtures.save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "step-1")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    tokenizer = fixtures.ruler_tokenizer(CHAT)
    model = fixtures.build_tiny_model(len(tokenizer), max(LENGTHS))
    return fixtures.save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("chat") / "step-1")


@pytest.fixture(scope="module")
def prepared(checkpoint):
    """lm-eval's data for the offline tasks at 1K and 4K, made once (500 samples per task and
    length whatever the limit: the slow part)."""
    return ruler.prepare_tasks(checkpoint, OFFLINE, LENGTHS)



@pytest.fixture(scope="module")
def lm(checkpoint):
    return adapter.register_backend()(pretrained=str(checkpoint))


def _request(context: str, **gen_kwargs):
    from lm_eval.api.instance import Instance

    return Instance("generate_until", {}, (context, gen_kwargs), 0)


def _lm_eval_per_task(out_dir, length: int) -> dict[str, float]:
    """lm-eval's own aggregate per task at `length`, read from the results JSON it wrote."""
    results = json.loads((out_dir / "lm_eval_results.json").read_text())["results"]
    return {task: 100 * r[f"{length},none"] for task, r in results.items()}


# -- the oracle proves prompts, answers and scoring line up; a constant answer scores 0 --------

def test_all_offline_tasks_are_prepared(prepared):
    assert prepared.unavailable == {}
    for name, task in prepared.tasks.items():
        lengths = {doc["max_length"] for doc in task.eval_docs}
        assert lengths == set(LENGTHS), name


def test_oracle_scores_100_on_every_task_and_length(prepared, tmp_path):
    report = ruler.evaluate_prepared(prepared, tmp_path, limit=LIMIT,
                                       model=ORACLE_NAME)
    assert [r.length for r in report.rows] == LENGTHS
    for row in report.rows:
        assert row.tasks == {t: 100.0 for t in OFFLINE}, row
        assert row.score == 100.0 and row.samples == LIMIT * len(OFFLINE)
        assert _lm_eval_per_task(tmp_path, row.length) == row.tasks


def test_constant_answer_scores_low(prepared, tmp_path):
    report = ruler.evaluate_prepared(prepared, tmp_path, limit=LIMIT,
                                       model=CONSTANT_NAME)
    assert all(r.score < 10 for r in report.rows), report.table()


def test_table_matches_lm_eval_aggregates_and_its_samples(prepared, tmp_path):
    """A backend right on about half the prompts: the per-length table is lm-eval's per-task
    aggregate averaged over tasks, its count and interval come from lm-eval's logged samples."""
    import math
    import statistics
    import zlib

    oracle = register_test_backends()[ORACLE_NAME]

    class HalfRight(oracle):
        @staticmethod
        def answer(prompt):
            right = zlib.crc32(prompt.encode()) % 2 == 0
            return answer_from_prompt(prompt) if right else " no idea"

    report = ruler.evaluate_prepared(prepared, tmp_path, limit=3, model=HalfRight)
    mixed = 0
    for row in report.rows:
        lm_eval_tasks = _lm_eval_per_task(tmp_path, row.length)
        assert row.tasks == pytest.approx(lm_eval_tasks)
        assert row.score == pytest.approx(sum(lm_eval_tasks.values()) / len(lm_eval_tasks))
        var, n = 0.0, 0
        for task in OFFLINE:
            lines = (tmp_path / f"lm_eval_samples_{task}.jsonl").read_text().splitlines()
            scores = [json.loads(x)[str(row.length)] for x in lines
                      if json.loads(x)["doc"]["max_length"] == row.length]
            assert len(scores) == 3
            assert 100 * statistics.mean(scores) == pytest.approx(row.tasks[task])
            var += statistics.variance(scores) / len(scores)
            n += len(scores)
            mixed += 0 < statistics.mean(scores) < 1
        assert row.samples == n
        assert row.ci95 == pytest.approx(100 * 1.959964 * math.sqrt(var) / len(OFFLINE))
    assert mixed >= 2, report.table()  # the check above compared something other than 0 or 100
    assert 0 < report.rows[0].score < 100


# -- the ringpilot backend: a real (tiny) model through lm-eval -------------------------------

@pytest.fixture
def decoded(monkeypatch):
    """Records (max_new_tokens, tokens generated) of every greedy decode (byte-level tokens of a
    random model do not survive decode and re-encode, so they are counted here)."""
    from ray_jobs.eval import model

    calls, real = [], model.greedy_tokens

    def spy(m, input_ids, max_new_tokens, eos):
        new = real(m, input_ids, max_new_tokens, eos)
        calls.append((max_new_tokens, len(new)))
        return new

    monkeypatch.setattr(model, "greedy_tokens", spy)
    return calls


def test_tiny_model_runs_every_offline_task_through_lm_eval(prepared, tmp_path, decoded):
    t = time.perf_counter()
    report = ruler.evaluate_prepared(prepared, tmp_path, limit=1, lengths=[1024])
    seconds = time.perf_counter() - t
    (row,) = report.rows
    assert row.length == 1024 and row.samples == len(OFFLINE)
    assert set(row.tasks) == set(OFFLINE) and 0 <= row.score <= 100
    assert row.tasks == pytest.approx(_lm_eval_per_task(tmp_path, 1024))
    results = json.loads((tmp_path / "lm_eval_results.json").read_text())
    budgets = sorted(results["configs"][t]["generation_kwargs"]["max_gen_toks"] for t in OFFLINE)
    assert sorted(b for b, _ in decoded) == budgets == [30, 50, 120, 128, 128, 128]  # RULER's
    assert all(n <= b for b, n in decoded)
    for task in OFFLINE:
        (sample,) = [json.loads(x) for x in
                     (tmp_path / f"lm_eval_samples_{task}.jsonl").read_text().splitlines()]
        assert isinstance(sample["resps"][0][0], str)
        assert sample["arguments"][0][0].endswith(sample["doc"]["gen_prefix"])
    print(f"tiny model: {seconds / len(OFFLINE):.2f} s per sample at 1K")


def test_generate_until_stops_at_stop_sequences_and_budget(lm, decoded):
    (free,) = lm.generate_until([_request("The grass is green.", max_gen_toks=12, until=[])])
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop.strip(), free
    (cut,) = lm.generate_until([_request("The grass is green.", max_gen_toks=12, until=[stop])])
    assert cut == free[:free.find(stop)] and len(cut) < len(free)
    lm.generate_until([_request("The grass is green.", max_gen_toks=3, until="never")])
    assert decoded == [(12, 12), (12, 12), (3, 3)]  # a random model never says <|eos|>


def test_greedy_only(lm):
    with pytest.raises(adapter.RulerInputError, match="greedily"):
        lm.generate_until([_request("x", do_sample=True, temperature=0.7)])


def test_loglikelihood_matches_a_full_forward_pass(lm):
    import torch
    from lm_eval.api.instance import Instance

    ctx, cont = "The sky is blue.", " The sun is yellow."
    (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
    tok = lm.ckpt.tokenizer
    a, b = lm.ckpt.encode(ctx), tok(cont, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logp = torch.log_softmax(lm.ckpt.model(input_ids=torch.tensor([a + b])).logits[0], -1)
    expected = sum(float(logp[len(a) - 1 + i, t]) for i, t in enumerate(b))
    assert ll == pytest.approx(expected, rel=1e-5) and ll < 0
    # the model's own greedy continuation is greedy
    first = int(logp[len(a) - 1].argmax())
    (_, is_greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, tok.decode([first])),
                                                 0)])
    assert is_greedy == (tok(tok.decode([first]), add_special_tokens=False).input_ids == [first])
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])


# -- chat template ------------------------------------------------------------------------------

def test_chat_template_with_gen_prefix_runs_through_lm_eval(prepared, chat_checkpoint, tmp_path):
    import dataclasses

    # same tokenizer vocabulary, so the data made for `checkpoint` serve this one
    chat = dataclasses.replace(prepared, checkpoint=str(chat_checkpoint),
                               tasks={"ruler_vt": prepared.tasks["ruler_vt"]})
    report = ruler.evaluate_prepared(chat, tmp_path, limit=1, lengths=[1024],
                                       apply_chat_template=True)
    assert report.rows[0].samples == 1
    (sample,) = [json.loads(x) for x in
                 (tmp_path / "lm_eval_samples_ruler_vt.jsonl").read_text().splitlines()]
    prompt = sample["arguments"][0][0]
    # user turn closed, assistant turn opened with lm-eval's gen_prefix and left open
    assert prompt.startswith("<user>") and "</user><assistant>" in prompt
    assert prompt.endswith(sample["doc"]["gen_prefix"]) or prompt.rstrip().endswith(
        sample["doc"]["gen_prefix"].rstrip())


def test_chat_template_asked_for_but_absent(checkpoint, lm):
    with pytest.raises(adapter.RulerInputError, match="chat template was asked for"):
        ruler.prepare_tasks(checkpoint, ["ruler_vt"], [1024], apply_chat_template=True)
    with pytest.raises(adapter.RulerInputError, match="has none"):
        lm.chat_template(True)


# -- bad input ----------------------------------------------------------------------------------

def test_the_data_are_those_lm_eval_makes_by_itself(checkpoint):
    """prepare_tasks seeds as lm_eval.simple_evaluate does: a task run by name through lm-eval
    alone sees the same prompts (ruler_vt: also checks that the tokenizer check before it leaves
    the random state alone)."""
    import lm_eval

    ours = ruler.prepare_tasks(checkpoint, ["ruler_vt"], [1024]).tasks["ruler_vt"].eval_docs
    oracle = register_test_backends()[ORACLE_NAME]()
    theirs = lm_eval.simple_evaluate(
        model=oracle, tasks=["ruler_vt"], limit=2, bootstrap_iters=0,
        metadata={"max_seq_lengths": [1024], "pretrained": str(checkpoint)})
    logged = theirs["samples"]["ruler_vt"]
    assert [s["doc"]["input"] for s in logged] == [ours[0]["input"], ours[1]["input"]]
    assert theirs["results"]["ruler_vt"]["1024,none"] == 1.0


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_input_one_clear_error_each(checkpoint, tmp_path, capsys):
    code, out, err = _cli(capsys, "--checkpoint", str(checkpoint), "--tasks", "niah_single_9",
                          "--out", str(tmp_path))
    assert code == 2 and out == "" and "Traceback" not in err
    assert "unknown lm-eval task(s) ['niah_single_9']; RULER's are ['niah_single_1'," in err
    code, _, err = _cli(capsys, "--checkpoint", str(checkpoint), "--lengths", "8192")
    assert code == 2 and "length 8192 is above what checkpoint" in err
    code, _, err = _cli(capsys, "--checkpoint", str(checkpoint), "--chat-template")
    assert code == 2 and "chat template was asked for" in err
    code, _, err = _cli(capsys, "--checkpoint", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_cli_prints_the_table(checkpoint, tmp_path, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    code, out, _ = _cli(capsys, "--checkpoint", str(checkpoint), "--tasks", "ruler_vt",
                        "niah_single_2", "--lengths", "1024", "--limit", "1", "--out",
                        str(tmp_path))
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["length", "score", "95%", "CI"]
    assert lines[2].split()[0] == "1024" and lines[2].split()[4] == "1"
    assert lines[3].startswith("not run: niah_single_2: its haystack is Paul Graham's essays")
    assert "give eval.data_dir" in lines[3]
    assert lines[-1] == "partial: 1 of 13 tasks, no effective length"  # never an effective length
    assert (tmp_path / "lm_eval_results.json").is_file()


def test_lm_eval_missing_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(adapter.LmEvalMissing, match=r"\[eval\]"):
        adapter.require_lm_eval()


def test_tasks_needing_downloads_are_reported_not_averaged(checkpoint, monkeypatch):
    """Offline, niah_multikey_1's essay haystack cannot be loaded: it is listed with why."""
    import datasets.config
    import huggingface_hub.constants

    # what HF_HUB_OFFLINE=1 in the environment gives (read when the modules were imported):
    # fail at once rather than after ~25 s of retries on a machine without the hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    prepared = ruler.prepare_tasks(checkpoint, ["niah_multikey_1", "ruler_vt"], [1024])
    assert list(prepared.tasks) == ["ruler_vt"]
    assert "paul_graham_essays" in prepared.unavailable["niah_multikey_1"]


def test_vt_refuses_a_wasteful_tokenizer(tmp_path):
    """lm-eval's ruler_vt loops forever when the tokenizer cannot fit its worked example in 500
    tokens (the evaluation fixtures' tokenizer cannot): refused with a reason instead."""
    tok = fixtures.build_tokenizer()
    ckpt = fixtures.save_checkpoint(fixtures.build_tiny_model(len(tok), 1024), tok,
                                    tmp_path / "step-1")
    prepared = ruler.prepare_tasks(ckpt, ["ruler_vt"], [1024])
    assert prepared.tasks == {}
    assert "worked example" in prepared.unavailable["ruler_vt"]


def test_vt_refuses_a_length_its_smallest_sample_does_not_fit(tmp_path):
    """The run's own small-vocabulary tokenizer fits the worked example but not the smallest
    sample at 1K (lm-eval would loop forever, printing): refused at 1K with the length it needs,
    accepted at 2K, where lm-eval then makes its data."""
    import tempfile

    from ray_jobs.data.tokenizer import build_tokenizer
    from specs.loading import load_model
    from specs.run import RunSpec

    tok = build_tokenizer(load_model("configs/tiny.yaml", RunSpec), Path(tempfile.mkdtemp()))
    ckpt = fixtures.save_checkpoint(fixtures.build_tiny_model(len(tok), 2048), tok,
                                    tmp_path / "step-1")
    prepared = ruler.prepare_tasks(ckpt, ["ruler_vt"], [1024])
    assert prepared.tasks == {}
    assert "cannot run at 1,024 tokens" in prepared.unavailable["ruler_vt"]
    assert "from 1," in prepared.unavailable["ruler_vt"]  # says where it can run from
    assert list(ruler.prepare_tasks(ckpt, ["ruler_vt"], [2048]).tasks) == ["ruler_vt"]


def test_a_task_whose_samples_expect_no_answer_is_refused():
    """lm-eval's ruler_cwe generates samples without answers for a small-vocabulary tokenizer;
    RULER's scorer would divide by zero on them."""
    with pytest.raises(adapter.RulerInputError, match=r"lm-eval generated 1 of 2 ruler_cwe "
                       "samples with no expected answer"):
        ruler._check_answers("ruler_cwe", [{"outputs": ["a"]}, {"outputs": []}])
    ruler._check_answers("ruler_fwe", [{"outputs": ["a", "b"]}])


def test_unknown_backend_name_is_one_clear_error(prepared, tmp_path):
    with pytest.raises(adapter.RulerInputError, match=r"unknown backend 'nope': ringpilot's is "
                       "'ringpilot'; register another lm-eval LM class under its name first"):
        ruler.evaluate_prepared(prepared, tmp_path, limit=1, model="nope")


def test_no_product_module_knows_the_test_backends():
    """The oracle and the constant backend live in tests/support/ only."""
    root = Path(__file__).resolve().parents[2]
    names = (ORACLE_NAME, CONSTANT_NAME, "answer_from_prompt", "lm_eval_backends")
    found = [f"{path.relative_to(root)}: {name}"
             for package in ("specs", "topology", "ray_jobs", "operators", "ringpilot")
             for path in sorted((root / package).rglob("*.py"))
             for name in names if name in path.read_text(encoding="utf-8")]
    assert found == []
