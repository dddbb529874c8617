"""Task generators: deterministic per seed, answerable, needles at the stated depth, fitted."""

import re
from collections import Counter

import pytest

from ray_jobs.eval import tasks
from specs.eval_tasks import ALL_TASKS, DEPTH_TASKS, KAMRADT_TASK, SPEC_TASKS
from tests.eval.oracle import ASSIGN, NEEDLE, PASSKEY

INSERTED = re.compile(r" ?(The special magic number for [\w-]+ is \d+\.|VAR [A-Z]+ = (VAR )?\w+\.|"
                      r"The pass key is [\d ]+\. Remember it\.)")


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_same_prompts_other_seed_other_prompts(task, count_tokens, kamradt):
    a = tasks.build_samples(task, 512, 50.0, 2, seed=7, count_tokens=count_tokens, kamradt=kamradt)
    b = tasks.build_samples(task, 512, 50.0, 2, seed=7, count_tokens=count_tokens, kamradt=kamradt)
    c = tasks.build_samples(task, 512, 50.0, 2, seed=8, count_tokens=count_tokens, kamradt=kamradt)
    assert a == b
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert a[0].prompt != a[1].prompt  # samples of a cell differ


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("length", [384, 1024])
def test_prompt_fills_the_length_and_leaves_room_for_the_answer(task, length, count_tokens,
                                                                 kamradt):
    for s in tasks.build_samples(task, length, 25.0, 2, seed=1, count_tokens=count_tokens,
                                 kamradt=kamradt):
        assert s.prompt_tokens == count_tokens(s.prompt)
        assert s.prompt_tokens + s.max_new_tokens <= length
        assert s.prompt_tokens + s.max_new_tokens >= 0.85 * length
        context = s.prompt[s.context_start:s.context_end]
        assert all(a in context for a in s.answers)  # answerable from the context alone


@pytest.mark.parametrize("task", [t for t in DEPTH_TASKS if t != KAMRADT_TASK])
@pytest.mark.parametrize("depth", [0.0, 25.0, 50.0, 75.0, 100.0])
def test_needle_sits_at_the_stated_depth(task, depth, count_tokens):
    """Depth = share of the haystack's filler tokens before the needle (needles not counted)."""
    s = tasks.build_samples(task, 1024, depth, 1, seed=3, count_tokens=count_tokens)[0]
    before = INSERTED.sub("", s.prompt[s.context_start:s.needle_start])
    filler = INSERTED.sub("", s.prompt[s.context_start:s.context_end])
    share = count_tokens(before) / count_tokens(filler)
    assert share == pytest.approx(depth / 100, abs=0.04)  # one filler sentence is ~2 %
    needle = s.prompt[s.needle_start:]
    if task == "passkey":
        assert PASSKEY.match(needle.lstrip()).group(1) == s.answers[0]
    elif task == "vt_lite":
        var, value = ASSIGN.match(needle).groups()
        assert var == s.answers[0] and f"assigned the value {value}" in s.prompt
    else:
        key, value = NEEDLE.match(needle).groups()
        assert value == s.answers[0] and f"for {key}" in s.prompt[s.context_end:]


@pytest.fixture(scope="module")
def kamradt():
    """An essay-style haystack of plain sentences (what a user's essays would be)."""
    import random

    rng = random.Random(0)
    paragraphs = [" ".join(tasks.filler_sentence(rng) for _ in range(12)) for _ in range(40)]
    return tasks.Kamradt(haystack="\n\n".join(paragraphs))


@pytest.mark.parametrize("depth", [0.0, 10.0, 50.0, 90.0, 100.0])
def test_kamradt_needle_at_a_sentence_break_at_the_depth(depth, count_tokens, kamradt):
    s = tasks.build_samples(KAMRADT_TASK, 1024, depth, 1, seed=3, count_tokens=count_tokens,
                            kamradt=kamradt)[0]
    context = s.prompt[s.context_start:s.context_end]
    needle = s.needle_start - s.context_start
    assert context[needle:].startswith(kamradt.needle)
    assert needle == 0 or context[:needle].endswith(". ")  # a sentence break, never mid-sentence
    rest = context.replace(kamradt.needle, "")
    assert count_tokens(context[:needle]) / count_tokens(rest) == pytest.approx(depth / 100,
                                                                                abs=0.05)
    assert s.answers == ("eat a sandwich", "Dolores Park") and s.metric == "all"
    assert "What is the best thing to do in San Francisco?" in s.prompt[s.context_end:]


def test_kamradt_depth_grid_and_missing_haystack(count_tokens):
    assert tasks.kamradt_depths(11) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0,
                                        90.0, 100.0]
    assert tasks.kamradt_depths(3) == [0.0, 50.0, 100.0]
    with pytest.raises(ValueError, match="needs a haystack"):
        tasks.build_samples(KAMRADT_TASK, 512, 0.0, 1, 0, count_tokens)


def test_vt_chain_links_every_answer_to_the_value(count_tokens):
    s = tasks.build_samples("vt_lite", 1024, 10.0, 1, seed=5, count_tokens=count_tokens)[0]
    assignments = dict(ASSIGN.findall(s.prompt))
    first, *rest = s.answers
    assert assignments[first].isdigit()
    for prev, var in zip(s.answers, rest):
        assert assignments[var] == f"VAR {prev}"
    assert len(s.answers) == tasks.VT_HOPS + 1


def test_cwe_and_fwe_answers_are_strictly_the_most_frequent(count_tokens):
    cwe = tasks.build_samples("cwe_lite", 1024, None, 1, seed=2, count_tokens=count_tokens)[0]
    counts = Counter(re.findall(r"\d+\. (\w+)", cwe.prompt[cwe.context_start:cwe.context_end]))
    assert min(counts[a] for a in cwe.answers) > max(
        c for w, c in counts.items() if w not in cwe.answers)
    fwe = tasks.build_samples("fwe_lite", 1024, None, 1, seed=2, count_tokens=count_tokens)[0]
    counts = Counter(fwe.prompt[fwe.context_start:fwe.context_end].split())
    assert [w for w, _ in counts.most_common(tasks.FWE_TOP)] == list(fwe.answers)
    assert counts[fwe.answers[-1]] > counts.most_common(tasks.FWE_TOP + 1)[-1][1]
    assert cwe.depth is None and fwe.needle_start is None


def test_refuses_unknown_task_bad_depth_and_too_short_length(count_tokens):
    with pytest.raises(ValueError, match="task 'qa_1' is unknown"):
        tasks.build_samples("qa_1", 512, 0.0, 1, 0, count_tokens)
    with pytest.raises(ValueError, match="depth must be a percentage 0..100, got 150"):
        tasks.build_samples("niah_lite", 512, 150.0, 1, 0, count_tokens)
    with pytest.raises(ValueError, match=r"context length 64 is too short.*at least \d+ tokens"):
        tasks.build_samples("niah_lite", 64, 0.0, 1, 0, count_tokens)


def test_every_task_name_has_a_generator_and_every_generator_a_name():
    """specs.eval_tasks is the one list: what eval.tasks accepts is what can be generated."""
    assert set(tasks.BUILDERS) == set(SPEC_TASKS)
    assert set(ALL_TASKS) == set(SPEC_TASKS) | {KAMRADT_TASK}
    assert set(tasks.RULER_BUDGET) == set(ALL_TASKS) - {"passkey"}  # passkey: its own budget
    with pytest.raises(ValueError, match="task 'needle' is unknown; use one of passkey, "):
        tasks.build_samples("needle", 512, 50.0, 1, 0, len)
