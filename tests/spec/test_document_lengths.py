"""data.document_lengths: the histogram of packed document lengths the planner prices attention
`document` with. A bad one is one line naming the field and the fix; counts are bounded and
finite like the rest of the RunSpec."""

import re
from pathlib import Path

import pytest
import yaml

from specs.loading import SpecError, validate_data
from specs.run import MAX_LENGTH_BUCKETS, RunSpec

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def run_with(buckets) -> RunSpec:
    return validate_data({**TINY, "data": {**TINY.get("data", {}), "document_lengths": buckets}},
                         RunSpec, source="run.yaml")


def test_a_histogram_is_kept_as_written():
    run = run_with([{"max_tokens": 1024, "share": 0}, {"max_tokens": 8192, "share": 60},
                    {"max_tokens": 65536, "share": 40}])
    assert [(b.max_tokens, b.share) for b in run.data.document_lengths] == [
        (1024, 0), (8192, 60), (65536, 40)]


def test_no_histogram_by_default():
    assert validate_data(TINY, RunSpec, source="run.yaml").data.document_lengths == []


@pytest.mark.parametrize(("buckets", "where", "problem"), [
    ([{"max_tokens": 4096, "share": 1}, {"max_tokens": 1024, "share": 1}],
     "data.document_lengths", r"max_tokens must increase from bucket to bucket, got \[4096, "
                              r"1024\]; list the buckets shortest first"),
    ([{"max_tokens": 4096, "share": 1}, {"max_tokens": 4096, "share": 1}],
     "data.document_lengths", r"max_tokens must increase"),
    ([{"max_tokens": 4096, "share": 0}], "data.document_lengths",
     r"every share is 0; give the buckets that hold documents a positive share"),
    ([{"max_tokens": 10**12 * 2, "share": 1}], "data.document_lengths[0].max_tokens",
     r"less than or equal to 1099511627776"),
    ([{"max_tokens": 0, "share": 1}], "data.document_lengths[0].max_tokens",
     r"greater than 0"),
    ([{"max_tokens": 4096, "share": 1e12}], "data.document_lengths[0].share",
     r"less than or equal to 1000000"),
    ([{"max_tokens": 4096, "share": -1}], "data.document_lengths[0].share",
     r"greater than or equal to 0"),
    ([{"max_tokens": 4096, "share": float("inf")}], "data.document_lengths[0].share",
     r"finite number"),
    ([{"max_tokens": 4096, "share": float("nan")}], "data.document_lengths[0].share",
     r"finite number"),
    ([{"max_tokens": 4096}], "data.document_lengths[0].share",
     r"required field is missing \(add it"),
    ([{"max_tokens": 4096, "share": 1, "count": 3}], "data.document_lengths[0].count",
     r"unknown field \(got 3; allowed: max_tokens, share\)"),
    ([{"max_tokens": 1 + i, "share": 1} for i in range(MAX_LENGTH_BUCKETS + 1)],
     "data.document_lengths", r"at most 64 items"),
])
def test_a_bad_histogram_is_one_error_naming_the_field(buckets, where, problem):
    with pytest.raises(SpecError) as e:
        run_with(buckets)
    lines = [line for line in str(e.value).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"{where}: " in lines[0]
    assert re.search(problem, lines[0]), lines[0]
