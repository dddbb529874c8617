"""Tiny Llama checkpoints and tokenizers built locally (no downloads), for tests and benchmarks."""

from __future__ import annotations

import random
from pathlib import Path

from ray_jobs.eval import tasks


def build_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE trained on text shaped like the evaluation prompts, as a
    PreTrainedTokenizerFast (what the trainer saves as tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(tasks.filler_sentence(rng) for _ in range(8)) for _ in range(200)]
    corpus += [f"VAR {tasks.code_word(rng).upper()} = {rng.randint(0, 10**7)}." for _ in range(200)]
    corpus += [tasks.NIAH_INSTRUCTION]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def build_tiny_model(vocab_size: int, max_len: int = 1024, theta: float = 10_000.0, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=max_len,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    return LlamaForCausalLM(config)


def save_checkpoint(model, tokenizer, path: str | Path, *, ringpilot: bool = True,
                    commit: bool = True) -> Path:
    """Write a checkpoint as the trainer does: HF files, tokenizer, the trainer state (its stage
    and step from where `path` sits in a run, else stage "s" step 0), then the COMMITTED marker
    (`ringpilot=False`: a plain HF directory; `commit=False`: an incomplete one)."""
    from specs.checkpoint import STATE_DIR, TrainerState, locate, write_state
    from specs.ledger import mark_committed

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if ringpilot:
        place = locate(path)
        (path / STATE_DIR).mkdir(exist_ok=True)
        write_state(path, TrainerState(stage=place.stage if place else "s", stage_index=0,
                                       step=place.step if place else 0))
        if commit:
            mark_committed(path)
    return path


def crash_on_first_attempt(request):
    """An evaluation whose actor process dies mid-task on its first attempt (after one sample),
    then behaves: what a GPU fault or OOM kill looks like to the scheduler."""
    import os

    from ray_jobs.eval.pipeline import evaluate_request

    if request.attempt > 1:
        return evaluate_request(request)

    def wrap(generate):
        calls = 0

        def crashing(prompt: str, max_new_tokens: int) -> str:
            nonlocal calls
            calls += 1
            if calls == 2:
                os._exit(1)
            return generate(prompt, max_new_tokens)

        return crashing

    return evaluate_request(request, wrap)


def train_with_checkpoints(run_dir: str, run_name: str, stages: list[tuple[str, int, int]],
                           checkpoint_every: int, *, threads: int = 1,
                           wait_for_first_eval: float = 0.0) -> dict:
    """A small real training loop (tiny Llama, AdamW, random tokens) that checkpoints as the
    trainer does: save, mark COMMITTED, then Ledger.commit_checkpoint. `stages` lists
    (name, seq_len, steps). With `wait_for_first_eval` seconds, training pauses after its first
    checkpoint until that checkpoint's evaluation is in the ledger (proof that evaluation runs
    while training is still going). Returns steps done and tokens/s per stage."""
    import time

    import torch

    from specs.checkpoint import checkpoint_dir
    from specs.ledger import Ledger

    torch.set_num_threads(threads)
    ledger = Ledger(run_dir, run_name)
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer), max(s for _, s, _ in stages))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    out = {"steps": {}, "tokens_per_s": {}, "commits": [], "step_spans": []}
    for name, seq_len, steps in stages:
        ledger.start_stage(name)
        t0, tokens = time.perf_counter(), 0
        for step in range(1, steps + 1):
            begin = time.time()
            ids = torch.randint(0, len(tokenizer), (1, seq_len), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            tokens += seq_len
            out["step_spans"].append((begin, time.time(), seq_len))
            if step % checkpoint_every == 0 or step == steps:
                path = checkpoint_dir(run_dir, name, step)
                save_checkpoint(model, tokenizer, path)
                ledger.commit_checkpoint(name, step, path, final=step == steps)
                rel = str(path.relative_to(run_dir))
                out["commits"].append((rel, time.time()))
                if wait_for_first_eval and len(out["commits"]) == 1:
                    out["first_eval_during_training"] = _wait_for_eval(
                        ledger, name, rel, wait_for_first_eval)
        out["steps"][name] = steps
        out["tokens_per_s"][name] = tokens / (time.perf_counter() - t0)
        ledger.finish_stage(name)
    return out


def _wait_for_eval(ledger, stage: str, rel: str, timeout: float) -> str | None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = ledger.read().stages[stage].eval.get(rel)
        if entry is not None and entry.status != "running":
            return entry.status
        time.sleep(0.2)
    return None


def hang(request):
    """An evaluation that never finishes (a stuck device): only cancelling ends it."""
    import time

    while True:
        time.sleep(1)


def kill_gang_member_on_first_attempt(request):
    """An evaluation whose gang loses a member (killed, as a node loss would) on its first
    attempt, then behaves: the whole evaluation must fail and be retried."""
    from ray_jobs.eval.pipeline import evaluate_request

    def kill_one(gang, req):
        import ray

        if req.attempt == 1:
            ray.kill(gang.members[-1])

    return evaluate_request(request, on_gang=kill_one)


def ruler_tokenizer(chat_template: str | None = None):
    """A byte-level BPE trained on text like RULER's prompts (lm-eval's own templates, noise
    sentence and word list), so its token counts are like a real English tokenizer's: the
    evaluation fixtures' tokenizer spends ~48 tokens on RULER's noise sentence, and lm-eval's
    ruler_vt cannot fit its worked example with that (see test_vt_refuses_a_wasteful_tokenizer)."""
    import random

    from lm_eval.tasks.ruler import cwe_utils, fwe_utils, niah_utils, vt_utils
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    noise = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
             "There and back again.\n")
    words = cwe_utils.WORDS[:4000]
    corpus = [noise * 20, vt_utils.TEMPLATE, niah_utils.TEMPLATE, cwe_utils.TEMPLATE,
              fwe_utils.TEMPLATE, " ".join(words)]
    corpus += [f"One of the special magic numbers for {rng.choice(words)}-{rng.choice(words)} "
               f"is: {rng.randint(10**6, 10**7)}." for _ in range(300)]
    corpus += [f"VAR {''.join(rng.choices('ABCDEFGHIJKLMNOPQRSTUVWXYZ', k=5))} = "
               f"{rng.randint(10000, 99999)}" for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=3000, special_tokens=["<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    if chat_template:
        out.chat_template = chat_template
    return out
