"""Teacher-forced retrieval scores of a checkpoint: the demo's before/after passkey line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class RetrievalScores:
    exact: float  # share of prompts with every answer digit right
    digits: float  # share of answer digits right
    loss: float  # mean answer-token cross-entropy (ln 10 ~ 2.30 is chance)


def retrieval_scores(checkpoint: Path, seq_len: int, samples: int = 32, seed: int = 10_000,
                     kind: str = "passkey") -> RetrievalScores:
    """Retrieval on held-out prompts at `seq_len`, needles at evenly spread depths, of a
    checkpoint loaded as the evaluators load it (checked, export or DCP shards; fp32, CPU)."""
    from ray_jobs.eval.model import load_checkpoint

    model, tok = load_checkpoint(checkpoint, "cpu", "float32")
    return model_retrieval_scores(model, tok, seq_len, samples, seed, kind)


def model_retrieval_scores(model, tok, seq_len: int, samples: int = 32, seed: int = 10_000,
                           kind: str = "passkey") -> RetrievalScores:
    """retrieval_scores of a model in memory. Exact match of every answer token under teacher
    forcing equals greedy decoding's exact match; digit accuracy and the loss show partial
    retrieval."""
    hits, digits, loss = 0, 0.0, 0.0
    for _, right, prompt_loss in prompt_results(model, tok, seq_len, samples, seed, kind):
        hits += bool(right.all())
        digits += right.float().mean().item()
        loss += prompt_loss
    return RetrievalScores(hits / samples, digits / samples, loss / samples)


def prompt_results(model, tok, seq_len: int, samples: int, seed: int, kind: str = "passkey"):
    """Per held-out prompt (needles at evenly spread depths): the sample, which answer tokens
    the model got right (teacher-forced), and its answer-token loss."""
    from ray_jobs.data.samples import IGNORE, build_eval_prompt

    with torch.no_grad():
        for i in range(samples):
            s = build_eval_prompt(tok, seq_len, seed + i, kind, depth=(i + 0.5) / samples)
            y = torch.tensor([s.labels])
            logits = model(input_ids=torch.tensor([s.input_ids])).logits
            right = logits.argmax(-1)[y != IGNORE] == y[y != IGNORE]
            yield s, right, torch.nn.functional.cross_entropy(
                logits[0], y[0], ignore_index=IGNORE).item()
