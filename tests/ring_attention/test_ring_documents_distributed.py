"""Multi-process gloo checks of document-masked ring attention against a per-document reference
on the whole sequence: forward output and q/k/v gradients, causal zigzag, 2 to 4 ranks."""

from itertools import product

import pytest
import torch
from document_worlds import document_world, ulysses_document_world

from tests.support.worlds import run_world

pytestmark = pytest.mark.multiprocess

LAYOUTS = ("one", "crossing", "long", "tiny", "mixed")
CASES = [dict(dtype=dtype, heads=heads, layout=layout)
         for dtype, heads, layout in product((torch.float32, torch.bfloat16), ("gqa", "mha"),
                                             LAYOUTS)]
# The same documents on shards of the sequence permuted by balanced_layout (per-document
# balance): documents cut into 2P chunks of their own, short ones placed whole.
BALANCED = [dict(c, balanced=True) for c in CASES if c["heads"] == "gqa"]
# Masked blocks as rectangles of the plain kernel (documents.block_rects), forced at these
# sizes: plain and balanced layouts, both dtypes.
RECTS = [dict(c, rects=True) for c in CASES + BALANCED if c["heads"] == "gqa"]


def test_documents_on_two_ranks():
    results = run_world(2, document_world, CASES)
    assert [len(r) for r in results] == [len(CASES)] * 2


def test_documents_on_three_ranks_gqa():
    cases = [c for c in CASES if c["heads"] == "gqa"]
    results = run_world(3, document_world, cases)
    assert [len(r) for r in results] == [len(cases)] * 3


def test_documents_on_four_ranks():
    # Every layout in both dtypes; the head layouts alternate.
    cases = [c for c in CASES if (c["heads"] == "gqa") == (
        (LAYOUTS.index(c["layout"]) + (c["dtype"] == torch.bfloat16)) % 2 == 0)]
    assert {c["layout"] for c in cases} == set(LAYOUTS) and len(cases) == 10
    results = run_world(4, document_world, cases)
    assert [len(r) for r in results] == [len(cases)] * 4


def test_documents_through_ulysses_two_by_ring_two():
    # After Ulysses' all-to-all each rank holds its ring position's zigzag shard: doc_starts
    # pass through unchanged. GQA 4:1 replicates the one K/V head over the Ulysses pair.
    cases = [dict(dtype=torch.float32, heads=heads, layout=layout)
             for heads, layout in (("gqa", "crossing"), ("mha", "tiny"), ("gqa", "long"))]
    results = run_world(4, ulysses_document_world, 2, 2, cases, timeout_s=240)
    assert [len(r) for r in results] == [len(cases)] * 4


@pytest.mark.parametrize("world", [2, 3, 4])
def test_balanced_layouts_match_the_reference(world):
    results = run_world(world, document_world, BALANCED)
    assert [len(r) for r in results] == [len(BALANCED)] * world


@pytest.mark.parametrize("world", [2, 3, 4])
def test_masked_blocks_as_rectangles_match_the_reference(world):
    results = run_world(world, document_world, RECTS)
    assert [len(r) for r in results] == [len(RECTS)] * world


def test_balanced_layout_through_ulysses_two_by_ring_two():
    cases = [dict(dtype=torch.float32, heads=heads, layout=layout, balanced=True, rects=rects)
             for heads, layout, rects in (("gqa", "mixed", True), ("mha", "tiny", False),
                                          ("gqa", "long", True))]
    results = run_world(4, ulysses_document_world, 2, 2, cases, timeout_s=240)
    assert [len(r) for r in results] == [len(cases)] * 4
