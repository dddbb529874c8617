"""specs.degrees.resolve_degrees: the one resolver of 'auto' degrees, tested as a pure function."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from specs.degrees import DegreeError, NothingFits, ParallelDims, degree_options, resolve_degrees


def stage(ring="auto", dp="auto", shard="auto", seq_len=4096, batch_size=8):
    return SimpleNamespace(name="s", seq_len=seq_len, batch_size=batch_size, ring_degree=ring,
                           data_parallel_degree=dp, shard_degree=shard)


def test_options_smallest_ring_first_then_most_rings():
    options = degree_options(stage(batch_size=4), 8, "8 workers")
    assert options[:4] == [(1, 4), (1, 2), (1, 1), (2, 4)]
    assert options[-1] == (8, 1)
    assert all(x * y <= 8 and 4 % y == 0 for x, y in options)


def test_memory_model_picks_the_first_layout_that_fits():
    # pretend memory fits from ring 4 on, sharded over two rings
    fits = {(4, 2): ParallelDims.of(4, 2, 8)}
    dims, notes = resolve_degrees(stage(), 8, "8 workers", shard_for=lambda r, d: fits.get((r, d)))
    assert (dims.ring, dims.dp, dims.shard, dims.dp_replicate) == (4, 2, 8, 1)
    assert "auto degrees: ring 4 x dp 2, shard 8" in notes[0]


def test_a_ring_whose_most_rings_do_not_fit_is_skipped():
    calls = []

    def shard_for(ring, dp):
        calls.append((ring, dp))
        return ParallelDims.of(ring, dp, ring) if ring == 8 else None
    dims, _ = resolve_degrees(stage(), 8, "8 workers", shard_for=shard_for)
    assert (dims.ring, dims.dp) == (8, 1)
    assert calls == [(1, 8), (2, 4), (4, 2), (8, 1)]  # one try per ring: fewer rings shard less


def test_nothing_fits_lists_what_was_tried():
    with pytest.raises(NothingFits, match=r"no layout of 's' on 4 workers fits memory") as e:
        resolve_degrees(stage(ring=2, dp=2, batch_size=2), 4, "4 workers",
                        shard_for=lambda r, d: None)
    assert e.value.tried == [(2, 2)]


def test_without_a_memory_model_the_largest_ring():
    dims, notes = resolve_degrees(stage(seq_len=96), 8, "8 workers")
    # 96 tokens zigzag over rings of 1, 2, 3, 4, 6 and 8: the largest is 8
    assert (dims.ring, dims.dp) == (8, 1)
    dims, notes = resolve_degrees(stage(seq_len=36), 8, "8 workers")
    assert (dims.ring, dims.dp) == (6, 1) and "uses 6 of 8 workers" in notes[-1]


@pytest.mark.parametrize("kw, world, message", [
    (dict(ring=4, dp=4), 8, r"4 x 4 = 16 workers, but 8 workers; lower the degrees or add"),
    (dict(ring=3), 8, r"ring_degree 3 does not divide the 8 workers \(8 workers\); use one that "
     r"does \(e.g. \[1, 2, 4, 8\]\)"),
    (dict(ring=16), 8, r"ring_degree 16 needs 16 workers, but 8 workers"),
    (dict(dp=16, batch_size=16), 8, r"data_parallel_degree 16 needs 16 workers"),
    (dict(ring=2, dp=2, shard=6), 4, r"shard_degree \(6\) must be ring_degree \(2\) times a "
     r"divisor of data_parallel_degree \(2\); use one of \[2, 4\]"),
])
def test_bad_degrees_are_one_clear_error(kw, world, message):
    with pytest.raises(DegreeError, match=message):
        resolve_degrees(stage(**kw), world, f"{world} workers")


def test_strict_off_leaves_workers_idle_for_a_ring_that_does_not_divide():
    dims, notes = resolve_degrees(stage(ring=3, seq_len=96), 8, "8 workers", strict=False)
    assert (dims.ring, dims.dp) == (3, 2) and "uses 6 of 8 workers" in notes[-1]
