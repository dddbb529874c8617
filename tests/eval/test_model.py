"""Checkpoints: committed and plain HF directories load; incomplete and missing ones are refused."""

import shutil

import pytest

from ray_jobs.eval import cli as standalone
from ray_jobs.eval.model import build_generate, greedy_tokens, load_checkpoint
from specs.checkpoint import (
    CheckpointError,
    TrainerState,
    check_checkpoint,
    checkpoint_dir,
    write_state,
)
from tests.support import eval_fixtures as fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model, tokenizer):
    root = tmp_path_factory.mktemp("ckpts")
    committed = fixtures.save_checkpoint(tiny_model, tokenizer,
                                         checkpoint_dir(root / "run", "s256", 4))
    plain = fixtures.save_checkpoint(tiny_model, tokenizer, root / "plain", ringpilot=False)
    incomplete = fixtures.save_checkpoint(tiny_model, tokenizer,
                                          checkpoint_dir(root / "run", "s256", 8), commit=False)
    return {"committed": committed, "plain": plain, "incomplete": incomplete, "root": root}


def test_incomplete_missing_and_foreign_directories_are_refused(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match=r"step-000008 is incomplete: it has trainer_state/ "
                       r"but no COMMITTED marker"):
        check_checkpoint(checkpoints["incomplete"])
    with pytest.raises(CheckpointError, match=r"nowhere does not exist; pass a committed"):
        check_checkpoint(tmp_path / "nowhere")
    foreign = tmp_path / "foreign"
    shutil.copytree(checkpoints["plain"], foreign)
    (foreign / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"lacks tokenizer.json; it must be a Hugging Face"):
        check_checkpoint(foreign)


def test_greedy_decoding_with_cache_matches_full_recompute(checkpoints):
    import torch

    model, tokenizer = load_checkpoint(checkpoints["committed"])
    ids = tokenizer("The special magic number for bako-dire is", return_tensors="pt").input_ids
    got = greedy_tokens(model, ids, 6, eos=None)
    expected, seq = [], ids
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole sequence every step
            token = int(model(input_ids=seq).logits[0, -1].argmax())
            expected.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    assert got == expected
    assert greedy_tokens(model, ids, 6, eos=expected[2]) == expected[:2]  # stops at EOS
    generate = build_generate(model, tokenizer)
    assert generate("a b c", 4) == generate("a b c", 4)


def test_standalone_evaluates_a_plain_hf_directory(checkpoints, tmp_path, capsys):
    rc = standalone.main(["--checkpoint", str(checkpoints["plain"]), "--tasks", "niah_lite",
                          "fwe_lite",
                          "--lengths", "256", "--depths", "0", "100", "--samples", "1",
                          "--out", str(tmp_path / "out")])
    assert rc == 0
    assert (tmp_path / "out/results.json").is_file()
    assert (tmp_path / "out/heatmap_niah_lite.png").is_file()
    # an untrained model
    assert "scores: niah_lite 0.000, fwe_lite 0.000" in capsys.readouterr().out


def test_standalone_runs_kamradt_with_a_haystack_and_refuses_a_missing_one(checkpoints,
                                                                            tmp_path, capsys):
    import random

    from ray_jobs.eval import tasks as task_lib
    from ray_jobs.eval.results import load_results

    rng = random.Random(0)
    essay = tmp_path / "essay.txt"
    essay.write_text(" ".join(task_lib.filler_sentence(rng) for _ in range(200)))
    common = ["--checkpoint", str(checkpoints["plain"]), "--tasks", "passkey", "--lengths", "256",
              "--depths", "50", "--samples", "1"]
    assert standalone.main(common + ["--haystack", str(tmp_path / "nowhere*.txt")]) == 2
    assert "--haystack: " in capsys.readouterr().err
    assert standalone.main(common + ["--haystack", str(essay), "--kamradt-depths", "3",
                                     "--out", str(tmp_path / "k")]) == 0
    res = load_results(tmp_path / "k" / "results.json")
    assert [c.depth for c in res.cells if c.task == "niah_kamradt"] == [0.0, 50.0, 100.0]
    assert res.kamradt["haystack_files"] == [str(essay)]
    assert (tmp_path / "k" / "heatmap_niah_kamradt.png").is_file()


def test_standalone_writes_next_to_the_run_and_refuses_incomplete(checkpoints, capsys):
    rc = standalone.main(["--checkpoint", str(checkpoints["committed"]), "--tasks", "vt_lite",
                          "--lengths", "256", "--depths", "50", "--samples", "1"])
    assert rc == 0
    assert (checkpoints["root"] / "run/eval/s256/step-000004/results.json").is_file()
    rc = standalone.main(["--checkpoint", str(checkpoints["incomplete"])])
    assert rc == 2
    assert "is incomplete" in capsys.readouterr().err


def test_standalone_default_lengths_from_trainer_state_or_the_run(checkpoints, tmp_path):
    ckpt = checkpoints["committed"]  # .../checkpoints/s256/step-000004
    write_state(ckpt, TrainerState(stage="s256", stage_index=1, step=4, seq_len=256))
    assert standalone.default_lengths(ckpt, None) == [256]
    assert standalone.default_lengths(checkpoints["plain"], None) == [128, 512]  # max_position
    run = tmp_path / "run.yaml"
    run.write_text(
        "name: t\nmodel: {vocab_size: 1000, hidden_size: 32, intermediate_size: 64, "
        "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, "
        "rope_theta: 10000.0, pretrain_seq_len: 192}\n"
        "stages:\n - {name: s192, seq_len: 192, steps: 1, lr: 0.001}\n"
        " - {name: s256, seq_len: 256, steps: 1, lr: 0.001}\n"
        "resources: {workers: 1}\nstorage: {path: /tmp/x}\n")
    assert standalone.default_lengths(ckpt, run) == [192, 256]
    rc = standalone.main(["--checkpoint", str(checkpoints["plain"]), "--run", str(run)])
    assert rc == 2  # the plain directory names no stage of the run


def test_a_model_that_memorised_the_answer_scores_through_the_real_decode_path(tokenizer,
                                                                              count_tokens,
                                                                              tmp_path):
    """Tokenisation, checkpoint round trip, greedy decoding and scoring together: a tiny model
    overfit on one NIAH prompt + answer gets it right; the same model untrained does not."""
    import torch

    from ray_jobs.eval import tasks
    from ray_jobs.eval.runner import evaluate

    sample = tasks.build_samples("niah_lite", 256, 50.0, 1, 0, count_tokens)[0]
    model = fixtures.build_tiny_model(len(tokenizer), 512, seed=1)
    fixtures.save_checkpoint(model, tokenizer, tmp_path / "untrained", ringpilot=False)
    ids = torch.tensor([tokenizer(f"{sample.prompt} {sample.answers[0]}.",
                                  add_special_tokens=False).input_ids])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    fixtures.save_checkpoint(model, tokenizer, tmp_path / "memorised", ringpilot=False)
    scores = {}
    for name in ("untrained", "memorised"):
        generate = build_generate(*load_checkpoint(tmp_path / name))
        scores[name] = evaluate(generate, count_tokens, checkpoint=name, tasks=["niah_lite"],
                                lengths=[256], depths=[50.0], samples=1, seed=0).scores["niah_lite"]
    assert scores == {"untrained": 0.0, "memorised": 1.0}
