"""One tokenizer loader: prepare, the trainer and the evaluators see the same tokens."""

from __future__ import annotations

import pytest

from ray_jobs.data.readers import cached_tokenizer
from ray_jobs.data.tokenizer import SPECIAL_TOKENS, TokenizerError, load_tokenizer


def _bpe(special: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the grass is green and the sky is blue"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_a_saved_tokenizer_keeps_its_own_special_tokens_for_every_reader(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(["<|begin_of_text|>", "<|end_of_text|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(tmp_path / "llama3")
    size = len(tok.get_vocab())
    # the folder (the evaluator's checkpoint), its tokenizer.json (the run's data.tokenizer.path)
    # and prepare's per-process copy
    for got in (load_tokenizer(tmp_path / "llama3"),
                load_tokenizer(tmp_path / "llama3" / "tokenizer.json"),
                cached_tokenizer(str(tmp_path / "llama3" / "tokenizer.json"))):
        assert (got.bos_token, got.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
        assert len(got) == size  # nothing added: <s> and </s> would grow the vocabulary


def test_a_bare_tokenizer_file_takes_only_the_special_tokens_it_has(tmp_path):
    _bpe(list(SPECIAL_TOKENS.values())).save(str(tmp_path / "tokenizer.json"))
    got = load_tokenizer(tmp_path)
    assert (got.bos_token, got.eos_token, got.pad_token) == ("<s>", "</s>", "<pad>")
    # a file under another name is read itself, never the saved tokenizer of its folder
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|end_of_text|>"]),
                            eos_token="<|end_of_text|>").save_pretrained(tmp_path / "saved")
    _bpe(["<|eot|>"]).save(str(tmp_path / "saved" / "other.json"))
    assert load_tokenizer(tmp_path / "saved").eos_token == "<|end_of_text|>"
    with pytest.raises(TokenizerError, match=r"other.json has no end-of-sequence token .* give "
                       r"the directory saved with the tokenizer"):
        load_tokenizer(tmp_path / "saved" / "other.json")
    with pytest.raises(TokenizerError, match=r"no tokenizer.json at .*nowhere; give a "
                       "tokenizer.json or the folder"):
        load_tokenizer(tmp_path / "nowhere")
