"""The run's tokenizer: a local one (data.tokenizer.path or model.path), or a BPE trained here.

A locally trained tokenizer is saved in the run directory (``tokenizer/tokenizer.json``) the
first time and reused afterwards, so a resumed run tokenises exactly as the first attempt did.
Digits are always single tokens: the retrieval tasks ask the model to copy numbers digit by digit.
"""

from __future__ import annotations

import random
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from specs.atomic import atomic_write
from specs.run import RunSpec

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "pad_token": "<pad>"}
TOKENIZER_DIR = "tokenizer"


class TokenizerError(ValueError):
    """A tokenizer source that cannot be used; the message names the field and the fix."""


def resolve_tokenizer_source(run: RunSpec, spec_dir: Path | None = None) -> Path | None:
    """The local tokenizer.json to use, or None to train one. Raises TokenizerError if missing."""
    base = spec_dir or Path.cwd()
    for field, value in (("data.tokenizer.path", run.data.tokenizer.path),
                         ("model.path", run.model.path)):
        if value is None:
            continue
        path = Path(value) if Path(value).is_absolute() else base / value
        candidate = path / "tokenizer.json" if path.is_dir() else path
        if not candidate.is_file():
            raise TokenizerError(
                f"{field}: no tokenizer.json at {candidate} (got {value!r}; give a tokenizer.json "
                "or a directory holding one, or set data.tokenizer.path: null to train one locally)"
            )
        return candidate
    return None


def build_tokenizer(run: RunSpec, run_dir: Path, spec_dir: Path | None = None,
                    documents: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Load the configured tokenizer, or load/train the run's own (saved in the run directory)."""
    source = resolve_tokenizer_source(run, spec_dir)
    if source is None:
        source = Path(run_dir) / TOKENIZER_DIR / "tokenizer.json"
        if not source.is_file():
            _train_bpe(run, source, documents or [])
    try:
        tok = load_tokenizer(source)
    except TokenizerError as e:
        raise TokenizerError(f"data.tokenizer.path: {e}") from None
    if len(tok) > run.model.vocab_size:
        raise TokenizerError(
            f"data.tokenizer: the tokenizer has {len(tok)} tokens but model.vocab_size is "
            f"{run.model.vocab_size}; use a matching tokenizer or raise model.vocab_size"
        )
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The one loader of a local tokenizer, as the run uses it (prepare, trainer, evaluators).

    `path`: a tokenizer.json, or a folder holding one (a checkpoint, a model directory). Its own
    special tokens: from the tokenizer_config.json beside it when there is one (Llama-3's BOS
    and EOS are <|begin_of_text|> and <|end_of_text|>, not <s> and </s>), else those of
    SPECIAL_TOKENS its vocabulary has. Never adds a token: a special token missing from the
    vocabulary would grow it past the model's embedding. A tokenizer folder is data, never
    code, and never fetched: PreTrainedTokenizerFast (no auto class, so no remote code), local
    files only."""
    path = Path(path)
    source = path / "tokenizer.json" if path.is_dir() else path
    if not source.is_file():
        raise TokenizerError(f"no tokenizer.json at {source}; give a tokenizer.json or the folder "
                             "the tokenizer was saved in (save_pretrained)")
    if source.name == "tokenizer.json" and (source.parent / "tokenizer_config.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(str(source.parent), local_files_only=True,
                                                      trust_remote_code=False)
    else:
        vocab = PreTrainedTokenizerFast(tokenizer_file=str(source)).get_vocab()
        tok = PreTrainedTokenizerFast(tokenizer_file=str(source), **{
            k: v for k, v in SPECIAL_TOKENS.items() if v in vocab})
    if tok.eos_token_id is None:
        raise TokenizerError(
            f"the tokenizer at {source} has no end-of-sequence token (no tokenizer_config.json "
            "naming eos_token beside it, and no </s> in its vocabulary); give the directory "
            "saved with the tokenizer (save_pretrained), which names it")
    return tok


def _train_bpe(run: RunSpec, out: Path, documents: list[str]) -> None:
    """Train a byte-level BPE with single-digit tokens on the synthetic tasks and the documents."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from ray_jobs.data.samples import synthetic_corpus

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # one digit per token; a leading space stays glued to the first digit (" 4", "8", ...)
        pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=run.data.tokenizer.vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = synthetic_corpus(random.Random(run.data.seed), n=400) + documents
    tok.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, tok.to_str())  # two racing writers leave one complete file
