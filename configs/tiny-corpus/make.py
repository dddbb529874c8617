"""Regenerate this folder's small corpus (configs/tiny-prepared.yaml trains on it):

    .venv/bin/python configs/tiny-corpus/make.py

Three jsonl files of plain documents (different lengths, one of them repeated to show the
deduplication) and one of chat conversations, from tests/data/corpus.py's generator."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from tests.data.corpus import conversations, documents, write_chat, write_jsonl  # noqa: E402

for i, (lo, hi) in enumerate([(20, 120), (60, 300), (200, 700)]):
    texts = documents(10 + i, 50, lo=lo, hi=hi)
    texts[-1] = texts[0]  # a duplicate, dropped by dedup
    write_jsonl(HERE / f"web-{i}.jsonl", texts)
write_chat(HERE / "chat.jsonl", conversations(20, 60))
