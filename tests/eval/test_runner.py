"""The harness can pass and fail: an oracle scores 1.0, a constant ~0; outputs are written."""

import json

import pytest

from ray_jobs.eval import tasks
from ray_jobs.eval.results import load_results
from ray_jobs.eval.runner import evaluate, plan_lengths
from specs.eval_tasks import ALL_TASKS, DEPTH_TASKS, NO_DEPTH_TASKS
from tests.eval.oracle import constant, oracle


def _essay() -> str:
    import random

    rng = random.Random(5)
    return "\n\n".join(" ".join(tasks.filler_sentence(rng) for _ in range(10))
                       for _ in range(20))


# Every task, Kamradt's on a haystack of plain sentences and a grid of 3 depths like the others.
GRID = dict(tasks=list(ALL_TASKS), lengths=[384, 640], depths=[0.0, 50.0, 100.0],
            samples=2, seed=11, kamradt=tasks.Kamradt(haystack=_essay()), kamradt_intervals=3)


def test_oracle_scores_one_on_every_task(count_tokens, tmp_path):
    res = evaluate(oracle, count_tokens, checkpoint="oracle", out_dir=tmp_path, **GRID)
    assert res.scores == {t: 1.0 for t in ALL_TASKS}
    assert not res.skipped
    depth_cells = len(DEPTH_TASKS) * 2 * 3
    assert len(res.cells) == depth_cells + len(NO_DEPTH_TASKS) * 2
    assert len(res.outputs) == 2 * len(res.cells)


def test_constant_model_scores_zero(count_tokens):
    res = evaluate(constant, count_tokens, checkpoint="constant", **GRID)
    assert res.scores == {t: 0.0 for t in ALL_TASKS}


def test_half_right_model_scores_in_between(count_tokens):
    calls = []

    def alternate(prompt, k):  # right on every other sample
        calls.append(1)
        return oracle(prompt, k) if len(calls) % 2 else constant(prompt, k)

    res = evaluate(alternate, count_tokens, checkpoint="alt", tasks=["niah_lite"], lengths=[384],
                   depths=[0.0, 100.0], samples=2, seed=0)
    assert res.scores["niah_lite"] == 0.5
    assert [c.score for c in res.cells] == [0.5, 0.5]


def test_outputs_results_json_heatmaps_and_tables(count_tokens, tmp_path):
    res = evaluate(oracle, count_tokens, checkpoint="run/checkpoints/s1k/step-000060",
                   stage="s1k", step=60, out_dir=tmp_path, tasks=["niah_lite", "cwe_lite"],
                   lengths=[384, 100_000], depths=[0.0, 100.0], samples=1, seed=0, max_length=4096)
    assert (res.stage, res.step) == ("s1k", 60)
    saved = load_results(tmp_path / "results.json")
    assert saved.scores == res.scores == {"niah_lite": 1.0, "cwe_lite": 1.0}
    assert [(s.task, s.length) for s in saved.skipped] == [("*", 100_000)]
    assert "longer than the 4096 tokens one evaluator runs" in saved.skipped[0].reason
    assert (tmp_path / "heatmap_niah_lite.png").read_bytes()[:4] == b"\x89PNG"
    assert saved.files == {"heatmap_niah_lite": "heatmap_niah_lite.png", "tables": "tables.md"}
    tables = (tmp_path / "tables.md").read_text()
    assert "## niah_lite: 1.000" in tables and "| 384 | one evaluator | 1.00 | 1.00 |" in tables
    assert "## cwe_lite: 1.000" in tables and "| length | run on | score |" in tables
    # The whole grid as asked: the length not run is a row that says so, and why.
    assert "| 100,000 | - | not run | not run |" in tables
    assert "- not run at 100,000 tokens: longer than the 4096 tokens" in tables
    assert saved.engines == {"384": "one evaluator"}
    assert json.loads((tmp_path / "results.json").read_text())["outputs"][0]["score"] == 1.0


def test_too_short_cells_are_skipped_with_the_reason(count_tokens):
    res = evaluate(oracle, count_tokens, checkpoint="x",
                   tasks=["niah_multivalue_lite", "niah_lite"],
                   lengths=[64, 384], depths=[50.0], samples=1, seed=0)
    assert [(s.task, s.length) for s in res.skipped] == [("niah_multivalue_lite", 64),
                                                          ("niah_lite", 64)]
    assert "too short" in res.skipped[0].reason
    assert res.scores == {"niah_multivalue_lite": 1.0, "niah_lite": 1.0}


@pytest.mark.parametrize("given, index, expected", [
    ([], 0, [256]), ([], 2, [256, 1024, 4096]), ([2048, 512, 512], 0, [512, 2048])])
def test_lengths_default_to_the_stage_and_shorter_stages(given, index, expected):
    assert plan_lengths([256, 1024, 4096], index, given) == expected


def test_kamradt_runs_on_his_depth_grid_and_draws_his_heatmap(count_tokens, tmp_path):
    import random

    rng = random.Random(1)
    essay = "\n\n".join(" ".join(tasks.filler_sentence(rng) for _ in range(10))
                        for _ in range(30))
    kamradt = tasks.Kamradt(haystack=essay)
    res = evaluate(oracle, count_tokens, checkpoint="k", tasks=["passkey"], lengths=[512, 1024],
                   depths=[50.0], samples=1, seed=0, out_dir=tmp_path, kamradt=kamradt,
                   kamradt_intervals=5, haystack_files=["essays.txt"])
    assert res.tasks == ["passkey", "niah_kamradt"]
    cells = [(c.length, c.depth) for c in res.cells if c.task == "niah_kamradt"]
    assert cells == [(n, d) for n in (512, 1024) for d in (0.0, 25.0, 50.0, 75.0, 100.0)]
    assert res.scores["niah_kamradt"] == 1.0  # the oracle finds the needle sentence
    assert res.kamradt["key_phrases"] == ["eat a sandwich", "Dolores Park"]
    assert (tmp_path / "heatmap_niah_kamradt.png").read_bytes()[:4] == b"\x89PNG"
    wrong = evaluate(constant, count_tokens, checkpoint="k", tasks=["passkey"], lengths=[512],
                     depths=[50.0], samples=1, seed=0, kamradt=kamradt, kamradt_intervals=3)
    assert wrong.scores["niah_kamradt"] == 0.0
    half = evaluate(lambda p, k: " Eat a sandwich.", count_tokens, checkpoint="k", tasks=[],
                    lengths=[512], depths=[50.0], samples=1, seed=0, kamradt=kamradt,
                    kamradt_intervals=2)
    assert half.scores["niah_kamradt"] == 0.5  # one of the two key phrases
