"""Reference "models" for the harness tests: one reads answers from the prompt, one is constant."""

from __future__ import annotations

import re
from collections import Counter

NEEDLE = re.compile(r"The special magic number for ([\w-]+) is (\d+)\.")
ASSIGN = re.compile(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.")
PASSKEY = re.compile(r"The pass key is ((?:\d )*\d)\. Remember it\.")


def oracle(prompt: str, max_new_tokens: int) -> str:
    """Answer every task by reading the prompt only (never the generator's answer list)."""
    # no separators: the trainer's text
    if prompt.endswith("Tell me the pass key. The pass key is"):
        return " " + PASSKEY.search(prompt).group(1) + ". Remember it."
    context, question = prompt.split("\n\n")[1], prompt.split("\n\n")[-1]
    if "Don't give information outside the document" in question:  # Kamradt's test
        subject = re.match(r"What is (?:the )?(.+?)\?", question).group(1)
        return " " + next(s for s in re.split(r"(?<=\.) ", context) if subject in s)
    if "special magic number" in question:
        asked = re.search(r"numbers? for (.+?)\?", question).group(1).split(", ")
        found = [v for k, v in NEEDLE.findall(context) if k in asked]
        return " " + " ".join(found) + "."
    if question.startswith("Which variables"):
        value = re.search(r"assigned the value (\d+)", question).group(1)
        names, changed = set(), True
        while changed:
            changed = False
            for var, rhs in ASSIGN.findall(context):
                if var not in names and (rhs == value or rhs.removeprefix("VAR ") in names):
                    names.add(var)
                    changed = True
        return " " + ", ".join(sorted(names))
    if "most common words" in question:
        k = int(re.search(r"the (\d+) most", question).group(1))
        counts = Counter(re.findall(r"\d+\. (\w+)", context))
        return " " + ", ".join(w for w, _ in counts.most_common(k))
    if "most frequent coded words" in question:
        k = int(re.search(r"the (\d+) most", question).group(1))
        return " " + ", ".join(w for w, _ in Counter(context.split()).most_common(k))
    raise AssertionError(f"oracle does not know this question: {question!r}")


def constant(prompt: str, max_new_tokens: int) -> str:
    return " I do not know, maybe 42."
