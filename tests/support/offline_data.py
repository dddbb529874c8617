"""A small eval.data_dir made on the spot, in the real files' schemas: synthetic essays, an empty
(valid) nltk punkt_tab, SQuAD- and HotpotQA-format JSON with 500 answerable questions each
(lm-eval makes 500 samples per task and length and reads one question per sample) and BABILong
save_to_disk folders. Answers can be read back from a prompt (`answer_from_prompt` here and in
lm_eval_backends), and a few equal "42" so that the constant backend scores above 0."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from ray_jobs.eval.lm_eval import offline_data as od

QUESTIONS = 500
WORDS = ("river stone garden window letter market summer engine silver valley paper bridge "
         "castle forest orange lantern harbor meadow pencil rocket").split()
NAMES = ("Mary", "John", "Sandra", "Daniel")
PLACES = ("kitchen", "garden", "office", "hallway", "bathroom", "bedroom")


def _code(i: int) -> str:
    return "42" if i % 50 == 0 else f"{WORDS[i % len(WORDS)]}{i}"


def write_data_dir(root: str | Path, babilong_configs: Sequence[str] = ("0k",)) -> Path:
    """Write the folder; returns its path."""
    rng = random.Random(7)
    root = Path(root)
    from lm_eval.tasks.ruler import cwe_utils

    vocabulary = cwe_utils.WORDS[:4000]  # words tests' ruler_tokenizer knows: ~1 token each
    (root / od.ESSAYS).mkdir(parents=True)
    for n in range(3):
        sentences = [" ".join(rng.choice(vocabulary) for _ in range(8)).capitalize() + "."
                     for _ in range(120)]
        (root / od.ESSAYS / f"essay-{n:04d}.txt").write_text(
            "\n\n".join(" ".join(sentences[i:i + 6]) for i in range(0, 120, 6)) + "\n")
    (root / od.PUNKT).mkdir(parents=True)
    for name in od.PUNKT_FILES:  # no abbreviations, collocations or starters: split at periods
        (root / od.PUNKT / name).write_text("")
    squad = {"version": "v2.0", "data": [{"title": f"Article{a}", "paragraphs": [
        {"context": f"The code of item{i} is {_code(i)}. It was filed in {rng.choice(WORDS)}.",
         "qas": [{"id": f"q{i}", "question": f"What is the code of item{i}?",
                  "answers": [{"text": _code(i), "answer_start": 0}], "is_impossible": False},
                 {"id": f"u{i}", "question": f"What is the colour of item{i}?",
                  "answers": [], "plausible_answers": [], "is_impossible": True}]}
        for i in range(a * 10, a * 10 + 10)]} for a in range(QUESTIONS // 10)]}
    (root / od.SQUAD).parent.mkdir(parents=True)
    (root / od.SQUAD).write_text(json.dumps(squad))
    hotpot = [{"_id": f"h{i}", "question": f"What is the code of box{i}?", "answer": _code(i),
               "type": "bridge", "level": "easy",
               "supporting_facts": [[f"Box{i}", 0]],
               "context": [[f"Box{i}", [f"The code of box{i} is {_code(i)}.", " It is small."]],
                           [f"Shelf{i}", [f"Shelf{i} holds {rng.choice(WORDS)} things."]]]}
              for i in range(QUESTIONS)]
    (root / od.HOTPOT).parent.mkdir(parents=True)
    (root / od.HOTPOT).write_text(json.dumps(hotpot))
    for config in babilong_configs:
        write_babilong(root / od.BABILONG / config, rng)
    return root


def write_babilong(folder: Path, rng: random.Random, rows: int = 6) -> None:
    """Splits qa1..qa5 (lm-eval's long-context BABILong tasks), where the answer is the last
    place the asked person went."""
    import datasets

    splits = {}
    for split in ("qa1", "qa2", "qa3", "qa4", "qa5"):
        records = []
        for _ in range(rows):
            facts = [(rng.choice(NAMES), rng.choice(PLACES)) for _ in range(4)]
            who = facts[rng.randrange(4)][0]
            where = [p for n, p in facts if n == who][-1]
            records.append({"input": " ".join(f"{n} went to the {p}." for n, p in facts),
                            "question": f"Where is {who}?", "target": where})
        splits[split] = datasets.Dataset.from_list(records)
    datasets.DatasetDict(splits).save_to_disk(str(folder))


def answer_from_prompt(prompt: str) -> str | None:
    """The answer of a QA or BABILong prompt of this folder's data, read from the prompt alone;
    None for other prompts."""
    asked = re.findall(r"Question: What is the code of (\w+)\?", prompt)
    if asked:
        found = re.search(rf"The code of {asked[-1]} is (\w+)\.", prompt)
        return f" {found.group(1)}" if found else " (not found)"
    questions = list(re.finditer(r"Where is (\w+)\?", prompt))
    if questions:  # BABILong: the facts between the last worked example and the question
        start = questions[-2].end() if len(questions) > 1 else 0
        segment = prompt[start:questions[-1].start()]
        who = questions[-1].group(1)
        places = re.findall(rf"\b{who} \w+(?: \w+)? to (?:the )?(\w+)\.", segment)
        return f" {places[-1]}" if places else " (not found)"
    return None
