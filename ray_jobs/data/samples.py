"""Training samples: synthetic long-context retrieval over filler text, and packed documents.

Every sample is a pure function of (seed, stage, step, micro-step, index in the global batch),
so a resumed run sees exactly the samples an uninterrupted one would, whatever restarted.
Prepared documents (data.prepared, ray_jobs/data/prepared.py) are addressed the same way: the k-th
document sample of a stage reads packed sequence perm(k) of the stage's seeded permutation by
memory map, so no sequence is used twice in a stage and none is skipped for another.

Retrieval samples are built so a copy mechanism solves them: the filler text has no digits and
no "is", the needle's number follows a unique cue ("... pass key is" or the key's word), and the
loss is taken on the answer digits only (ln 10 ~ 2.3 nats per digit is chance).
"""

from __future__ import annotations

import glob
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ray_jobs.data.prepared import FeistelPermutation, PreparedCorpus, resolve, stage_sequences
from specs.run import RunSpec

IGNORE = -100

FILLER = [
    " The grass grows green.", " The sky looks blue.", " The sun shines yellow.",
    " Here we go.", " There and back again.", " Birds sing in the morning.",
    " The river runs to the sea.", " Clouds drift over the hills.", " A dog sleeps by the door.",
    " The wind moves the trees.",
]
KEYS = [
    "apple", "river", "stone", "cloud", "tiger", "maple", "piano", "candle", "rocket", "garden",
    "silver", "window", "forest", "orange", "violet", "harbor", "lemon", "castle", "falcon",
    "meadow", "pepper", "comet", "willow", "anchor",
]
# The passkey texts, shared with the evaluation's `passkey` task (ray_jobs/eval/tasks.py) so that
# it asks in the training format, token for token. Every piece starts with a space: encoding the
# pieces one by one gives the same tokens as encoding the whole prompt.
PASSKEY_INTRO = " Important info hides inside a lot of text. Find it and remember it."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it."
PASSKEY_QUESTION = " Tell me the pass key. The pass key is"
KV_INTRO = " Remember the number after each word."
KV_PAIRS = 2
EDGE = 0.1  # share of training needles at each edge of the filler (depth 0 and depth 1)


@dataclass(frozen=True)
class Sample:
    """One training sequence: `seq_len` inputs, next-token labels (IGNORE where not scored)."""

    sample_id: str
    kind: str
    input_ids: list[int] | np.ndarray
    labels: list[int] | np.ndarray
    answer: str = ""


class Batch(NamedTuple):
    """Rows of a micro-step as one rank reads them (SampleStream.batch)."""

    inputs: torch.Tensor  # (B, S) int64: this rank's positions of each row
    labels: torch.Tensor  # (B, S) int64, IGNORE where not scored
    sample_ids: list[str]
    # per row, where the WHOLE sequence's documents begin: int64 global positions, 0 first,
    # strictly increasing (ring_attention's doc_starts; the same on every rank of a ring)
    doc_starts: list[torch.Tensor]
    # sharded per document (batch(shard_of=...)): each row's positions (B, S) and its
    # DocumentLayout (ring_attention's doc_starts for that row); else None
    positions: torch.Tensor | None = None
    layouts: list | None = None


def starts_after_eos(inputs, eos: int) -> np.ndarray:
    """Where documents begin among a sequence's inputs when documents are joined by EOS: 0, and
    every position right after an EOS (int64)."""
    tokens = np.asarray(inputs)
    return np.concatenate([[0], np.flatnonzero(tokens[:-1] == eos) + 1]).astype(np.int64)


def sample_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed from the run seed and a sample's coordinates (stable across processes)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def spaced_digits(rng: random.Random, digits: int = 5) -> str:
    # Spaced digits: every digit is the same kind of token (" 4"), first or not.
    return " ".join(rng.choice("0123456789") for _ in range(digits))


class _Ids:
    """Token ids of the fixed text pieces, encoded once."""

    def __init__(self, tok):
        enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
        self.enc = enc
        self.filler = [enc(s) for s in FILLER]
        self.bos = tok.bos_token_id
        self.eos = tok.eos_token_id


def _fill(ids: _Ids, rng: random.Random, n: int) -> list[list[int]]:
    """Whole filler sentences of n tokens in all (the last one cut short)."""
    out: list[list[int]] = []
    left = n
    while left > 0:
        sentence = ids.filler[rng.randrange(len(ids.filler))][:left]
        out.append(sentence)
        left -= len(sentence)
    return out


def build_retrieval(ids: _Ids, rng: random.Random, seq_len: int, kind: str,
                    depth: float | None = None) -> tuple[list[int], list[bool], str]:
    """Tokens (seq_len + 1 of them) of a passkey / key-value prompt ending in its answers, which
    tokens are answers (scored), and the answer text. `depth` (0..1) places the needles; None:
    random. Key-value prompts ask back every pair (in another order): more answers per sample."""
    if kind == "passkey":
        answer = spaced_digits(rng)
        head = ids.enc(PASSKEY_INTRO)
        needles = [ids.enc(PASSKEY_NEEDLE.format(key=answer))]
        queries = [(ids.enc(PASSKEY_QUESTION), ids.enc(f" {answer}"))]
    else:
        keys = rng.sample(KEYS, KV_PAIRS)
        values = [spaced_digits(rng, 4) for _ in keys]
        head = ids.enc(KV_INTRO)
        needles = [ids.enc(f" {k} {v}.") for k, v in zip(keys, values)]
        order = rng.sample(range(KV_PAIRS), KV_PAIRS)
        queries = [(ids.enc(" Now recall." if i == 0 else ".") + ids.enc(f" {keys[j]}"),
                    ids.enc(f" {values[j]}")) for i, j in enumerate(order)]
        answer = " ".join(values[j] for j in order)
    tail, scored = [], []
    for prompt, ans in queries:
        tail += prompt + ans
        scored += [False] * len(prompt) + [True] * len(ans)
    budget = seq_len + 1 - 1 - len(head) - len(tail) - sum(map(len, needles))
    if budget < 0:
        raise ValueError(f"seq_len {seq_len} is too short for a {kind} sample (needs "
                         f">= {seq_len - budget} tokens); lengthen the stage")
    sentences = _fill(ids, rng, budget)
    # Needles sit between sentences at sorted random depths (or the one given, for evaluation).
    cuts = sorted(_training_depth(rng) if depth is None else depth for _ in needles)
    body, prev = [], 0
    for cut, needle in zip(cuts, needles):
        at = int(round(cut * len(sentences)))
        body += [t for s in sentences[prev:at] for t in s] + needle
        prev = at
    body += [t for s in sentences[prev:] for t in s]
    tokens = [ids.bos] + head + body + tail
    return tokens, [False] * (len(tokens) - len(scored)) + scored, answer


def _training_depth(rng: random.Random) -> float:
    """A needle's depth (0..1) in training: uniform, and a tenth of the time each edge (0 and 1).
    A uniform depth almost never puts the needle right after the instructions or right before
    the question, and NIAH grids always test both."""
    u = rng.random()
    return 0.0 if u < EDGE else 1.0 if u < 2 * EDGE else rng.random()


def build_eval_prompt(tok, seq_len: int, seed: int, kind: str = "passkey",
                      depth: float | None = None) -> Sample:
    """A held-out retrieval sample (same layout as training), for exact-match evaluation."""
    rng = random.Random(sample_seed(seed, "eval", kind, seq_len, depth))
    tokens, scored, answer = build_retrieval(_Ids(tok), rng, seq_len, kind, depth)
    return _as_sample(f"eval:{seed}", kind, tokens, scored, answer)


def _as_sample(sample_id: str, kind: str, tokens: list[int], scored: list[bool] | None,
               answer: str = "") -> Sample:
    inputs, targets = tokens[:-1], tokens[1:]
    if scored is not None:  # score only the answers' tokens
        targets = [t if s else IGNORE for t, s in zip(targets, scored[1:])]
    return Sample(sample_id, kind, inputs, targets, answer)


def synthetic_corpus(rng: random.Random, n: int) -> list[str]:
    """Plain text in the style of the synthetic tasks, to train a tokenizer on."""
    texts = []
    for i in range(n):
        filler = "".join(rng.choice(FILLER) for _ in range(12))
        if i % 2:
            key = spaced_digits(rng)
            texts.append(PASSKEY_INTRO + filler + PASSKEY_NEEDLE.format(key=key) + filler
                         + PASSKEY_QUESTION + f" {key}")
        else:
            k = rng.choice(KEYS)
            pairs = "".join(f" {key} {spaced_digits(rng, 4)}."
                            for key in rng.sample(KEYS, KV_PAIRS))
            texts.append(KV_INTRO + filler + pairs + f" Now recall. {k} {spaced_digits(rng, 4)}."
                         + pairs)
    return texts


def read_documents(run: RunSpec, spec_dir: Path | None = None) -> list[str]:
    """Texts of data.documents (files or globs, relative to the run file's directory)."""
    base = spec_dir or Path.cwd()
    texts = []
    for pattern in run.data.documents:
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        matches = sorted(glob.glob(full))
        if not matches:
            raise FileNotFoundError(f"data.documents: {pattern!r} matches no file (looked for "
                                    f"{full}); fix the path or glob")
        texts += [Path(m).read_text(encoding="utf-8", errors="replace") for m in matches]
    return texts


def _kinds_and_weights(run: RunSpec) -> tuple[list[str], list[float]]:
    mix = run.data.mix
    kinds = [k for k, w in (("documents", mix.documents), ("passkey", mix.passkey),
                            ("kv_retrieval", mix.kv_retrieval)) if w > 0]
    return kinds, [getattr(mix, k) for k in kinds]


def _sample_rng(run: RunSpec, stage_name: str, step: int, micro: int, index: int):
    return random.Random(sample_seed(run.data.seed, stage_name, step, micro, index))


def document_samples(run: RunSpec, stage_index: int) -> np.ndarray:
    """For every sample of the stage in address order ((step, micro, index) flattened), how many
    document samples come before it: the k that addresses its prepared sequence. One entry more
    at the end: the stage's total."""
    stage = run.stages[stage_index]
    kinds, weights = _kinds_and_weights(run)
    if "documents" not in kinds:
        return np.zeros(1, np.int64)
    is_doc = np.fromiter(
        (_sample_rng(run, stage.name, step, micro, i).choices(kinds, weights=weights)[0]
         == "documents"
         for step in range(stage.steps) for micro in range(stage.grad_accum_steps)
         for i in range(stage.batch_size)), dtype=bool)
    return np.concatenate([[0], np.cumsum(is_doc)]).astype(np.int64)


def budget_problems(run: RunSpec, total_tokens: int, where: Path) -> list[str]:
    """Stages that would need more packed sequences than the prepared stream holds."""
    problems = []
    for i, stage in enumerate(run.stages):
        need = int(document_samples(run, i)[-1])
        have = stage_sequences(total_tokens, stage.seq_len)
        if need > have:
            n = stage.seq_len + 1
            problems.append(
                f"data.prepared: stage {stage.name} needs {need:,} document sequences of {n:,} "
                f"tokens ({need * n:,} tokens) but {where} holds {total_tokens:,} tokens "
                f"({have:,} sequences); add documents (or upsample), or lower the stage's "
                "steps, batch_size or mix.documents")
    return problems


class SampleStream:
    """The samples of one stage, addressed by (step, micro-step, index in the global batch)."""

    def __init__(self, run: RunSpec, stage_index: int, tok, documents: list[str] | None = None,
                 spec_dir: Path | None = None):
        self.run, self.stage_index = run, stage_index
        self.stage = run.stages[stage_index]
        self.ids = _Ids(tok)
        mix = run.data.mix
        self.kinds, self.weights = _kinds_and_weights(run)
        self.doc_tokens: list[int] = []
        self.corpus: PreparedCorpus | None = None
        if mix.documents > 0 and run.data.prepared is not None:
            self.corpus = PreparedCorpus(resolve(run.data.prepared.path, spec_dir))
            self._before = document_samples(run, stage_index)
            n = self.corpus.sequences(self.stage.seq_len)
            if n < self._before[-1]:
                raise ValueError(next(p for p in budget_problems(
                    run, self.corpus.total_tokens, self.corpus.path)
                    if f"stage {self.stage.name} " in p))
            self._perm = FeistelPermutation(n, run.data.seed, "prepared", self.stage.name)
        elif mix.documents > 0:
            for text in documents or []:
                self.doc_tokens += self.ids.enc(text) + [self.ids.eos]
            if len(self.doc_tokens) < 2:
                raise ValueError("data.documents: the files hold no text; add text or set "
                                 "mix.documents: 0")

    def document_sequence(self, step: int, micro: int, index: int) -> int:
        """The prepared sequence a document sample reads: perm(k), k its rank among the stage's
        document samples."""
        st = self.stage
        g = (step * st.grad_accum_steps + micro) * st.batch_size + index
        return self._perm(int(self._before[g]))

    def sample(self, step: int, micro: int, index: int) -> Sample:
        sid = f"{self.run.data.seed}:{self.stage.name}:{step}:{micro}:{index}"
        rng = _sample_rng(self.run, self.stage.name, step, micro, index)
        kind = rng.choices(self.kinds, weights=self.weights)[0]
        n = self.stage.seq_len + 1
        if kind == "documents" and self.corpus is not None:
            window = self.corpus.window(self.stage.seq_len,
                                        self.document_sequence(step, micro, index))
            labels = window.tokens[1:].copy()
            if window.mask is not None:
                labels[~window.mask[1:]] = IGNORE
            return Sample(sid, kind, window.tokens[:-1], labels)
        if kind == "documents":
            start = rng.randrange(len(self.doc_tokens))
            window = (self.doc_tokens * (n // len(self.doc_tokens) + 2))[start:start + n]
            return _as_sample(sid, kind, window, None)
        # One prompt per sequence: prompts packed together would share their cue ("The pass key
        # is") and leave the question ambiguous without masking attention between them.
        tokens, scored, answer = build_retrieval(self.ids, rng, self.stage.seq_len, kind)
        return _as_sample(sid, kind, tokens, scored, answer)

    def _document_piece(self, step: int, micro: int, index: int,
                        positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of a prepared document sample at `positions` only: each run of
        consecutive positions is one read of the memory map (a zigzag shard has two)."""
        n = self.stage.seq_len + 1
        offset = self.document_sequence(step, micro, index) * n
        inputs, labels = [], []
        for run in np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1):
            a, k = int(run[0]), len(run)
            tokens = self.corpus.read(offset + a, k + 1).astype(np.int64)
            target = tokens[1:].copy()
            if self.corpus.has_mask:
                target[self.corpus.read(offset + a + 1, k, "mask") == 0] = IGNORE
            inputs.append(tokens[:-1])
            labels.append(target)
        return np.concatenate(inputs), np.concatenate(labels)

    def batch(self, step: int, micro: int, indices: range, positions: torch.Tensor | None = None,
              shard_of=None) -> Batch:
        """Inputs (B, S), labels (B, S), sample ids and each row's document starts for the
        given global-batch indices; with `positions` (this rank's token positions, e.g. its
        zigzag shard) only those columns, and a prepared document sample reads only them. The
        document starts are always the whole sequence's (document_starts). With `shard_of`
        (a row's document starts -> (this rank's positions of that row, its DocumentLayout):
        sharding per document) each row is read at its own positions, and the Batch carries
        them and the layouts."""
        rows_in, rows_lab, ids, starts, rows_pos, layouts = [], [], [], [], [], []
        pos = None if positions is None else positions.cpu().numpy()

        def row_positions(row_starts: np.ndarray):
            if shard_of is None:
                return pos
            mine, layout = shard_of(torch.from_numpy(row_starts))
            rows_pos.append(mine)
            layouts.append(layout)
            return mine.numpy()

        for i in indices:
            sid = f"{self.run.data.seed}:{self.stage.name}:{step}:{micro}:{i}"
            if pos is not None and self.corpus is not None and self.kind(step, micro, i) \
                    == "documents":
                row_starts = self.document_starts(step, micro, i)
                x, y = self._document_piece(step, micro, i, row_positions(row_starts))
            else:
                s = self.sample(step, micro, i)
                x, y = (np.asarray(s.input_ids, dtype=np.int64),
                        np.asarray(s.labels, dtype=np.int64))
                row_starts = self._starts_of(s, step, micro, i)
                mine = row_positions(row_starts)
                if mine is not None:
                    x, y = x[mine], y[mine]
            rows_in.append(x)
            rows_lab.append(y)
            ids.append(sid)
            starts.append(torch.from_numpy(row_starts))
        return Batch(torch.from_numpy(np.stack(rows_in)), torch.from_numpy(np.stack(rows_lab)),
                     ids, starts, torch.stack(rows_pos) if rows_pos else None,
                     layouts or None)

    def document_starts(self, step: int, micro: int, index: int) -> np.ndarray:
        """Where the documents of sample (step, micro, index) begin: int64 global positions of
        its inputs (0 .. seq_len - 1), 0 first. Prepared documents: from the corpus's document
        starts alone, no token read; data.documents: after each EOS of the window (one that
        begins inside a document starts one at 0); a synthetic retrieval prompt is one
        document, [0]."""
        if self.kind(step, micro, index) != "documents":
            return np.zeros(1, np.int64)  # one document, beginning at 0
        if self.corpus is not None:
            return self.corpus.document_starts(self.stage.seq_len,
                                               self.document_sequence(step, micro, index))
        return starts_after_eos(self.sample(step, micro, index).input_ids, self.ids.eos)

    def _starts_of(self, sample: Sample, step: int, micro: int, index: int) -> np.ndarray:
        # document_starts of a sample already built (its small-corpus window is not drawn again)
        if sample.kind == "documents" and self.corpus is None:
            return starts_after_eos(sample.input_ids, self.ids.eos)
        return self.document_starts(step, micro, index)

    def kind(self, step: int, micro: int, index: int) -> str:
        """The source of sample (step, micro, index) (its rng's first draw, as in sample())."""
        rng = _sample_rng(self.run, self.stage.name, step, micro, index)
        return rng.choices(self.kinds, weights=self.weights)[0]
