"""Pieces of the trainer that need no Ray: data order, tokenizer, RoPE, ledger, resume point."""

from __future__ import annotations

import json
import multiprocessing as mp
import re
from pathlib import Path

import pytest
import torch

from ray_jobs.data.samples import IGNORE, SampleStream, build_eval_prompt
from ray_jobs.data.tokenizer import build_tokenizer
from ray_jobs.train.loop import LR_FLOOR, lr_factor, plan_start
from ray_jobs.train.model import apply_rope, build_model
from specs.checkpoint import checkpoint_dir
from specs.ledger import COMMITTED, Ledger, mark_committed
from specs.run import RunSpec
from tests.train.conftest import mini_spec


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunSpec:
    return RunSpec.model_validate(mini_spec(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def tok(run, tmp_path_factory):
    return build_tokenizer(run, tmp_path_factory.mktemp("run"))


def test_samples_are_a_pure_function_of_seed_stage_step(run, tok):
    a, b = SampleStream(run, 0, tok), SampleStream(run, 0, tok)
    assert a.sample(3, 0, 1) == b.sample(3, 0, 1)
    assert a.sample(3, 0, 1).input_ids != a.sample(4, 0, 1).input_ids
    assert a.sample(3, 0, 1).input_ids != SampleStream(run, 1, tok).sample(3, 0, 1).input_ids
    x, y, ids, starts, *_ = a.batch(2, 0, range(2))
    assert x.shape == y.shape == (2, run.stages[0].seq_len)
    assert ids == ["0:s64:2:0:0", "0:s64:2:0:1"]
    assert [s.tolist() for s in starts] == [[0], [0]]  # a retrieval prompt: one document
    assert {a.sample(s, 0, 0).kind for s in range(20)} == {"passkey", "kv_retrieval"}


def test_only_answer_digits_are_scored_and_digits_are_single_tokens(run, tok):
    s = build_eval_prompt(tok, 128, seed=7, kind="passkey", depth=0.5)
    scored = [t for t in s.labels if t != IGNORE]
    assert tok.decode(scored).split() == s.answer.split() and len(scored) == 5
    assert s.labels[-5:] == scored  # the answer closes the sequence
    text = tok.decode(s.input_ids)
    assert f"The pass key is {s.answer}." in text


def test_every_training_sequence_holds_one_prompt_with_its_answer_at_the_end(run, tok):
    # Prompts packed together would share the cue "The pass key is" and make the question
    # ambiguous; each sequence is one prompt, the needle at a random depth.
    stream = SampleStream(run, 1, tok)
    depths = []
    for step in range(40):
        s = stream.sample(step, 0, 0)
        text = tok.decode(s.input_ids)
        scored = [t for t in s.labels if t != IGNORE]
        assert len(s.input_ids) == run.stages[1].seq_len and s.labels[-1] != IGNORE
        assert tok.decode(scored).split() == s.answer.split()
        if s.kind == "passkey":
            assert text.count("The pass key is") == 2  # the needle and the question
            assert s.labels[-5:] == scored  # the five digits close the sequence
            depths.append(text.index("The pass key is") / len(text))
    assert min(depths) < 0.3 and max(depths) > 0.6  # needles spread over the context
    texts = [tok.decode(stream.sample(step, 0, 0).input_ids) for step in range(40)]
    # ... and some sit at the edges, which a uniform depth almost never reaches
    assert any("remember it. The pass key is" in t for t in texts)  # right after the intro
    assert any("Remember it. Tell me the pass key." in t for t in texts)  # just before the question


def test_eval_passkey_task_asks_in_the_training_text_token_for_token(tok):
    # The trainer encodes the pieces one by one; the evaluator encodes the whole prompt. Every
    # piece starts with a space, so both give the same tokens and a tiny model is asked the way
    # it learned.
    from ray_jobs.data.samples import PASSKEY_INTRO, PASSKEY_QUESTION
    from ray_jobs.eval.tasks import build_samples

    count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    s = build_samples("passkey", 512, 40.0, 1, seed=3, count_tokens=count)[0]
    pieces = re.findall(r" [^.]+\.?", s.prompt)
    assert "".join(pieces) == s.prompt and pieces[:2] == re.findall(r" [^.]+\.?", PASSKEY_INTRO)
    whole = tok.encode(s.prompt, add_special_tokens=False)
    assert whole == [t for p in pieces for t in tok.encode(p, add_special_tokens=False)]
    assert (s.prompt.endswith(PASSKEY_QUESTION)
            and f"The pass key is {s.answers[0]}. Remember it." in s.prompt)


def test_learning_rate_warms_up_then_decays_along_a_cosine_to_the_floor():
    factors = [lr_factor(step, 10, 100) for step in range(100)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[10] == 1.0 and all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 10, 100) == pytest.approx(LR_FLOOR)
    assert lr_factor(55, 10, 100) == pytest.approx((1 + LR_FLOOR) / 2)  # half-way down
    assert lr_factor(0, 0, 1) == 1.0 and lr_factor(5, 0, 1) == pytest.approx(LR_FLOOR)


def test_locally_trained_tokenizer_is_reused(run, tmp_path):
    first = build_tokenizer(run, tmp_path)
    saved = (tmp_path / "tokenizer" / "tokenizer.json").read_text()
    again = build_tokenizer(run, tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_text() == saved
    assert first.encode("The pass key is 4 2") == again.encode("The pass key is 4 2")


def test_rope_theta_rebuilds_inverse_frequencies(run):
    model = build_model(run, 0, None, seed=0, attn_implementation="sdpa")
    before = model.model.rotary_emb.inv_freq.clone()
    apply_rope(model, run.stage_rope(1), seq_len=128, pretrain_seq_len=run.model.pretrain_seq_len)
    after = model.model.rotary_emb.inv_freq
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(run.stage_theta(1))
    head_dim = run.model.head_dim
    want = 1.0 / run.stage_theta(1) ** (torch.arange(0, head_dim, 2).float() / head_dim)
    assert torch.allclose(after, want) and not torch.allclose(after, before)


def _writer(run_dir: str, worker: int, n: int) -> None:
    ledger = Ledger(run_dir, "mini")
    for i in range(n):
        step = worker * 100 + i
        path = checkpoint_dir(run_dir, "s64", step)
        path.mkdir(parents=True)
        mark_committed(path)
        ledger.commit_checkpoint("s64", step, path)


def test_ledger_updates_from_concurrent_processes_are_all_kept(tmp_path):
    procs = [mp.get_context("fork").Process(target=_writer, args=(str(tmp_path), w, 8))
             for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    doc = json.loads((tmp_path / "ledger.json").read_text())
    steps = [c["step"] for c in doc["stages"]["s64"]["checkpoints"]]
    assert steps == sorted(w * 100 + i for w in range(3) for i in range(8))


def test_resume_point_skips_half_written_checkpoints(run, tmp_path):
    ledger = Ledger(tmp_path, run.name)
    assert plan_start(run, 0, ledger) == (False, None)
    with pytest.raises(RuntimeError,
                       match="starts from stage s64's final checkpoint, but the ledger"):
        plan_start(run, 1, ledger)
    good = checkpoint_dir(tmp_path, "s64", 2)
    good.mkdir(parents=True)
    mark_committed(good)
    ledger.commit_checkpoint("s64", 2, good)
    torn = checkpoint_dir(tmp_path, "s64", 4)  # written, then the marker removed
    torn.mkdir(parents=True)
    mark_committed(torn)
    ledger.commit_checkpoint("s64", 4, torn)
    (torn / COMMITTED).unlink()
    checkpoint_dir(tmp_path, "s64", 5).mkdir()  # never committed at all
    assert plan_start(run, 0, ledger) == (True, str(good))
    ledger.commit_checkpoint("s64", 6, _committed(checkpoint_dir(tmp_path, "s64", 6)), final=True)
    assert plan_start(run, 1, ledger) == (False, str(checkpoint_dir(tmp_path, "s64", 6)))


def _committed(path: Path) -> Path:
    path.mkdir(parents=True)
    mark_committed(path)
    return path


def test_training_forward_keeps_no_kv_cache(monkeypatch):
    """The loss root runs the decoder with use_cache=False: no layer's K/V is kept for a
    generation that never comes (transformers defaults use_cache to True)."""
    import transformers.models.llama.modeling_llama as llama

    from ray_jobs.train.parallelize import CausalLMWithLoss
    from tests.train.parallel_worlds import tiny_llama

    class NoCache:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a KV cache was built")

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 16))
    monkeypatch.setattr(llama, "DynamicCache", NoCache)
    with pytest.raises(AssertionError, match="KV cache was built"):  # the probe sees caches
        model(input_ids=ids, use_cache=True)
    loss, count = CausalLMWithLoss(model, 8)(ids, torch.arange(16)[None], ids)
    loss.backward()
    assert count == 16


def _llama3_like_tokenizer(directory, *, with_config: bool):
    """A small BPE with Llama-3's special-token names, saved like a real checkpoint's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the grass is green and the sky is blue"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True, exist_ok=True)
    if with_config:
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                eos_token="<|end_of_text|>").save_pretrained(directory)
    else:
        tok.save(str(directory / "tokenizer.json"))
    return len(tok.get_vocab())


def test_a_given_tokenizer_keeps_its_own_special_tokens(tmp_path):
    from ray_jobs.data.tokenizer import TokenizerError

    size = _llama3_like_tokenizer(tmp_path / "llama3", with_config=True)
    run = RunSpec.model_validate(mini_spec(tmp_path, data={
        "tokenizer": {"path": str(tmp_path / "llama3")}}))
    tok = build_tokenizer(run, tmp_path / "run")
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert len(tok) == size  # nothing added: <s> / </s> would have grown the vocabulary
    _llama3_like_tokenizer(tmp_path / "bare", with_config=False)
    bare = RunSpec.model_validate(mini_spec(tmp_path, data={
        "tokenizer": {"path": str(tmp_path / "bare")}}))
    with pytest.raises(TokenizerError, match="no end-of-sequence token"):
        build_tokenizer(bare, tmp_path / "run")


def test_a_resumed_stage_whose_attention_changed_is_warned_of(run):
    """The driver warns, once, when a stage resumes from a checkpoint trained with another
    attention over packed documents, naming both and the fields that would keep the old one."""
    from ray_jobs.train.driver import attention_change
    from specs.checkpoint import TrainerState

    stage = run.stages[1].model_copy(update={"attention": "document",
                                             "position_ids": "per_document"})
    old = TrainerState(stage=stage.name, stage_index=1, step=7)  # causal, continuous
    assert attention_change(1, stage, old) == (
        f"[{stage.name}] warning: its checkpoint at step 7 trained with attention causal, and "
        "the stage goes on with document, positions per document as the RunSpec now says; to "
        "go on as before, set stages[1].attention: causal and position_ids: continuous")
    same = TrainerState(stage=stage.name, stage_index=1, step=7, attention="document",
                        position_ids="per_document")
    assert attention_change(1, stage, same) is None
