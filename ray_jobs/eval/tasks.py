"""Evaluation prompts: ringpilot's own NIAH grid and RULER-style tasks (`*_lite`: not RULER's
generators; RULER itself runs through lm-eval, ray_jobs.eval.lm_eval) and Kamradt's
needle-in-a-haystack test on a haystack of the user's files; a pure function of (seed, cell).

Every prompt is built with the evaluated model's own tokenizer to a token budget: the prompt plus
the answer's generation budget fit `length` tokens. Retrieval needles sit at the stated depth of
the haystack, measured in tokens; the other needles (distractors) sit at seeded random depths.
`cwe_lite` and `fwe_lite` list words instead of a haystack and have no depth. `passkey` is the
classic passkey test in the trainer's own synthetic text (ray_jobs.data.samples), for models
trained on it.
"""

from __future__ import annotations

import glob
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ray_jobs.eval.scoring import Metric
from specs.eval_tasks import ALL_TASKS, KAMRADT_TASK, NO_DEPTH_TASKS

TokenCounter = Callable[[str], int]

# Tokens RULER lets a model generate per task (its synthetic tasks' `tokens_to_generate`);
# passkey keeps the training format's own budget.
RULER_BUDGET = {"niah_lite": 128, "niah_single_lite": 128, "niah_multikey_lite": 128,
                "niah_multivalue_lite": 128, "niah_multiquery_lite": 128, "vt_lite": 30,
                "cwe_lite": 120, "fwe_lite": 50, "niah_kamradt": 64}
NEEDLES = 4  # needles in the multi-needle tasks
VT_HOPS = 3  # assignments after the first in a variable-tracking chain
CWE_WORDS, CWE_REPEAT = 5, 4  # common words to find, and how often each appears
FWE_TOP = 3


@dataclass(frozen=True)
class Sample:
    """One prompt and what a correct continuation must contain."""

    task: str
    length: int  # context length of the cell: prompt tokens + max_new_tokens <= length
    depth: float | None  # percent of the haystack where the answer's needle starts
    index: int
    prompt: str
    answers: tuple[str, ...]
    metric: Metric
    max_new_tokens: int
    context_start: int  # character span of the haystack (or word list) inside the prompt
    context_end: int
    needle_start: int | None  # character offset of the needle placed at `depth`
    prompt_tokens: int


@dataclass(frozen=True)
class Prompt:
    """What a task builder writes for one sample, before it is measured against its budget."""

    instruction: str
    context: str  # the haystack (or word list)
    question: str
    answers: tuple[str, ...]
    metric: Metric = "all"
    needle: int | None = None  # character offset in `context` of the needle placed at the depth
    sep: str = "\n\n"  # between instruction, context and question


# Filler text written for this project: plain sentences with no digits and no capitalised codes,
# so nothing in the haystack can be mistaken for an answer.
_SUBJECTS = ("the old ferryman", "a quiet gardener", "the village baker", "my neighbour",
             "the night guard", "a travelling painter", "the librarian", "an orchard keeper",
             "the young clerk", "a retired sailor", "the weaver", "a shepherd")
_VERBS = ("carried", "painted", "repaired", "counted", "sold", "folded", "watered", "described",
          "borrowed", "measured", "polished", "forgot")
_OBJECTS = ("a basket of pears", "the wooden gate", "three blue lanterns", "an empty barrel",
            "the long ladder", "a bundle of letters", "the copper kettle", "a pile of maps",
            "the striped umbrella", "a box of candles", "the green boat", "a jar of honey")
_PLACES = ("before sunrise", "near the harbour", "behind the mill", "after the rain",
           "in the square", "beside the well", "on a windy afternoon", "at the station",
           "under the bridge", "during the fair", "by the orchard wall", "at dusk")
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass(frozen=True)
class Kamradt:
    """Greg Kamradt's needle-in-a-haystack test: one needle sentence placed at a depth of an
    essay-style haystack (the user's local text files, repeated to the length), at a sentence
    break, and a question about it; scored by which key phrases the answer contains."""

    haystack: str
    needle: str = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores "
                   "Park on a sunny day.")
    question: str = "What is the best thing to do in San Francisco?"
    key_phrases: tuple[str, ...] = ("eat a sandwich", "Dolores Park")


def haystack_files(patterns: Sequence[str], base: Path) -> list[Path]:
    """The haystack's files (globs relative to `base`), or one error naming the pattern."""
    files: list[Path] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        matches = sorted(Path(m) for m in glob.glob(full) if Path(m).is_file())
        if not matches:
            raise FileNotFoundError(f"eval.kamradt.haystack: {pattern!r} matches no file (looked "
                                    f"for {full}); give local text files (essays, books)")
        files += matches
    return files


def read_haystack(files: Sequence[str | Path]) -> str:
    """The haystack's text: its files joined; one error for a file that is empty or not UTF-8."""
    texts = []
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"eval.kamradt.haystack: {f} is not UTF-8 text ({e.reason} at byte "
                             f"{e.start}); convert it or leave it out") from None
        if not text.strip():
            raise ValueError(f"eval.kamradt.haystack: {f} is empty; give text or leave it out")
        texts.append(text)
    return "\n\n".join(texts)


def kamradt_depths(intervals: int) -> list[float]:
    """Kamradt's depth grid: `intervals` depths from 0 to 100 %, evenly spaced, rounded."""
    if intervals < 2:
        return [0.0] if intervals == 1 else []
    return [float(round(100 * i / (intervals - 1))) for i in range(intervals)]


def build_samples(task: str, length: int, depth: float | None, count: int, seed: int,
                  count_tokens: TokenCounter, kamradt: Kamradt | None = None) -> list[Sample]:
    """`count` samples of one (task, length, depth) cell; the same arguments give the same text.
    `kamradt`: the haystack and needle of the niah_kamradt task (required for it)."""
    if task not in ALL_TASKS:
        raise ValueError(f"task {task!r} is unknown; use one of {', '.join(ALL_TASKS)}")
    if task == KAMRADT_TASK and (kamradt is None or not kamradt.haystack.strip()):
        raise ValueError(f"task {KAMRADT_TASK} needs a haystack: give local text files "
                         "(eval.kamradt.haystack, or --haystack)")
    if task in NO_DEPTH_TASKS:
        depth = None
    elif depth is None or not 0 <= depth <= 100:
        raise ValueError(f"task {task}: depth must be a percentage 0..100, got {depth}")
    return [_fit(task, length, depth, i, seed, count_tokens, kamradt) for i in range(count)]


def _fit(task: str, length: int, depth: float | None, index: int, seed: int,
         count: TokenCounter, kamradt: Kamradt | None = None) -> Sample:
    """Build, measure the whole prompt, and shrink the filler until it fits (token counts of
    pieces do not add up exactly under BPE, so the real prompt is the judge)."""
    build = (BUILDERS[task] if task != KAMRADT_TASK else
             lambda rng, b, d, c: _kamradt(rng, b, d, c, kamradt))
    budget = length
    for _ in range(64):
        rng = random.Random(f"ringpilot-eval:{seed}:{task}:{length}:{depth}:{index}")
        parts = build(rng, budget, depth, count)
        prompt = parts.instruction + parts.sep + parts.context + parts.sep + parts.question
        answers = parts.answers
        max_new = sum(count(" " + a) for a in answers) + 2 * len(answers) + 4
        # RULER's generation budget for the task, up to a quarter of the context (so short
        # contexts stay testable): room for an answer in bold, after a colon or restated.
        max_new = max(max_new, min(RULER_BUDGET.get(task, 0), length // 4))
        limit = length - max_new - 1  # 1: room for the BOS token the model may expect
        n = count(prompt)
        if n <= limit:
            start = len(parts.instruction) + len(parts.sep)
            return Sample(task=task, length=length, depth=depth, index=index, prompt=prompt,
                          answers=answers, metric=parts.metric, max_new_tokens=max_new,
                          context_start=start, context_end=start + len(parts.context),
                          needle_start=None if parts.needle is None else start + parts.needle,
                          prompt_tokens=n)
        if budget <= 0:
            break  # the filler is gone and the prompt still does not fit
        # The filler changes only when the budget crosses a sentence, so step at least 8 tokens.
        budget -= max(n - limit, 8)
    raise ValueError(f"task {task}: context length {length} is too short to hold the task's "
                     f"instructions, needles and answer; use a length of at least "
                     f"{n + max_new} tokens")


def code_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up word (consonant-vowel syllables): keys and list items."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _distinct(make: Callable[[], str], k: int, avoid: set[str] | None = None) -> list[str]:
    seen, out = set(avoid or ()), []
    while len(out) < k:
        w = make()
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def filler_sentence(rng: random.Random) -> str:
    """One sentence of the haystack: no digits, no capitalised codes."""
    subject, verb, obj, place = (rng.choice(x) for x in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES))
    return f"{subject[0].upper()}{subject[1:]} {verb} {obj} {place}."


def _haystack(rng: random.Random, budget: int, inserts: list[tuple[float, str]],
              count: TokenCounter) -> tuple[str, list[int]]:
    """Filler of about `budget` tokens with each insert at its fraction (0..1) of the filler's
    tokens, at a sentence boundary; returns the text and each insert's character offset."""
    room = budget - sum(count(" " + text) for _, text in inserts)
    filler, cumulative = [], [0]
    while True:
        s = filler_sentence(rng)
        n = count(" " + s)
        if cumulative[-1] + n > room:
            break
        filler.append(s)
        cumulative.append(cumulative[-1] + n)
    total = cumulative[-1]
    at: dict[int, list[int]] = {}
    for k, (fraction, _) in enumerate(inserts):
        target = fraction * total
        i = min(range(len(cumulative)), key=lambda j: (abs(cumulative[j] - target), j))
        at.setdefault(i, []).append(k)
    pieces: list[str] = []
    offsets = [0] * len(inserts)
    pos = 0
    for i in range(len(filler) + 1):
        for k in at.get(i, []):
            offsets[k] = pos
            pieces.append(inserts[k][1])
            pos += len(inserts[k][1]) + 1
        if i < len(filler):
            pieces.append(filler[i])
            pos += len(filler[i]) + 1
    return " ".join(pieces), offsets


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def _keys_values(rng: random.Random, k: int) -> tuple[list[str], list[str]]:
    keys = _distinct(lambda: f"{code_word(rng, 2)}-{code_word(rng, 2)}", k)
    values = _distinct(lambda: str(rng.randint(1_000_000, 9_999_999)), k)
    return keys, values


def _passkey(rng: random.Random, budget: int, depth: float, count: TokenCounter) -> Prompt:
    """The passkey retrieval test (Mohtashami & Jaggi, 2023) in the exact text the trainer's
    synthetic task uses (ray_jobs.data.samples), so a model trained on it is asked the way it
    learned: no separators, a five-digit key with spaced digits, repeated filler sentences."""
    from ray_jobs.data.samples import (
        FILLER,
        PASSKEY_INTRO,
        PASSKEY_NEEDLE,
        PASSKEY_QUESTION,
        spaced_digits,
    )

    key = spaced_digits(rng)
    needle = PASSKEY_NEEDLE.format(key=key)
    room = budget - count(PASSKEY_INTRO) - count(needle) - count(PASSKEY_QUESTION)
    filler, cumulative = [], [0]
    while True:
        sentence = rng.choice(FILLER)
        n = count(sentence)
        if cumulative[-1] + n > room:
            break
        filler.append(sentence)
        cumulative.append(cumulative[-1] + n)
    target = depth / 100 * cumulative[-1]
    at = min(range(len(cumulative)), key=lambda j: (abs(cumulative[j] - target), j))
    before = "".join(filler[:at])
    return Prompt(instruction=PASSKEY_INTRO, sep="", context=before + needle + "".join(filler[at:]),
                needle=len(before), question=PASSKEY_QUESTION, answers=(key,), metric="all")


NIAH_INSTRUCTION = "Remember the special magic numbers hidden in this text."


def _niah(rng: random.Random, budget: int, depth: float, count: TokenCounter,
          *, metric: Metric = "all") -> Prompt:
    (key,), (value,) = _keys_values(rng, 1)
    context, (needle,) = _haystack(rng, budget, [(depth / 100, _needle(key, value))], count)
    return Prompt(instruction=NIAH_INSTRUCTION, context=context, needle=needle,
                question=f"What is the special magic number for {key}? "
                f"The special magic number for {key} is",
                answers=(value,), metric=metric)


def _niah_multikey(rng: random.Random, budget: int, depth: float, count: TokenCounter) -> Prompt:
    keys, values = _keys_values(rng, NEEDLES)
    inserts = [(depth / 100, _needle(keys[0], values[0]))]
    inserts += [(rng.random(), _needle(k, v)) for k, v in zip(keys[1:], values[1:])]
    context, offsets = _haystack(rng, budget, inserts, count)
    return Prompt(instruction=NIAH_INSTRUCTION, context=context, needle=offsets[0],
                question=f"What is the special magic number for {keys[0]}? "
                f"The special magic number for {keys[0]} is",
                answers=(values[0],), metric="all")


def _niah_multivalue(rng: random.Random, budget: int, depth: float, count: TokenCounter) -> Prompt:
    (key,), _ = _keys_values(rng, 1)
    _, values = _keys_values(rng, NEEDLES)
    inserts = [(depth / 100, _needle(key, v)) for v in values]  # together at the stated depth
    context, offsets = _haystack(rng, budget, inserts, count)
    return Prompt(instruction=NIAH_INSTRUCTION, context=context, needle=offsets[0],
                question=f"What are all the special magic numbers for {key}? "
                f"The special magic numbers for {key} are",
                answers=tuple(values), metric="all")


def _niah_multiquery(rng: random.Random, budget: int, depth: float, count: TokenCounter) -> Prompt:
    keys, values = _keys_values(rng, NEEDLES)
    asked = NEEDLES // 2
    inserts = [(depth / 100, _needle(k, v)) for k, v in zip(keys[:asked], values[:asked])]
    inserts += [(rng.random(), _needle(k, v)) for k, v in zip(keys[asked:], values[asked:])]
    context, offsets = _haystack(rng, budget, inserts, count)
    names = ", ".join(keys[:asked])
    return Prompt(instruction=NIAH_INSTRUCTION, context=context, needle=offsets[0],
                question=f"What are the special magic numbers for {names}? "
                f"The special magic numbers for {names} are",
                answers=tuple(values[:asked]), metric="all")


def _vt(rng: random.Random, budget: int, depth: float, count: TokenCounter) -> Prompt:
    names = _distinct(lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)),
                      2 * (VT_HOPS + 1))
    target, other = names[: VT_HOPS + 1], names[VT_HOPS + 1:]
    values = _distinct(lambda: str(rng.randint(10_000, 99_999)), 2)

    def chain(variables: list[str], value: str) -> list[str]:
        return [f"VAR {variables[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(variables, variables[1:])]

    d = depth / 100  # the chain starts at the stated depth and its hops follow in order
    inserts = [(d + (1 - d) * k / (VT_HOPS + 1), s) for k, s in enumerate(chain(target, values[0]))]
    distractor = sorted(rng.random() for _ in range(VT_HOPS + 1))
    inserts += list(zip(distractor, chain(other, values[1])))
    context, offsets = _haystack(rng, budget, inserts, count)
    return Prompt(instruction="Track the variable assignments in this text.", context=context,
                needle=offsets[0],
                question=f"Which variables are assigned the value {values[0]}, directly or "
                f"through other variables? Answer: the variables assigned {values[0]} are",
                answers=tuple(target), metric="all")


def _cwe(rng: random.Random, budget: int, depth: None, count: TokenCounter) -> Prompt:
    words = _distinct(lambda: code_word(rng), CWE_WORDS)
    items = [w for w in words for _ in range(CWE_REPEAT)]
    used = sum(count(f" {i + 1}. {w}") for i, w in enumerate(items))
    seen = set(words)
    while True:  # each uncommon word appears once
        w = _distinct(lambda: code_word(rng), 1, seen)[0]
        n = count(f" {len(items) + 1}. {w}")
        if used + n > budget:
            break
        seen.add(w)
        items.append(w)
        used += n
    rng.shuffle(items)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    return Prompt(instruction="Some words in this numbered list repeat.",
                context=context, question=f"What are the {CWE_WORDS} most common words in the "
                "list above? Answer: the most common words are", answers=tuple(words))


def _fwe(rng: random.Random, budget: int, depth: None, count: TokenCounter) -> Prompt:
    per_word = max(1, count(" " + code_word(random.Random(0))))
    total = max(budget // per_word, 4 * FWE_TOP + 8)
    top_counts = [max(FWE_TOP + 3 - r, total // (4 * (r + 1))) for r in range(FWE_TOP)]
    top = _distinct(lambda: code_word(rng), FWE_TOP)
    items = [w for w, c in zip(top, top_counts) for _ in range(c)]
    used = sum(count(" " + w) for w in items)
    seen = set(top)
    while True:  # the rest appear once or twice: far below the top words
        w = _distinct(lambda: code_word(rng), 1, seen)[0]
        reps = rng.choice((1, 2))
        n = reps * count(" " + w)
        if used + n > budget:
            break
        seen.add(w)
        items += [w] * reps
        used += n
    rng.shuffle(items)
    return Prompt(instruction="Count how often each coded word appears in this text.",
                context=" ".join(items),
                question=f"What are the {FWE_TOP} most frequent coded words in the text above? "
                "Answer: the most frequent words are", answers=tuple(top), metric="all")


KAMRADT_INSTRUCTION = ("You are a helpful AI bot that answers questions for a user. Keep your "
                       "response short and direct.")


def _kamradt(rng: random.Random, budget: int, depth: float, count: TokenCounter,
             k: Kamradt) -> Prompt:
    """The haystack repeated to about `budget` tokens, the needle inserted at `depth` percent of
    it, moved back to the sentence break before that point (as Kamradt's test does)."""
    text = " ".join(k.haystack.split())  # one line: paragraph breaks would split the prompt
    # Each sample starts the haystack at its own sentence (seeded), so samples of a cell differ.
    starts = [0] + [i + 2 for i in range(len(text) - 1) if text.startswith(". ", i)]
    first = rng.choice(starts)
    text = text[first:] + " " + text[:first] if first else text
    sample = text[:20_000]
    chars_per_token = len(sample) / max(1, count(sample))
    room = max(0, budget - count(" " + k.needle + " "))
    want = int(room * chars_per_token)
    context = (text + " ") * (want // (len(text) + 1) + 1)
    context = context[:want]
    context = context[:context.rfind(".") + 1] or context.rstrip()  # end at a sentence's end
    at = int(round(depth / 100 * len(context)))
    if 0 < at < len(context):
        stop = context.rfind(". ", 0, at)
        at = stop + 2 if stop >= 0 else 0
    before, after = context[:at].rstrip(), context[at:].lstrip()
    context = " ".join(x for x in (before, k.needle, after) if x)
    needle = len(before) + 1 if before else 0
    return Prompt(instruction=KAMRADT_INSTRUCTION, context=context, needle=needle,
                  question=f"{k.question} Don't give information outside the document or repeat "
                  "your findings. Answer:", answers=tuple(k.key_phrases), metric="all")


# One generator per name of specs.eval_tasks.SPEC_TASKS (Kamradt's takes his haystack too: _fit).
BUILDERS: dict[str, Callable[..., Prompt]] = {
    "passkey": _passkey,
    "niah_lite": lambda rng, b, d, c: _niah(rng, b, d, c, metric="exact"),
    "niah_single_lite": _niah,
    "niah_multikey_lite": _niah_multikey,
    "niah_multivalue_lite": _niah_multivalue,
    "niah_multiquery_lite": _niah_multiquery,
    "vt_lite": _vt,
    "cwe_lite": _cwe,
    "fwe_lite": _fwe,
}
