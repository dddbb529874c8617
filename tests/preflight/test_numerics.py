"""The numerics check on gloo worlds of 2 and 4 ranks with the real block kernel: every rank's
errors are reported and within the ring tests' tolerances; a ring listed out of order is
caught, and the finding names its ranks."""

import pytest
from preflight_worlds import numerics_cases_world, numerics_world

from ray_jobs.preflight.numerics import OUTPUTS, TOLERANCE, numerics_finding
from tests.support.worlds import run_world

pytestmark = pytest.mark.multiprocess


def _within_tolerance(result: dict, world: int) -> None:
    assert result["ok"] and result["failed"] == [], result
    assert sorted(r["rank"] for r in result["ranks"]) == list(range(world))
    assert (result["atol"], result["rtol"]) == TOLERANCE[result["dtype"]]
    for r in result["ranks"]:
        assert set(r["errors"]) == set(OUTPUTS)
        assert all(0 <= e < 1 for e in r["errors"].values()), r
        # every element within atol + rtol x |reference|, torch.testing.assert_close's rule
        assert 0 <= r["excess"] <= 1, r
    assert numerics_finding(result) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_ranks_agree_with_unsharded_attention(dtype):
    first, second = run_world(2, numerics_world, [[1, 0]], 1, dtype)
    assert second is None  # rank 0 reports for the world
    _within_tolerance(first, 2)
    assert {r["rank"]: r["ring_position"] for r in first["ranks"]} == {1: 0, 0: 1}


def test_four_ranks_agree_and_a_ring_out_of_order_is_caught():
    results = run_world(4, numerics_cases_world)
    got = results[0]
    assert all(r is None for other in results[1:] for r in other.values())
    for name in ("ring4 float32", "ring4 bfloat16", "ulysses2 x ring2", "two rings"):
        _within_tolerance(got[name], 4)
    wrong = got["out of order"]
    assert not wrong["ok"]
    # ranks 1 and 2 swapped places on the wire: their outputs come out of the wrong blocks
    assert {1, 2} <= set(wrong["failed"])
    outputs = {r["rank"]: r["errors"]["out"] for r in wrong["ranks"]}
    assert min(outputs[1], outputs[2]) > 1e3 * TOLERANCE["float32"][0], outputs
    line = numerics_finding(wrong)
    assert line.startswith(f"numerics: ranks {', '.join(map(str, wrong['failed']))} differ")
