"""Document boundaries from the data: every source gives each row the whole sequence's document
starts, and a rank's segments and per-document positions, read by address, are those of the
whole sequence at its positions (for every rank of a ring of 32, and a Ulysses x ring split).

The references walk the whole sequence's tokens once (a document begins after each EOS), apart
from the readers; for prepared corpora they also agree with the corpus's doc_starts.npy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_jobs.data.prepare import prepare
from ray_jobs.data.samples import SampleStream
from ray_jobs.data.tokenizer import build_tokenizer
from ray_jobs.ring_attention.documents import (
    balanced_layout,
    document_index,
    document_position_ids,
)
from ray_jobs.ring_attention.ulysses import layout_position_ids, sequence_position_ids
from specs.run import RunSpec
from tests.data.corpus import conversations, documents, write_chat, write_jsonl
from tests.train.conftest import mini_spec

SEQ = 256
ROWS = 2
STEPS = 4
# (ring, ulysses): a ring of 32 (zigzag chunks of 4 tokens), and Ulysses 4 x ring 8
SPLITS = [(32, 1), (8, 4)]


def _run(tmp_path, mix: dict, **data) -> RunSpec:
    spec = mini_spec(tmp_path / "runs", **{"data.mix": mix})
    spec["stages"] = [{**spec["stages"][0], "seq_len": SEQ, "steps": STEPS,
                       "batch_size": ROWS}]
    spec["data"].update(data)
    return RunSpec.model_validate(spec)


def whole_sequence(inputs: np.ndarray, eos: int) -> tuple[list[int], list[int], list[int]]:
    """(document starts, segment of every position, position inside its document) of a whole
    sequence's inputs, walking them once: a document begins at 0 and after each EOS."""
    starts, segments, positions = [], [], []
    for p in range(len(inputs)):
        if p == 0 or inputs[p - 1] == eos:
            starts.append(p)
        segments.append(len(starts) - 1)
        positions.append(p - starts[-1])
    return starts, segments, positions


def _check_every_rank(stream: SampleStream, eos: int) -> int:
    """Every rank's rows, read by address, against the whole sequence; returns how many rows
    held more than one document (so a test can tell it checked boundaries at all)."""
    packed = permuted = 0
    for step in range(STEPS):
        whole = stream.batch(step, 0, range(ROWS))
        refs = [whole_sequence(row.numpy(), eos) for row in whole.inputs]
        for row, (starts, _, _) in enumerate(refs):
            assert whole.doc_starts[row].tolist() == starts
            assert whole.doc_starts[row].dtype == torch.int64
            packed += len(starts) > 1
        for ring, uly in SPLITS:
            for r in range(ring):
                for u in range(uly):
                    pos = sequence_position_ids(SEQ, r, ring, u, uly)
                    part = stream.batch(step, 0, range(ROWS), pos)
                    for row, (starts, segments, positions) in enumerate(refs):
                        got = part.doc_starts[row]
                        assert got.tolist() == starts, (step, ring, uly, r, u, row)
                        assert document_index(pos, got).tolist() == \
                            [segments[p] for p in pos.tolist()]
                        assert document_position_ids(pos, got).tolist() == \
                            [positions[p] for p in pos.tolist()]
                    # sharded per document (the trainer's shard_of on a ring): each row read
                    # at its own layout's positions, the whole row's tokens there
                    balanced = stream.batch(step, 0, range(ROWS), pos, _shard_of(r, ring, u, uly))
                    for row, (starts, segments, _) in enumerate(refs):
                        own = balanced.positions[row]
                        assert balanced.layouts[row].world == ring
                        assert torch.equal(balanced.inputs[row], whole.inputs[row][own])
                        assert torch.equal(balanced.labels[row], whole.labels[row][own])
                        assert document_index(own, balanced.doc_starts[row]).tolist() == \
                            [segments[p] for p in own.tolist()]
                        permuted += not balanced.layouts[row].is_plain
    assert permuted or not packed, "no packed row was sharded other than by zigzag"
    return packed


def _shard_of(r: int, ring: int, u: int, uly: int):
    def shard_of(starts: torch.Tensor):
        layout = balanced_layout(starts, SEQ, ring)
        return layout_position_ids(layout, r, ring, u, uly), layout
    return shard_of


def test_prepared_chat_and_web_rows_read_their_segments_by_address(tmp_path):
    """A chat + web corpus: the starts come from doc_starts.npy without reading a token, equal
    the EOS walk of the whole sequence, and a rank still reads only its own tokens."""
    write_jsonl(tmp_path / "in" / "web.jsonl", documents(1, 60, lo=5, hi=120))
    write_chat(tmp_path / "in" / "chat.jsonl", conversations(2, 30))
    run = _run(tmp_path, {"documents": 1.0, "passkey": 0, "kv_retrieval": 0},
               prepared={"path": str(tmp_path / "prepared"), "dedup": False,
                         "shard_tokens": 1024,
                         "sources": [{"name": "web", "paths": ["in/web.jsonl"]},
                                     {"name": "chat", "paths": ["in/chat.jsonl"],
                                      "kind": "chat", "field": "messages"}]})
    prepare(run, tmp_path, run.run_dir, engine="local", log=lambda _: None)
    stream = SampleStream(run, 0, build_tokenizer(run, run.run_dir), spec_dir=tmp_path)
    corpus = stream.corpus
    assert corpus.has_mask  # the chat source's trained-on mask is there
    eos = corpus.eos
    for step in range(STEPS):  # the corpus's own record of where documents begin
        for i in range(ROWS):
            j = stream.document_sequence(step, 0, i)
            window = corpus.window(SEQ, j)
            recorded = [0] + [s for s in window.doc_starts.tolist() if 0 < s < SEQ]
            assert whole_sequence(window.tokens[:-1], eos)[0] == recorded
    # the edge: a document whose first token is a sequence's last label, not one of its inputs
    stream_starts = np.load(corpus.path / "doc_starts.npy")
    length, j = next((n, int(s) // (n + 1)) for n in range(64, 1024) for s in stream_starts
                     if s % (n + 1) == n and (s // (n + 1) + 1) * (n + 1) <= corpus.total_tokens)
    window = corpus.window(length, j)
    assert window.doc_starts[-1] == length  # (the window's own list holds it)
    assert corpus.document_starts(length, j).tolist() == \
        whole_sequence(window.tokens[:-1], eos)[0]
    reads = []
    original = corpus.read

    def recording(offset, n, kind="tokens"):
        reads.append((offset, n, kind))
        return original(offset, n, kind)

    corpus.read = recording
    try:
        starts = stream.document_starts(1, 0, 0)
        assert reads == [] and starts[0] == 0  # the starts alone read no token
        pos = sequence_position_ids(SEQ, 5, 32, 0, 1)  # chunks 5 and 58 of 64: 8 tokens
        stream.batch(1, 0, range(1), pos)
        assert sum(n for _, n, kind in reads if kind == "tokens") == len(pos) + 2  # + labels
    finally:
        corpus.read = original
    assert _check_every_rank(stream, eos) >= STEPS  # rows of several documents among them


def test_small_corpus_rows_start_a_document_after_each_eos(tmp_path):
    """data.documents: EOS-joined files; a window that begins inside a document starts one at
    0, and one after every EOS it holds."""
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"d{k}.txt")
        paths[-1].write_text(" ".join(documents(10 + k, 3, lo=20, hi=60)))
    run = _run(tmp_path, {"documents": 1.0, "passkey": 0, "kv_retrieval": 0},
               documents=[str(p) for p in paths])
    tok = build_tokenizer(run, run.run_dir)
    stream = SampleStream(run, 0, tok, [p.read_text() for p in paths])
    assert stream.doc_tokens.count(tok.eos_token_id) == 3
    assert _check_every_rank(stream, tok.eos_token_id) >= STEPS


def test_synthetic_retrieval_rows_are_one_document(tmp_path):
    run = _run(tmp_path, {"documents": 0, "passkey": 0.5, "kv_retrieval": 0.5})
    tok = build_tokenizer(run, run.run_dir)
    stream = SampleStream(run, 0, tok)
    for step in range(STEPS):
        pos = sequence_position_ids(SEQ, 3, 32, 0, 1)
        batch = stream.batch(step, 0, range(ROWS), pos)
        assert [s.tolist() for s in batch.doc_starts] == [[0]] * ROWS
        assert document_position_ids(pos, batch.doc_starts[0]).tolist() == pos.tolist()
    assert _check_every_rank(stream, tok.eos_token_id) == 0  # no EOS inside a prompt


@pytest.mark.parametrize("starts, positions, want", [
    ([0], [0, 7, 3], [0, 7, 3]),
    ([0, 4, 9], [0, 3, 4, 8, 9, 15], [0, 3, 0, 4, 0, 6]),
])
def test_per_document_positions_restart_at_each_start(starts, positions, want):
    got = document_position_ids(torch.tensor(positions), torch.tensor(starts))
    assert got.tolist() == want
