"""The GPU path's first run: a smoke check on one CUDA device, under ten minutes, no network.

    .venv/bin/python benchmarks/gpu_smoke.py                  # on a GPU machine, one device
    .venv/bin/python benchmarks/gpu_smoke.py --device cpu --quick   # the same checks on CPU

Prints one JSON line (the last). Without a CUDA device it prints {"skipped": why} and exits 0;
`--device cpu` runs every check on the CPU kernels (gloo instead of NCCL), which is how the test
suite keeps this script honest on machines without a GPU. `ok` is true only when every check of
the mode ran and passed: a check that did not run, or ran and could not say, is a failure.
Exit status 0 iff `ok`.

One device (no torchrun, or a world of one). Each check against an fp32 reference computed from
the same (bf16-rounded) inputs:
1. kernel parity, for every block kernel available on the device (on CUDA: torch's own flash
   op, and flash-attn when it imports): forward output, log-sum-exp, dq, dk, dv, causal and
   not, at B=2, H=32, Hk=8, D=128, S=1024 in bf16. Errors are max |got - want| / max |want|.
2. an emulated ring of P = 2, 3, 4 on one device: the zigzag block plan, the kernel and the
   log-sum-exp merge called directly (no process group, no autograd), forward and backward,
   against full attention.
3. (CUDA only) the point-to-point exchange over NCCL on a ring of one rank sending to itself:
   what arrives is what was sent. gloo refuses a send to oneself, so on CPU this check is not
   part of the mode.
4. a tiny bf16 Llama's loss and gradients with attn_implementation "ring" (a ring of one) and
   "sdpa".
5. the precision policy: the share of the weights with a gradient that one AdamW step at
   lr 2e-5 changes, with fp32 master weights and bf16 compute (the trainer's default), and
   with bf16 storage for contrast; the peak memory of that step per parameter (CUDA only).
Bounds (bf16): 2e-2 for the kernels and rings, 5e-2 for the Llama's loss and gradients; the
policy step must move every weight.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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
    select_block_kernel,
    zigzag_shard,
    zigzag_unshard,
)
from ray_jobs.ring_attention.comm import Exchange  # noqa: E402
from ray_jobs.ring_attention.kernels import (  # noqa: E402
    CpuFlashKernel,
    FlashAttnKernel,
    TorchCudaFlashKernel,
)
from ray_jobs.ring_attention.ring import plan_block  # noqa: E402

KERNEL_BOUND, LLAMA_BOUND = 2e-2, 5e-2
FULL = {"batch": 2, "heads": 32, "kv_heads": 8, "head_dim": 128, "seq": 1024, "ring_seq": 1152}
QUICK = {"batch": 1, "heads": 8, "kv_heads": 2, "head_dim": 64, "seq": 128, "ring_seq": 96}
# The checks that must run and pass (on CUDA also "self_exchange").
SINGLE_CHECKS = ("kernel_parity", "emulated_ring", "llama_loss", "llama_grads",
                 "policy_moves_every_weight")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds on a CPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device here (torch.cuda.is_available() is False); "
                          "run it on a GPU machine, or pass --device cpu for the CPU kernels"}))
        return 0
    device = build_device(args.device, local_rank())
    start = time.perf_counter()
    report = single_device(device, args.quick)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
