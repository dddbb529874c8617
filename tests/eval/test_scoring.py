"""Scoring matches hand-worked cases."""

import pytest

from ray_jobs.eval.scoring import score, score_all, score_any, score_exact


def test_exact_takes_the_first_answer_shaped_word():
    assert score_exact(" 4817203. And then", ["4817203"]) == 1.0
    assert score_exact("4817203", ["4817203"]) == 1.0
    # formatted or restated answers count: bold, after a colon, in a sentence
    assert score_exact(" **4817203**", ["4817203"]) == 1.0
    assert score_exact(" Answer: 4817203", ["4817203"]) == 1.0
    assert score_exact(" The special magic number for kelopa is 4817203.", ["4817203"]) == 1.0
    # the first number decides: a wrong one first, or one that merely contains the answer
    assert score_exact(" 1234 and then 4817203", ["4817203"]) == 0.0
    assert score_exact(" 48172030", ["4817203"]) == 0.0
    assert score_exact("", ["4817203"]) == 0.0
    # a word answer: the first word, emphasis and punctuation stripped
    assert score_exact(" *Kelopa*, surely", ["kelopa"]) == 1.0
    assert score_exact(" surely kelopa", ["kelopa"]) == 0.0


def test_all_is_the_fraction_of_answers_found():
    answers = ["AAAAA", "BBBBB", "CCCCC", "DDDDD"]
    assert score_all("aaaaa, BBBBB and ddddd", answers) == 0.75  # case-insensitive, 3 of 4
    assert score_all("nothing here", answers) == 0.0
    assert score_all("12 and 3", ["123"]) == 0.0  # no partial-token matches
    assert score_all("1234 and 12", ["12"]) == 1.0


def test_any_is_one_when_any_answer_occurs():
    assert score_any("It was in Paris.", ["paris", "the French capital"]) == 1.0
    assert score_any("It was in Lyon.", ["paris", "the French capital"]) == 0.0


def test_dispatch_and_empty_answers():
    assert score("all", "x y", ["x", "z"]) == 0.5
    with pytest.raises(ValueError, match="answers is empty"):
        score_all("x", [])
