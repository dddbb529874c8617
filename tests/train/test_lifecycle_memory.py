"""The lifecycle's memory (issue 33, done-when): on 2 gloo ranks, a model of real width and few
layers, each rank's peak resident memory while it loads the model, trains a step, saves a
checkpoint and saves the stage's final one with its Hugging Face export stays below its share of
the model's full state (weights, gradients and AdamW's two moments: 4 x the fp32 weights, over
the 2 ranks) plus a stated constant, and rank 0 holds no more than rank 1.

The save this branch replaced (tests/train/lifecycle_worlds.py `gathering_save`: the full weights
gathered to rank 0, which wrote the Hugging Face files at every checkpoint) fails both: measured
with `lifecycle_peaks(..., "gathering_save", ...)` on this model, rank 0 peaked at 3350-3401 MB
while saving and 3373 MB exporting (the bound: 2376 + 750 MB), rank 1 at 2532 MB; this code
peaks at 2.85 GB in the step (the same for both saves) and at most 2.43 GB while saving.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.support.eval_fixtures import build_tokenizer
from tests.support.worlds import run_world
from tests.train import lifecycle_worlds as lw

# Llama-2 7B's width (hidden, intermediate, vocabulary), 4 layers: 315M parameters, 1.26 GB in
# fp32. Four layers, not two: the old save's excess over the bound (about the whole weights on
# rank 0) must stand clear of the step's own transients, which do not grow with layers.
MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
# What a rank may hold beyond its share of the full state, at any phase's peak: measured, the
# step rises up to 475 MB above it (the root's embedding and lm_head all-gathered, their
# gradients before the reduce-scatter, the loss chunks, the allocator's slack); the saves stay
# below the share (the export's consolidation adds one full tensor and a piece of it, the
# 262 MB embedding and a 131 MB shard, to the weights and moments a rank holds). Midway between
# the step's 475 MB and the old save's 1025 MB.
CONSTANT = 750 << 20
# rank 0 writes the small files and the export's index: no more than this beyond rank 1
RANK0_EXTRA = 300 << 20
# The cost model's peaks (topology.cost.lifecycle_memory) against these measured ones: the
# model's host parts are read off torch's and safetensors' code, not traced, so this is where
# they meet a measurement. The model prices tensors; what the process holds beyond them at a
# phase's start (the runtime the first step builds, Python objects, heap fragmentation:
# measured 0 before the load, 115-135 MB after the step) is measured and added to it. Measured
# against model + residual: load +7%, save -7% (a CPU process writes its shards without the
# staging copy the model prices for a GPU), export within 2%.
MODEL_TOLERANCE = 0.10
# The most the process may hold beyond its tensors at a phase's start: above this the residual
# is no longer the runtime's but something the model should price.
RESIDUAL_BOUND = 256 << 20


@pytest.mark.multiprocess
def test_each_phase_of_the_lifecycle_stays_within_a_ranks_share_of_the_state(tmp_path):
    config = LlamaConfig(**MODEL)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    source = tmp_path / "source"
    source.mkdir()
    save_file({k: torch.empty(s).uniform_(-0.02, 0.02, generator=gen) for k, s in shapes.items()},
              str(source / "model.safetensors"))
    config.save_pretrained(source)
    build_tokenizer(300).save_pretrained(tmp_path / "tok")
    weights = sum(math.prod(s) * 4 for s in shapes.values())
    share = 4 * weights // 2  # weights, gradients, two AdamW moments, over 2 ranks
    # files sized as an 8B model's 5 GB files of its 32 GB: 7 of them here
    file_bytes = weights * 5 // 32

    try:
        got = run_world(2, lw.lifecycle_peaks, str(source), str(tmp_path / "run"),
                        str(tmp_path / "tok"), "save_checkpoint", file_bytes, timeout_s=400)
    finally:
        # 6 GB of weights, checkpoints and the export: of no use once measured, failed or not,
        # and enough, kept over a few runs, to fill a CI machine's disk
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
    peaks = [g["peaks"] for g in got]
    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    print({"peaks": [{k: mb(v) for k, v in p.items()} for p in peaks],
           "residual": [{k: mb(v) for k, v in g["residual"].items()} for g in got]})
    for rank, p in enumerate(peaks):
        assert p["load"] >= weights // 2, f"rank {rank}: the measurement missed the load"
        for phase, peak in p.items():
            assert peak < share + CONSTANT, (
                f"rank {rank} peaked at {mb(peak)} during {phase}: more than its share of the "
                f"full state ({mb(share)}) + {mb(CONSTANT)}")
    predicted = cpu_process_peaks(config, weights, file_bytes)
    for rank, (p, g) in enumerate(zip(peaks, got)):
        for phase, want in predicted.items():
            residual = g["residual"][phase]
            assert residual < RESIDUAL_BOUND, (
                f"rank {rank} held {mb(residual)} beyond its tensors as {phase} began: more "
                f"than the runtime's {mb(RESIDUAL_BOUND)}")
            want += residual
            assert abs(want - p[phase]) <= MODEL_TOLERANCE * p[phase], (
                f"rank {rank}, {phase}: the cost model predicts {mb(want)} (with the "
                f"{mb(residual)} the process held beyond its tensors), measured {mb(p[phase])}")
    for phase in ("save", "export"):
        assert peaks[0][phase] < peaks[1][phase] + RANK0_EXTRA, (
            f"rank 0 peaked at {mb(peaks[0][phase])} during {phase}, rank 1 at "
            f"{mb(peaks[1][phase])}: rank 0 holds more than the others")


def cpu_process_peaks(config, weights: int, file_bytes: int) -> dict[str, float]:
    """The cost model's load, save and export peaks for this test's model and layout (2 ranks
    sharding fp32 state), as one CPU process holds them: its device and host memory are the
    same memory, and a part both sides name (the load's read chunk: the trace sees the slice
    on its CPU "device") is one tensor, counted once."""
    from topology.cost import StageShape, lifecycle_memory
    from topology.profile import L40S

    shape = StageShape(seq_len=lw.SEQ, ring=1, dp=2, batch_size=2, grad_accum=1, steps=1,
                       layers=config.num_hidden_layers, hidden=config.hidden_size,
                       intermediate=config.intermediate_size,
                       heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                       head_dim=config.head_dim, vocab=config.vocab_size, params=weights // 4,
                       elem_bytes=4, shard=2, state_bytes=4)
    sides = lifecycle_memory(shape, L40S.model_copy(update={"memory_reserve_bytes": 0.0}),
                             file_bytes=file_bytes)
    return {phase: sum({**sides[phase]["device"], **sides[phase]["host"]}.values())
            for phase in ("load", "save", "export")}
