"""Document masking priced: the planner's own pair counts against the kernel's block table, the
packed-sequence sampling, the cost model's document phases and the histogram's sources."""

import json

import numpy as np
import pytest
import torch
from topology_helpers import small_run

from ray_jobs.data.prepare import document_length_histogram
from ray_jobs.data.prepared import MANIFEST
from ray_jobs.ring_attention.documents import SKIP, plan_document_steps, plan_document_table
from specs.degrees import ParallelDims
from specs.run import DataSpec, DocumentLengthBucket
from topology.cost import FlowResult, StageShape, predict_stage, stage_attention
from topology.documents import (
    MANIFEST as TOPOLOGY_MANIFEST,
)
from topology.documents import (
    DocumentWork,
    document_work,
    histogram_of,
    sample_doc_starts,
    with_corpus_document_lengths,
    zigzag_block_pairs,
)
from topology.profile import L40S


def layouts(world: int) -> dict[str, tuple[int, list[int]]]:
    """(seq_len, document starts) of the layouts the kernel's tests name, on a ring of `world`:
    shards of 12 tokens (chunks of 6)."""
    seq_len = 12 * world
    shard = seq_len // world
    return {
        "one document": (seq_len, [0]),
        "many tiny": (seq_len, list(range(0, seq_len, 2))),
        "one token each": (seq_len, list(range(seq_len))),
        "one longer than a shard": (seq_len, [0, 1, 1 + shard + 3] if seq_len > 1 + shard + 3
                                    else [0, 1]),
        "crossing ranks": (seq_len, sorted({0, *range(5, seq_len, 7)})),
        "last token alone": (seq_len, [0, seq_len - 1]),
    }


CASES = [(world, name) for world in range(1, 6) for name in layouts(world)]


@pytest.mark.parametrize(("world", "name"), CASES, ids=[f"R{w}-{n}" for w, n in CASES])
def test_block_pairs_match_the_kernels_block_table(world, name):
    seq_len, starts = layouts(world)[name]
    mine = zigzag_block_pairs(world, seq_len, np.array(starts))
    table = plan_document_table(world, seq_len, torch.tensor(starts))
    assert mine.sum(axis=1).tolist() == table.pairs  # per rank
    for rank in range(world):
        blocks = plan_document_steps(rank, world, seq_len // world, torch.tensor(starts))
        assert mine[rank].tolist() == [b.pairs for b in blocks]  # per (rank, step)
        assert [b.kind == SKIP for b in blocks] == (mine[rank] == 0).tolist()
    lengths = np.diff(starts + [seq_len])
    assert mine.sum() == (lengths * (lengths + 1) // 2).sum()


def test_block_pairs_match_on_random_layouts():
    rng = np.random.default_rng(7)
    for _ in range(60):
        world = int(rng.integers(1, 6))
        seq_len = 2 * world * int(rng.integers(1, 20))
        n = int(rng.integers(1, min(seq_len, 12) + 1))
        starts = [0, *sorted(rng.choice(np.arange(1, seq_len), n - 1, replace=False).tolist())]
        mine = zigzag_block_pairs(world, seq_len, np.array(starts))
        assert mine.sum(axis=1).tolist() == plan_document_table(
            world, seq_len, torch.tensor(starts)).pairs, (world, seq_len, starts)


def test_one_document_is_balanced_causal_work():
    # Zigzag balances one causal sequence exactly: each rank S (S + 1) / (2 R) pairs.
    seq_len, world = 4096, 4
    pairs = zigzag_block_pairs(world, seq_len, np.array([0]))
    assert pairs.sum(axis=1).tolist() == [seq_len * (seq_len + 1) / 2 / world] * world


# ---- sampling ------------------------------------------------------------------------------

def test_sampled_sequences_are_valid_document_starts():
    hist = histogram_of([DocumentLengthBucket(max_tokens=100, share=1),
                         DocumentLengthBucket(max_tokens=5000, share=3)])
    rng = np.random.default_rng(0)
    for _ in range(20):
        starts = sample_doc_starts(hist, 4096, rng)
        assert starts[0] == 0 and (np.diff(starts) > 0).all() and starts[-1] < 4096
        inner = np.diff(starts)[1:]  # whole documents (the first is what the cut left of one)
        assert ((inner >= 1) & (inner <= 5000)).all()


def test_documents_of_one_length_give_the_expected_pairs():
    # Every document L tokens long: about S / L documents of L (L + 1) / 2 pairs each, so the
    # work is (L + 1) / (S + 1) of causal (a little less: the cut documents at both ends).
    length, seq_len = 1000, 65536
    hist = ((length - 1, 0.0), (length, 1.0))
    work = document_work(hist, seq_len, 4)
    assert work.mean == pytest.approx((length + 1) / (seq_len + 1), rel=0.02)
    assert work.mean < (length + 1) / (seq_len + 1)


def test_documents_longer_than_the_sequence_are_causal():
    hist = ((10**9 - 1, 0.0), (10**9, 1.0))  # a boundary falls in a sequence once in 250,000
    work = document_work(hist, 4096, 4)
    assert work.mean == pytest.approx(1.0) and work.imbalance == pytest.approx(1.0)
    assert work.skipped == 0


def test_short_documents_unbalance_zigzag_and_skip_blocks():
    hist = ((1024, 0.0), (4096, 1.0))
    rng = np.random.default_rng(0)
    starts = [sample_doc_starts(hist, 65536, rng) for _ in range(8)]
    zigzag = np.stack([zigzag_block_pairs(8, 65536, s) for s in starts])
    causal = 65536 * 65537 / 2
    assert zigzag.sum() / len(starts) / causal < 0.1  # ~2.5K-token documents: ~4% of causal
    ranks = zigzag.sum(axis=2)
    assert (ranks.max(axis=1) / ranks.mean(axis=1)).mean() > 1.15  # measured 1.23
    assert (zigzag == 0).mean() > 0.5  # far blocks see only the documents crossing chunks


def test_sharded_per_document_the_ranks_even_out():
    # what the trainer runs on a ring, and so what the planner prices (document_work): the
    # same documents cut or placed whole so every rank's pairs are within a few % of the mean;
    # the documents cut into 2R chunks leave few blocks with nothing to compute
    work = document_work(((1024, 0.0), (4096, 1.0)), 65536, 8)
    assert work.mean < 0.1
    assert 1.0 <= work.imbalance <= 1.05
    rng = np.random.default_rng(1)
    for _ in range(4):
        starts = sample_doc_starts(((1024, 0.3), (65536, 0.7)), 262144, rng)
        plain = zigzag_block_pairs(8, 262144, starts).sum(axis=1)
        balanced = zigzag_block_pairs(8, 262144, starts, balanced=True).sum(axis=1)
        assert balanced.sum() == pytest.approx(plain.sum())
        assert balanced.max() <= plain.max()
        assert balanced.max() / balanced.mean() <= 1.05


def test_the_estimate_is_reproducible():
    hist = ((1024, 0.0), (65536, 1.0), (1 << 20, 1.0))
    document_work.cache_clear()
    first = document_work(hist, 262144, 8).blocks
    document_work.cache_clear()
    assert np.array_equal(first, document_work(hist, 262144, 8).blocks)


# ---- the cost model ------------------------------------------------------------------------

def test_a_skipped_block_exposes_its_transfer():
    # Two samples of a ring of 2 (rows: ranks, columns: steps; 1 = a causal block's pairs);
    # blocks of 2 s, a 3 s hop in flight during step 0 only (none after the last step).
    work = DocumentWork(np.array([[[1.0, 1.0], [1.0, 0.0]], [[1.5, 0.5], [0.0, 1.0]]]))
    compute, exposed = work.phase_seconds(block_seconds=2.0, hop_seconds=3.0, overlap=1.0)
    # sample 0: rank 0 computes 2 + 2 s and waits 3 - 2 s: 5 s; rank 1 2 + 0 s, waits 1 s: 3 s.
    # sample 1: rank 0 3 + 1 s, its 3 s block hides the hop: 4 s; rank 1 skips step 0, so
    # its hop shows whole: 0 + 2 s computed, 3 s waited: 5 s, the slowest.
    assert (compute, exposed) == pytest.approx(((4 + 2) / 2, (1 + 3) / 2))
    assert work.busiest == pytest.approx(1.0) and work.skipped == pytest.approx(0.25)


def _costs(run, dims, gb_s: float | None = 100.0):
    """The stage priced causal and document on a made-up ring hop of `gb_s` (None: free)."""
    dp = FlowResult(0.0, 0.0, float("inf"), None, {}, [])
    ring = FlowResult(0.0, 1e-5, gb_s, ("a", "b"), {}, []) if gb_s else dp
    shape = StageShape.of(run, run.stages[0], dims)
    return {a: predict_stage(shape.with_attention(a), ring, dp, L40S) for a in
            ("causal", "document")}


def with_histogram(run, buckets):
    data = run.data.model_copy(update={"document_lengths": [DocumentLengthBucket(**b)
                                                            for b in buckets]})
    return run.model_copy(update={"data": data})


def test_document_masking_prices_allowed_pairs_of_the_busiest_rank():
    run = with_histogram(small_run(ring=8, dp=1, seq_len=65536),
                         [{"max_tokens": 1024, "share": 0}, {"max_tokens": 4096, "share": 1}])
    dims = ParallelDims(ring=8)
    costs = _costs(run, dims, gb_s=None)
    causal, document = costs["causal"], costs["document"]
    work = document_work(histogram_of(run.data.document_lengths), 65536, 8)
    # with free transfers, attention compute scales with the busiest rank's pairs
    assert (document.parts["attention compute"] / causal.parts["attention compute"]
            == pytest.approx(work.busiest, rel=1e-9))
    # a hop that a causal block hides shows behind the skipped blocks
    costs = _costs(run, dims, gb_s=100.0)
    causal, document = costs["causal"], costs["document"]
    assert document.parts["exposed ring K/V"] > causal.parts["exposed ring K/V"] == 0
    assert document.parts["dense compute"] == causal.parts["dense compute"]
    assert document.step_seconds < causal.step_seconds
    assert document.memory == causal.memory


def test_one_long_document_prices_as_causal():
    run = with_histogram(small_run(ring=4, dp=1, seq_len=16384),
                         [{"max_tokens": 10**9 - 1, "share": 0}, {"max_tokens": 10**9,
                                                                  "share": 1}])
    costs = _costs(run, ParallelDims(ring=4))
    assert costs["document"].step_seconds == pytest.approx(costs["causal"].step_seconds,
                                                           rel=1e-3)


def test_document_without_a_histogram_is_priced_as_causal():
    run = small_run(ring=4, dp=1, seq_len=16384)
    costs = _costs(run, ParallelDims(ring=4))
    assert costs["document"].step_seconds == costs["causal"].step_seconds


def test_the_stage_attention_is_read_in_one_place():
    run = small_run(ring=4, dp=1)
    stage = run.stages[0]
    assert stage_attention(stage) == "causal"
    document = stage.model_copy(update={"attention": "document"})
    assert stage_attention(document) == "document"
    assert StageShape.of(run, document, ParallelDims(ring=4)).attention == "document"


# ---- where the histogram comes from --------------------------------------------------------

def test_the_manifest_name_is_the_prepare_jobs():
    assert TOPOLOGY_MANIFEST == MANIFEST


def test_the_prepare_jobs_histogram_is_a_valid_document_lengths():
    starts = np.array([0, 3, 1003, 1503, 3503])  # lengths 3, 1000, 500, 2000, 497
    buckets = document_length_histogram(starts, 4000)
    spec = DataSpec.model_validate({"document_lengths": buckets})
    assert [b.max_tokens for b in spec.document_lengths] == [2, 4, 8, 16, 32, 64, 128, 256, 512,
                                                            1024, 2048]
    shares = {b.max_tokens: b.share for b in spec.document_lengths}
    assert shares[4] == 3 / 4000 and shares[512] == 997 / 4000
    assert shares[1024] == 1000 / 4000 and shares[2048] == 2000 / 4000
    # trimmed below: the first kept bucket is the empty one under the shortest document's
    assert document_length_histogram(np.array([0]), 3000)[0] == {"max_tokens": 2048,
                                                                 "share": 0.0}


def prepared_run(tmp_path, manifest: dict | str | None):
    run = small_run()
    run = with_histogram(run, [{"max_tokens": 4096, "share": 1}])
    prepared = {"path": "data", "sources": [{"name": "web", "paths": ["web.jsonl"]}]}
    data = DataSpec.model_validate({**run.data.model_dump(), "prepared": prepared})
    if manifest is not None:
        (tmp_path / "data").mkdir()
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (tmp_path / "data" / MANIFEST).write_text(text)
    return run.model_copy(update={"data": data})


def test_the_corpus_histogram_replaces_the_run_files(tmp_path):
    run = prepared_run(tmp_path, {"documents": 12, "document_lengths": [
        {"max_tokens": 512, "share": 0.0}, {"max_tokens": 1024, "share": 1.0}]})
    planned, notes = with_corpus_document_lengths(run, tmp_path)
    assert [b.max_tokens for b in planned.data.document_lengths] == [512, 1024]
    assert "prepared corpus" in notes[0] and "12 documents" in notes[0]


def test_a_manifest_without_a_histogram_keeps_the_run_files_and_says_so(tmp_path):
    run = prepared_run(tmp_path, {"documents": 12})
    planned, notes = with_corpus_document_lengths(run, tmp_path)
    assert planned.data.document_lengths == run.data.document_lengths
    assert "no document-length histogram" in notes[0] and "--force" in notes[0]
    assert "data.document_lengths of the run file" in notes[1]


def test_no_manifest_keeps_the_run_files(tmp_path):
    run = prepared_run(tmp_path, None)
    planned, notes = with_corpus_document_lengths(run, tmp_path)
    assert planned is run and notes == [
        "document lengths: data.document_lengths of the run file, an assumption until the "
        "corpus is prepared (its manifest then gives the measured one)"]


@pytest.mark.parametrize(("manifest", "problem"), [
    ("{not json", "unreadable"),
    ({"document_lengths": [{"max_tokens": 8, "share": 1}, {"max_tokens": 4, "share": 1}]},
     "document_lengths is not a histogram"),
])
def test_a_bad_manifest_is_one_error_naming_it(tmp_path, manifest, problem):
    run = prepared_run(tmp_path, manifest)
    with pytest.raises(ValueError, match=problem) as e:
        with_corpus_document_lengths(run, tmp_path)
    assert str(tmp_path / "data" / MANIFEST) in str(e.value) and "ray_jobs.prepare" in str(e.value)
