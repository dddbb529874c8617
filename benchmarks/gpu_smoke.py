"""The GPU path's first run: a smoke check on one CUDA device, or on N under torchrun; no network.

    .venv/bin/python benchmarks/gpu_smoke.py                  # on a GPU machine, one device
    .venv/bin/python benchmarks/gpu_smoke.py --device cpu --quick   # the same checks on CPU
    .venv/bin/torchrun --nproc-per-node N benchmarks/gpu_smoke.py   # N >= 2 GPUs: the real ring
    .venv/bin/torchrun --nproc-per-node 2 benchmarks/gpu_smoke.py --device cpu --quick

Prints one JSON line (the last; under torchrun rank 0 prints it, the other ranks nothing). Without
a CUDA device it prints {"skipped": why} and exits 0; `--device cpu` runs every check on the CPU
kernels (gloo instead of NCCL), which is how the test suite keeps this script honest on machines
without a GPU. `ok` is true only when every check of the mode ran (on every rank) and passed: a
check that did not run, or ran and could not say, is a failure. Exit status 0 iff `ok`.

One device (no torchrun, or a world of one). Each check against an fp32 reference computed from
the same (bf16-rounded) inputs:
1. kernel parity, for every block kernel available on the device (on CUDA: torch's own flash
   op, and flash-attn when it imports): forward output, log-sum-exp, dq, dk, dv, causal and
   not, at B=2, H=32, Hk=8, D=128, S=1024 in bf16. Errors are max |got - want| / max |want|.
2. an emulated ring of P = 2, 3, 4 on one device: the zigzag block plan, the kernel and the
   log-sum-exp merge called directly (no process group, no autograd), forward and backward,
   against full attention.
2b. document masking's mixed blocks: every mixed block of a zigzag ring of 4 over packed
   documents of 1 to S/4 tokens (S = ring_seq), plain and balanced per document, as the ring
   computes them (on CUDA: torch's variable-length flash op, kernels.varlen_rects_forward; on
   CPU one flash call per rectangle), forward and backward, against the masked kernel's fp32
   math on the same inputs.
3. (CUDA only) the point-to-point exchange over NCCL on a ring of one rank sending to itself:
   what arrives is what was sent. gloo refuses a send to oneself, so on CPU this check is not
   part of the mode; the multi-rank mode checks the exchange between two ranks instead.
4. a tiny bf16 Llama's loss and gradients with attn_implementation "ring" (a ring of one) and
   "sdpa".
5. the precision policy: the share of the weights with a gradient that one AdamW step at
   lr 2e-5 changes, with fp32 master weights and bf16 compute (the trainer's default), and
   with bf16 storage for contrast; the peak memory of that step per parameter (CUDA only).
Bounds (bf16): 2e-2 for the kernels and rings, 5e-2 for the Llama's loss and gradients; the
policy step must move every weight.

N ranks (torchrun, WORLD_SIZE >= 2; one process per GPU, NCCL bound to cuda:LOCAL_RANK):
1. the ring's exchange between the N ranks: each receives exactly what its previous peer sent.
2. one Llama-3-8B-shaped decoder layer (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336;
   `--quick`: 256, 8 / 2 heads of 32, MLP 512) in bf16 with attn_implementation "ring" bound by
   apply_ring_attention: each rank runs its zigzag shard of 8192 tokens (`--quick`: 64) of a
   sequence of 8192 N, forward and backward, through ring_attention (zigzag block plan, the
   log-sum-exp merge, the exchange). Every rank also runs the same layer, upcast to fp32, with
   "sdpa" on the whole sequence, and compares its shard of: the layer's output and input
   gradient, and the attention's output and the gradient at its input (without the residual,
   which would hide an attention error). Errors as above, max over ranks (all_reduce); bound 5e-2.
Reported beside them, not checked: the ring layer's forward+backward seconds (the second of two
runs, max over ranks), the reference's seconds, and torch.cuda.max_memory_allocated (CUDA only).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ray_jobs.ring_attention import (  # noqa: E402
    Ring,
    apply_ring_attention,
    merge_block,
    resolve_ring,
    select_block_kernel,
    zigzag_position_ids,
    zigzag_shard,
    zigzag_unshard,
)
from ray_jobs.ring_attention.comm import Exchange  # noqa: E402
from ray_jobs.ring_attention.documents import (  # noqa: E402
    MASKED,
    balanced_layout,
    block_rects,
    plan_document_steps,
)
from ray_jobs.ring_attention.kernels import (  # noqa: E402
    CpuFlashKernel,
    FlashAttnKernel,
    TorchCudaFlashKernel,
    masked_block_backward,
    masked_block_forward,
    rects_block_backward,
    rects_block_forward,
)
from ray_jobs.ring_attention.ring import plan_block  # noqa: E402

KERNEL_BOUND, LLAMA_BOUND = 2e-2, 5e-2
FULL = {"batch": 2, "heads": 32, "kv_heads": 8, "head_dim": 128, "seq": 1024, "ring_seq": 1152}
QUICK = {"batch": 1, "heads": 8, "kv_heads": 2, "head_dim": 64, "seq": 128, "ring_seq": 96}
# One decoder layer of Llama 3 8B, and a shrunken one that runs on two CPU cores in seconds.
LAYER_FULL = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128,
              "tokens_per_rank": 8192}
LAYER_QUICK = {"hidden": 256, "intermediate": 512, "heads": 8, "kv_heads": 2, "head_dim": 32,
               "tokens_per_rank": 64}
# What the layer check compares, ring shard against the fp32 "sdpa" reference's shard.
LAYER_QUANTITIES = ("out", "input_grad", "attn_out", "attn_input_grad")
# The checks each mode must run and pass (on CUDA the one-device mode adds "self_exchange").
SINGLE_CHECKS = ("kernel_parity", "emulated_ring", "document_blocks", "llama_loss",
                 "llama_grads", "policy_moves_every_weight")
MULTI_CHECKS = ("ring_exchange", *(f"ring_vs_sdpa_{q}" for q in LAYER_QUANTITIES))


# The arguments handed to torch for a device are built here, apart, so that a CPU test can check
# them: no GPU runs CI, and an unindexed torch.device("cuda") as device_id once crashed this
# script on the first CUDA machine (torch refuses it: "Please use a device_id with index").
def local_rank() -> int:
    """This process's GPU on its node: torchrun's LOCAL_RANK, 0 when run alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def build_device(kind: str, rank: int) -> torch.device:
    """The device this process computes on: cuda:<rank> (always indexed), or the CPU."""
    if kind == "cuda":
        return torch.device("cuda", rank)
    if kind == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device kind must be 'cuda' or 'cpu', got {kind!r}")


def process_group_args(device: torch.device, rank: int) -> dict:
    """backend and device_id for init_process_group: NCCL bound to this rank's indexed GPU, or
    gloo (no device_id) on the CPU."""
    if device.type == "cpu":
        return {"backend": "gloo", "device_id": None}
    if device.type != "cuda" or device.index is None or device.index != rank:
        raise ValueError(f"NCCL needs device_id cuda:<LOCAL_RANK> = cuda:{rank}, got {device}; "
                         "build it with build_device('cuda', local_rank())")
    return {"backend": "nccl", "device_id": device}


def all_passed(per_rank: list[dict], expected: tuple[str, ...]) -> bool:
    """True only when every rank reports every expected check, and each one is exactly True: a
    check missing, None (it could not say) or anything else counts as a failure."""
    return bool(per_rank) and bool(expected) and all(
        checks.get(name) is True for checks in per_rank for name in expected)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def inputs(shape: dict, seq: int, device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, h, hk, d = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    q = torch.randn(b, seq, h, d, generator=gen)
    k, v = (torch.randn(b, seq, hk, d, generator=gen) for _ in range(2))
    dout = torch.randn(b, seq, h, d, generator=gen)
    return [t.to(device=device, dtype=torch.bfloat16) for t in (q, k, v, dout)]


def reference(q, k, v, dout, causal: bool, scale: float):
    """fp32 attention from the same inputs: out, lse (B, S, H), dq, dk, dv."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    kr, vr = kf.repeat_interleave(groups, 2), vf.repeat_interleave(groups, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kr) * scale
    if causal:
        n = q.shape[1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device)
                                    .triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), vr)
    out.backward(dout.float())
    return out.detach(), lse.detach().transpose(1, 2), qf.grad, kf.grad, vf.grad


def available_kernels(device: torch.device) -> dict:
    if device.type == "cpu":
        return {CpuFlashKernel.name: CpuFlashKernel()}
    kernels = {TorchCudaFlashKernel.name: TorchCudaFlashKernel()}
    try:
        kernels[FlashAttnKernel.name] = FlashAttnKernel()
    except ImportError:
        pass
    return kernels


def kernel_parity(kernel, shape: dict, device) -> dict:
    q, k, v, dout = inputs(shape, shape["seq"], device)
    scale = shape["head_dim"] ** -0.5
    errors = {}
    for causal in (True, False):
        want = reference(q, k, v, dout, causal, scale)
        out, lse = kernel.forward(q, k, v, causal, scale)
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal, scale)
        tag = "causal" if causal else "full"
        for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
            errors[f"{tag}_{name}"] = rel_err(got, ref)
    return errors


def emulated_ring(kernel, shape: dict, world: int, device) -> dict:
    """Ring attention of `world` ranks on one device, by direct calls: each rank's queries meet
    every rank's K/V in the ring's step order, with the ring's block plan and merge."""
    seq = shape["ring_seq"]
    q, k, v, dout = inputs(shape, seq, device, seed=world)
    scale = shape["head_dim"] ** -0.5
    shard = [[zigzag_shard(t, 1, r, world) for r in range(world)] for t in (q, k, v, dout)]
    qs, ks, vs, douts = shard
    local = seq // world
    outs, lses = [], []
    for r in range(world):
        out = lse = None
        for step in range(world):
            src = (r - step) % world
            plan = plan_block(r, src, local, True)
            bo, bl = kernel.forward(qs[r][:, plan.q_rows], ks[src][:, plan.kv_rows],
                                    vs[src][:, plan.kv_rows], plan.causal, scale)
            if out is None:
                out, lse = bo.float(), bl.float().contiguous()
            else:
                merge_block(out[:, plan.q_rows], lse[:, plan.q_rows], bo, bl)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    dqs = [torch.zeros_like(t, dtype=torch.float32) for t in qs]
    dks = [torch.zeros_like(t, dtype=torch.float32) for t in ks]
    dvs = [torch.zeros_like(t, dtype=torch.float32) for t in vs]
    for r in range(world):
        for step in range(world):
            src = (r - step) % world
            plan = plan_block(r, src, local, True)
            bdq, bdk, bdv = kernel.backward(
                douts[r][:, plan.q_rows], qs[r][:, plan.q_rows], ks[src][:, plan.kv_rows],
                vs[src][:, plan.kv_rows], outs[r][:, plan.q_rows], lses[r][:, plan.q_rows],
                plan.causal, scale)
            dqs[r][:, plan.q_rows] += bdq.float()
            dks[src][:, plan.kv_rows] += bdk.float()
            dvs[src][:, plan.kv_rows] += bdv.float()
    want = reference(q, k, v, dout, True, scale)
    got = [zigzag_unshard(parts, 1, world) for parts in (outs, lses, dqs, dks, dvs)]
    return {name: rel_err(g, w) for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}


def document_blocks(shape: dict, device) -> dict:
    """Check 2b (module docstring): the largest error over the mixed blocks, per quantity, and
    how many blocks were checked."""
    world, seq = 4, shape["ring_seq"]
    rng, starts = random.Random(0), [0]
    while (nxt := starts[-1] + rng.randint(1, seq // 4)) < seq:
        starts.append(nxt)
    starts = torch.tensor(starts)
    kernel = select_block_kernel(device.type).kernel
    scale = shape["head_dim"] ** -0.5
    worst = dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 0.0)
    scale_of = dict(worst)
    blocks = 0
    for layout in (starts, balanced_layout(starts, seq, world)):
        for rank in range(world):
            for block in plan_document_steps(rank, world, seq // world, layout):
                if block.kind != MASKED:
                    continue
                sq, sk = block.mask.shape
                q, _, _, dout = inputs(shape, sq, device, seed=blocks)
                _, k, v, _ = inputs(shape, sk, device, seed=blocks + 1000)
                want_out, want_lse = masked_block_forward(q.float(), k.float(), v.float(),
                                                          block.mask, scale)
                rects = block_rects(block.mask)
                out, lse = rects_block_forward(q, k, v, rects, scale, kernel)
                # The backward's statistics as a ring hands them over: out in the compute
                # dtype (both sides: dq's rowsum(dO * O) cancels, on rows that see few keys,
                # to the size of out's rounding), lse finite (in a ring a row sees itself).
                out_ring = want_out.to(q.dtype)
                lse_ring = want_lse.nan_to_num(neginf=0.0)
                want = masked_block_backward(dout.float(), q.float(), k.float(), v.float(),
                                             out_ring.float(), lse_ring, block.mask, scale)
                got = rects_block_backward(dout, q, k, v, out_ring, lse_ring, rects, scale,
                                           kernel)
                seen = want_lse.isfinite()
                pairs = [(out, want_out), (lse[seen], want_lse[seen]), *zip(got, want)]
                for name, (g, w) in zip(worst, pairs):
                    worst[name] = max(worst[name], float((g.float() - w).abs().max()))
                    scale_of[name] = max(scale_of[name], float(w.abs().max()))
                blocks += 1
    # Relative to each quantity's largest value over all blocks: a block whose rows each see
    # one key has dq = 0 up to rounding, which a per-block ratio would call a 100% error.
    return {**{name: worst[name] / max(scale_of[name], 1e-30) for name in worst},
            "blocks": blocks}


def init_world_of_one(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    dist.init_process_group(store=store, rank=0, world_size=1,
                            **process_group_args(device, local_rank()))


def self_exchange(device) -> dict:
    """The ring's exchange (batch_isend_irecv) on a ring of one: rank 0 sends to itself."""
    ring = Ring(group=None, ranks=(0,))
    sent = [torch.randn(2, 64, 8, 128, device=device).bfloat16() for _ in range(2)]
    received = [torch.empty_like(t) for t in sent]
    try:
        Exchange(ring, sent, received, tag=1).wait()
    except RuntimeError as err:  # reported, and `ok` None counts as a failed check
        return {"ok": None, "error": str(err).splitlines()[0]}
    return {"ok": all(torch.equal(a, b) for a, b in zip(sent, received))}


def tiny_llama(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def llama_ring_vs_sdpa(device, seq: int) -> dict:
    """Loss and gradients of one bf16 forward/backward, "ring" (a ring of one) against "sdpa"."""
    base = tiny_llama(device, torch.bfloat16)
    ids = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for attn in ("sdpa", "ring"):
        model = copy.deepcopy(base)
        if attn == "ring":
            apply_ring_attention(model, None)  # the world of one as the ring
        else:
            model.set_attn_implementation(attn)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results[attn] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
    (sdpa_loss, sdpa_grads), (ring_loss, ring_grads) = results["sdpa"], results["ring"]
    return {"loss_sdpa": sdpa_loss, "loss_ring": ring_loss,
            "loss_rel_err": abs(ring_loss - sdpa_loss) / abs(sdpa_loss),
            "grad_rel_err_max": max(rel_err(ring_grads[n], g) for n, g in sdpa_grads.items())}


def policy_step(device, storage: torch.dtype, seq: int) -> dict:
    """One AdamW step at lr 2e-5 through the trainer's parallelize (FSDP2 on a world of one)
    with bf16 compute: the share of weights with a gradient that changed, and peak memory."""
    from ray_jobs.train.parallelize import build_mesh, build_optimizer, parallelize, ring_mean_loss
    from specs.degrees import ParallelDims

    layout = build_mesh(ParallelDims(), [[0]], device.type)
    model = tiny_llama(device, storage)
    model.set_attn_implementation("sdpa")
    root = parallelize(model, layout, activation_checkpointing="full",
                       mixed_precision=torch.bfloat16, loss_chunk_tokens=256)
    opt = build_optimizer(root, 2e-5)
    ids = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    before = [p.full_tensor().detach().float().clone() for p in root.parameters()]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    positions = torch.arange(seq, device=device).expand(2, -1)
    ring_mean_loss(*root(ids, positions, labels), layout.ring).backward()
    has_grad = [p.grad.full_tensor() != 0 for p in root.parameters()]
    opt.step()
    changed = moved = 0
    for p, b, g in zip(root.parameters(), before, has_grad):
        changed += int(((p.full_tensor().detach().float() != b) & g).sum())
        moved += int(g.sum())
    params = sum(b.numel() for b in before)
    peak = torch.cuda.max_memory_allocated() / params if device.type == "cuda" else None
    return {"share_changed": changed / moved, "peak_bytes_per_param": peak}


def single_device(device: torch.device, quick: bool) -> dict:
    """The one-device checks (module docstring); the report, with `checks` and `ok`."""
    shape = QUICK if quick else FULL
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "torch": torch.__version__, "world_size": 1, "shape": shape,
                    "selected_kernel": select_block_kernel(device.type).record()}
    report["kernels"] = {name: kernel_parity(kernel, shape, device)
                         for name, kernel in available_kernels(device).items()}
    kernel = select_block_kernel(device.type).kernel
    report["emulated_ring"] = {f"p{p}": emulated_ring(kernel, shape, p, device) for p in (2, 3, 4)}
    report["document_blocks"] = document_blocks(shape, device)
    init_world_of_one(device)
    try:
        if device.type == "cuda":
            report["self_exchange"] = self_exchange(device)
        report["llama_ring_vs_sdpa"] = llama_ring_vs_sdpa(device, 64 if quick else 512)
        seq = 64 if quick else 1024
        fp32 = policy_step(device, torch.float32, seq)
        bf16 = policy_step(device, torch.bfloat16, seq)
    finally:
        dist.destroy_process_group()
    report["share_of_weights_changed_lr2e-5"] = fp32["share_changed"]
    report["share_of_weights_changed_lr2e-5_bf16_storage"] = bf16["share_changed"]
    report["peak_bytes_per_param"] = fp32["peak_bytes_per_param"]
    kernel_errors = [e for k in report["kernels"].values() for e in k.values()]
    ring_errors = [e for r in report["emulated_ring"].values() for e in r.values()]
    llama = report["llama_ring_vs_sdpa"]
    checks = {
        "kernel_parity": bool(kernel_errors) and max(kernel_errors) <= KERNEL_BOUND,
        "emulated_ring": bool(ring_errors) and max(ring_errors) <= KERNEL_BOUND,
        "document_blocks": report["document_blocks"]["blocks"] > 0 and max(
            e for name, e in report["document_blocks"].items() if name != "blocks")
        <= KERNEL_BOUND,
        "llama_loss": llama["loss_rel_err"] <= LLAMA_BOUND,
        "llama_grads": llama["grad_rel_err_max"] <= LLAMA_BOUND,
        "policy_moves_every_weight": fp32["share_changed"] == 1.0,
    }
    if "self_exchange" in report:
        checks["self_exchange"] = report["self_exchange"]["ok"]
    expected = SINGLE_CHECKS + (("self_exchange",) if device.type == "cuda" else ())
    report["checks"] = checks
    report["ok"] = all_passed([checks], expected)
    return report


def ring_exchange(ring: Ring, device: torch.device) -> bool:
    """One exchange around the whole ring: each rank receives what its previous peer sent."""
    def payload(position: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(100 + position)
        return [torch.randn(2, 16, 4, 8, generator=gen).to(device, torch.bfloat16)
                for _ in range(2)]

    sent = payload(ring.rank)
    received = [torch.empty_like(t) for t in sent]
    Exchange(ring, sent, received, tag=1).wait()
    want = payload((ring.rank - 1) % ring.size)
    return all(torch.equal(got, w) for got, w in zip(received, want))


REFERENCE_ATTENTION = "gpu-smoke-reference-sdpa"


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        **kwargs):
    """transformers attention function: plain causal SDPA on the whole sequence, with the K/V
    heads repeated to the query heads. fp32 SDPA with GQA left to SDPA may take the math kernel
    on CUDA, whose S x S scores would not fit at 8K tokens per rank; without GQA it takes the
    memory-efficient one."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                           scale=scaling)
    return out.transpose(1, 2), None


def decoder_layer(shape: dict, seq: int, device: torch.device, dtype: torch.dtype):
    """A Llama decoder layer of `shape` (the same weights on every rank: a fixed seed, built on
    the CPU, rounded to bf16 first) and its rotary embedding, running the reference attention
    until apply_ring_attention binds the ring; parameters frozen, since the check is about the
    layer's and the attention's inputs and outputs."""
    from transformers import AttentionInterface, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    AttentionInterface.register(REFERENCE_ATTENTION, reference_attention)
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         head_dim=shape["head_dim"], max_position_embeddings=seq)
    config._attn_implementation = REFERENCE_ATTENTION
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(torch.bfloat16)
    layer = layer.to(device=device, dtype=dtype).requires_grad_(False)
    return layer, LlamaRotaryEmbedding(config).to(device)


def run_layer(layer, rotary, x: torch.Tensor, positions: torch.Tensor,
              dout: torch.Tensor) -> dict:
    """One forward and backward of `layer` on x (B, S, hidden): its output and input gradient,
    and the attention module's output and the gradient at its input (taken by hooks)."""
    seen: dict = {}

    def before_attention(module, args, kwargs):
        kwargs["hidden_states"].retain_grad()
        seen["attn_in"] = kwargs["hidden_states"]

    def after_attention(module, args, kwargs, output):
        seen["attn_out"] = output[0].detach()

    hooks = [layer.self_attn.register_forward_pre_hook(before_attention, with_kwargs=True),
             layer.self_attn.register_forward_hook(after_attention, with_kwargs=True)]
    try:
        x = x.detach().requires_grad_()
        out = layer(x, position_ids=positions, position_embeddings=rotary(x, positions))
        out.backward(dout)
    finally:
        for hook in hooks:
            hook.remove()
    return {"out": out.detach(), "input_grad": x.grad, "attn_out": seen["attn_out"],
            "attn_input_grad": seen["attn_in"].grad}


def reference_kernels(device: torch.device):
    """On CUDA, SDPA without its math kernel: an error says so rather than an out-of-memory."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ring_layer_vs_sdpa(shape: dict, device: torch.device, ring: Ring,
                       corrupt: bool = False) -> dict:
    """This rank's errors (its zigzag shard of the ring layer against the same shard of the fp32
    "sdpa" reference on the whole sequence), the ring's seconds and peak memory.
    `corrupt` spoils this rank's ring output before the comparison (the tests' broken rank)."""
    world, rank = ring.size, ring.rank
    seq = shape["tokens_per_rank"] * world
    gen = torch.Generator().manual_seed(1)
    x, dout = (torch.randn(1, seq, shape["hidden"], generator=gen).to(device, torch.bfloat16)
               for _ in range(2))
    layer, rotary = decoder_layer(shape, seq, device, torch.bfloat16)
    apply_ring_attention(layer, ring)
    mine = [zigzag_shard(t, 1, rank, world) for t in (x, dout)]
    positions = zigzag_position_ids(seq, rank, world, device).unsqueeze(0)
    run_layer(layer, rotary, mine[0], positions, mine[1])  # warm-up: kernels, NCCL connections
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    got = run_layer(layer, rotary, mine[0], positions, mine[1])
    synchronize(device)
    ring_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del layer
    reference, rotary = decoder_layer(shape, seq, device, torch.float32)
    start = time.perf_counter()
    with reference_kernels(device):
        want = run_layer(reference, rotary, x.float(),
                         torch.arange(seq, device=device).unsqueeze(0), dout.float())
    synchronize(device)
    reference_s = time.perf_counter() - start
    if corrupt:
        got["attn_out"] = got["attn_out"] + want["attn_out"].abs().max()
    errors = {}
    for name in LAYER_QUANTITIES:
        diff = (got[name].float() - zigzag_shard(want[name], 1, rank, world)).abs().max()
        errors[name] = float(diff / want[name].abs().max().clamp_min(1e-30))
    return {"errors": errors, "ring_s": ring_s, "reference_s": reference_s, "peak": peak}


def multi_rank(device: torch.device, shape: dict, corrupt_rank: int | None) -> dict:
    """The N-rank checks (module docstring) over torchrun's world: the report, its "print" true
    on rank 0 only."""
    args = process_group_args(device, local_rank())
    if args["backend"] == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        torch.cuda.set_device(device)
    dist.init_process_group(**args)
    try:
        ring = resolve_ring(None)
        rank, world = ring.rank, ring.size  # ring.rank asks the process group: keep it
        checks: dict = {"ring_exchange": ring_exchange(ring, device)}
        result = ring_layer_vs_sdpa(shape, device, ring, corrupt=rank == corrupt_rank)
        for name, err in result["errors"].items():
            checks[f"ring_vs_sdpa_{name}"] = err <= LLAMA_BOUND
        # The numbers, max over ranks (-1 stands for "no peak memory" off CUDA).
        numbers = torch.tensor([*result["errors"].values(), result["ring_s"],
                                result["reference_s"], result["peak"] or -1.0],
                               dtype=torch.float64, device=device)
        dist.all_reduce(numbers, op=dist.ReduceOp.MAX)
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, checks)
    finally:
        dist.destroy_process_group()
    ok = all_passed(per_rank, MULTI_CHECKS)
    if rank != 0:
        return {"ok": ok, "print": False}
    values = numbers.tolist()
    errors = dict(zip(LAYER_QUANTITIES, values))
    peak = values[-1] if values[-1] >= 0 else None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "world_size": world, "layer": shape,
        "sequence_tokens": shape["tokens_per_rank"] * world,
        "selected_kernel": select_block_kernel(device.type).record(),
        "ring_vs_sdpa_errors": errors, "ring_vs_sdpa_max_err": max(errors.values()),
        "bound": LLAMA_BOUND, "ring_forward_backward_s": round(values[-3], 3),
        "sdpa_reference_s": round(values[-2], 3),
        "ring_max_memory_allocated_gib": None if peak is None else round(peak / 2**30, 2),
        "failed_checks": sorted({name for checks in per_rank for name in MULTI_CHECKS
                                 if checks.get(name) is not True}),
        "ok": ok, "print": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds on a CPU)")
    parser.add_argument("--tokens-per-rank", type=int, default=None,
                        help="multi-rank: each rank's share of the sequence, even (default 8192, "
                             "--quick 64)")
    parser.add_argument("--corrupt-rank", type=int, default=None,
                        help="for the tests: spoil this rank's ring output (ok must turn false)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        why = ("no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
               "machine, or pass --device cpu for the CPU kernels")
        if int(os.environ.get("RANK", "0")) == 0:  # one line, under torchrun too
            print(json.dumps({"skipped": why}))
        return 0
    device = build_device(args.device, local_rank())
    start = time.perf_counter()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        shape = dict(LAYER_QUICK if args.quick else LAYER_FULL)
        if args.tokens_per_rank is not None:
            if args.tokens_per_rank < 2 or args.tokens_per_rank % 2:
                parser.error(f"--tokens-per-rank must be even and >= 2 (a rank's zigzag shard is "
                             f"two equal chunks), got {args.tokens_per_rank}")
            shape["tokens_per_rank"] = args.tokens_per_rank
        report = multi_rank(device, shape, args.corrupt_rank)
        if not report.pop("print"):
            return 0 if report["ok"] else 1
    else:
        report = single_device(device, args.quick)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
