"""Generated corpora for the preparation tests and benchmarks/data.py (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the river stone cloud tiger maple piano candle rocket garden silver window forest "
         "orange violet harbor lemon castle falcon meadow pepper comet willow anchor runs over "
         "under quietly bright small large old new and but with from into").split()


def document(rng: random.Random, words: int) -> str:
    sentences, left = [], words
    while left > 0:
        n = min(left, rng.randint(4, 14))
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        left -= n
    return " ".join(sentences)


def documents(seed: int, n: int, lo: int = 5, hi: int = 200) -> list[str]:
    rng = random.Random(seed)
    return [document(rng, rng.randint(lo, hi)) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return path


def write_txt(folder: Path, texts: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, t in enumerate(texts):
        paths.append(folder / f"doc-{i:04d}.txt")
        paths[-1].write_text(t, encoding="utf-8")
    return paths


def write_parquet(path: Path, texts: list[str], field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path,
                   row_group_size=7)
    return path


def write_saved_dataset(folder: Path, texts: list[str], field: str = "text") -> Path:
    """A real `datasets.Dataset.save_to_disk` folder, in two shards (`datasets` comes with the
    dev extra, through lm-eval)."""
    import datasets

    datasets.Dataset.from_dict({field: texts}).save_to_disk(str(folder), num_shards=2)
    return folder


def conversations(seed: int, n: int) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": document(rng, 6)})
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": document(rng, rng.randint(3, 20))})
            msgs.append({"role": "assistant", "content": document(rng, rng.randint(3, 30))})
        out.append(msgs)
    return out


def write_chat(path: Path, convs: list[list[dict]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}) + "\n")
    return path
