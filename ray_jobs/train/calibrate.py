"""Measure what the cost model multiplies by, with the kernels and collectives training uses.

`ringpilot calibrate --run RUN.yaml --cluster CLUSTER.yaml --out PROFILE.yaml` starts one Ray
Train worker group (the same TorchTrainer, process group and block kernel as training) and runs
`measure` on every worker:
- point-to-point between ranks 0 and 1: bandwidth (half the round trip of a 64 MiB tensor sent
  there and back), and the latency of one hop (a one-element all-reduce over its 2(n-1) hops);
- all_reduce, all_gather and reduce_scatter of 64 MiB over the whole group, as bus bandwidth
  (NCCL-tests' convention: algorithm bandwidth x 2(n-1)/n for all_reduce, x (n-1)/n for the
  other two), so they compare with the point-to-point bandwidth;
- at every stage's micro-batch per rank (B sequences of n local tokens): the dense throughput of
  one decoder layer of the model (transformers' LlamaDecoderLayer, in the compute dtype, forward
  and backward, with its attention replaced by a pass-through so only the projections, MLP,
  norms, RoPE and their glue are timed), and the attention block kernel's forward and backward
  at that block (B x n queries against n keys, the model's heads);
- how much communication hides behind compute: an all-gather started asynchronously while
  matmuls of about its length run, against each alone;
- the optimizer: gradient clipping and AdamW (the trainer's own functions) over one decoder
  layer sharded by FSDP2 across the group, as parameters updated per second per device.
Each number is the median of `repeats` runs after one warm-up, with its spread. The result is
a `topology.calibration.CalibratedProfile` for `ringpilot plan --profile`.

Here the group is two CPU workers on one node (gloo on loopback), so the one link class measured
is the one joining two devices of a node. Measuring every link class of a multi-node cluster
needs worker pairs placed across each class (label selectors per pair); not done yet.
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ray_jobs.ring_attention.kernels import select_block_kernel

BIG = 64 * 2**20  # bytes moved per bandwidth measurement
OVERLAP_BYTES = 16 * 2**20  # bytes all-gathered while compute runs
GB = 1e9


@dataclass(frozen=True)
class Shapes:
    """The shapes one rank computes at in one stage's micro-step."""

    tokens: int  # local tokens per sequence: seq_len / (ring x ulysses)
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # the compute dtype: "float32" or "bfloat16"
    batch: int = 1  # sequences per micro-step: batch_size / dp
    state_dtype: str = "float32"  # the weights' storage dtype (the optimizer's)

    @property
    def micro_tokens(self) -> int:
        """Tokens per rank per micro-step: what the cost model's rates are keyed by."""
        return self.batch * self.tokens

    @classmethod
    def of(cls, run, stage_index: int | None = None) -> Shapes:
        """The longest stage's (or `stage_index`'s) per-rank shapes; a degree left to the
        planner ('auto') counts as a ring of 2 and one data-parallel replica."""
        from specs.degrees import ulysses_of

        index = max(range(len(run.stages)), key=lambda i: run.stages[i].seq_len) \
            if stage_index is None else stage_index
        stage = run.stages[index]
        ring = stage.ring_degree if isinstance(stage.ring_degree, int) else 2
        dp = stage.data_parallel_degree if isinstance(stage.data_parallel_degree, int) else 1
        m = run.model
        return cls(tokens=stage.seq_len // (ring * ulysses_of(stage)), hidden=m.hidden_size,
                   intermediate=m.intermediate_size, heads=m.num_attention_heads,
                   kv_heads=m.num_key_value_heads, head_dim=m.head_dim, dtype=run.compute_dtype,
                   batch=max(1, stage.batch_size // dp), state_dtype=m.dtype)

    @classmethod
    def stages(cls, run) -> list[Shapes]:
        """Every stage's shapes, one per micro-batch size (tokens per rank; of stages alike in
        it, the one with the longest sequences), smallest first."""
        by_size: dict[int, Shapes] = {}
        for sh in sorted((cls.of(run, i) for i in range(len(run.stages))),
                         key=lambda sh: sh.tokens):
            by_size[sh.micro_tokens] = sh
        return [by_size[k] for k in sorted(by_size)]


def summarise(values: list[float]) -> dict:
    """Median, spread ((max - min) / median) and count: a `Measured` of the profile."""
    med = statistics.median(values)
    return {"value": med, "spread": (max(values) - min(values)) / med if med else 0.0,
            "samples": len(values)}


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` calls after one warm-up (synchronised on CUDA)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


NO_ATTENTION = "ringpilot_no_attention"


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    """A decoder layer's attention replaced by a pass-through of its queries (keys and values
    still get their gradient), so timing the layer times everything but attention."""
    out = query.transpose(1, 2) + 0.0 * (key.mean() + value.mean())
    return out, None


def decoder_layer(shapes: Shapes, device: torch.device, dtype: torch.dtype):
    """One Llama decoder layer of the model's shapes, its attention passed through (until
    apply_layout binds a ring to it), and the RoPE table of its n local tokens."""
    from transformers import AttentionInterface, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    AttentionInterface.register(NO_ATTENTION, _no_attention)
    config = LlamaConfig(hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
                         num_attention_heads=shapes.heads, num_key_value_heads=shapes.kv_heads,
                         head_dim=shapes.head_dim, num_hidden_layers=1,
                         max_position_embeddings=max(shapes.tokens, 2))
    config._attn_implementation = NO_ATTENTION
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device=device, dtype=dtype)
    positions = torch.arange(shapes.tokens, device=device).unsqueeze(0)
    x = torch.zeros(1, shapes.tokens, shapes.hidden, device=device, dtype=dtype)
    rope = LlamaRotaryEmbedding(config).to(device)(x, positions)
    return layer, rope


def measure(stages: Shapes | list[Shapes], repeats: int = 5,
            device: torch.device | None = None) -> dict | None:
    """Every measurement on this process group; collective. Rank 0 returns them as a dict of
    summaries (others None). `stages`: the shapes of each stage (Shapes.stages), smallest
    first; the dense and attention numbers without a size are the largest one's."""
    device = device or torch.device("cpu")
    stages = [stages] if isinstance(stages, Shapes) else list(stages)
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {}
    if world >= 2:
        out.update(_links_and_collectives(rank, world, repeats, device))
        out["comm_overlap"] = _overlap(stages[-1], repeats, device)
        out["optimizer_params_per_s"] = _optimizer(stages[-1], world, repeats, device)

    for shapes in stages:
        dense, fwd, bwd_over_fwd = _compute(shapes, repeats, device)
        out[f"dense_at/{shapes.micro_tokens}"] = dense
        out[f"attention_at/{shapes.micro_tokens}"] = fwd
        out["attention_bwd_over_fwd"] = bwd_over_fwd  # the largest (last) shape's
        if world >= 2:
            layer, root = _framework_overhead(
                shapes, world, repeats, device, dense=dense["value"], attention=fwd["value"],
                bwd_over_fwd=bwd_over_fwd["value"], p2p=out)
            out[f"layer_overhead_at/{shapes.micro_tokens}"] = layer
            out[f"root_overhead_at/{shapes.micro_tokens}"] = root
    out["dense_flops"] = out[f"dense_at/{stages[-1].micro_tokens}"]
    out["attention_flops"] = out[f"attention_at/{stages[-1].micro_tokens}"]

    # every rank measured compute; rank 0 keeps the slowest rank's medians (a step waits for it)
    rates = sorted(k for k in out if k.startswith(("dense_at/", "attention_at/")))
    overheads = sorted(k for k in out if k.startswith(("layer_overhead_at/",
                                                        "root_overhead_at/")))
    every = [None] * world
    dist.all_gather_object(every, [out[k]["value"] for k in rates + overheads])
    if rank != 0:
        return None
    for i, k in enumerate(rates):
        out[k] = {**out[k], "value": min(r[i] for r in every)}
    for i, k in enumerate(overheads, start=len(rates)):
        out[k] = {**out[k], "value": max(r[i] for r in every)}
    out["dense_flops"] = out[f"dense_at/{stages[-1].micro_tokens}"]
    out["attention_flops"] = out[f"attention_at/{stages[-1].micro_tokens}"]
    out["ranks"] = world
    return out


def _links_and_collectives(rank: int, world: int, repeats: int, device: torch.device) -> dict:
    """Point-to-point latency and bandwidth between ranks 0 and 1 (the others wait at the
    barrier), and the bus bandwidth of the three collectives over the whole group."""
    out = {}

    def ping(nbytes: int) -> Callable[[], None]:
        buf = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32, device=device)

        def go() -> None:
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
        return go

    # latency: a one-element all-reduce, as the step's small messages see it (both ranks busy
    # in the same collective; a ping-pong measures how fast a sleeping receiver wakes instead),
    # over its 2(n-1) ring hops
    one = torch.zeros(1, dtype=torch.float32, device=device)
    lat = [t / (2 * (world - 1)) * 1e6
           for t in timed(lambda: dist.all_reduce(one), max(repeats, 20), device)]
    bw = [BIG / (t / 2) / GB for t in timed(ping(BIG), repeats, device)]
    out["p2p_latency_us"], out["p2p_gb_s"] = summarise(lat), summarise(bw)
    dist.barrier()
    n = world
    big = torch.ones(BIG // 4, dtype=torch.float32, device=device)
    shard = torch.empty(BIG // 4 // n, dtype=torch.float32, device=device)
    gathered = torch.empty(shard.numel() * n, dtype=torch.float32, device=device)
    for name, fn, factor in [
        ("all_reduce", lambda: dist.all_reduce(big), 2 * (n - 1) / n),
        ("all_gather", lambda: _all_gather(gathered, shard), (n - 1) / n),
        ("reduce_scatter", lambda: _reduce_scatter(shard, big), (n - 1) / n),
    ]:
        times = timed(fn, repeats, device)
        out[f"{name}/{n}"] = summarise([BIG * factor / t / GB for t in times])
    return out


def _all_gather(output: torch.Tensor, shard: torch.Tensor, async_op: bool = False):
    # torch 2.13 renames the tensor forms (*_single); 2.6 has only the old names
    fn = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    return fn(output, shard, async_op=async_op)


def _reduce_scatter(shard: torch.Tensor, full: torch.Tensor):
    fn = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    return fn(shard, full)


def _compute(shapes: Shapes, repeats: int, device: torch.device) -> tuple[dict, dict, dict]:
    """(dense FLOP/s of a decoder layer, attention block forward FLOP/s, its backward over
    forward) at one stage's micro-batch."""
    dtype = getattr(torch, shapes.dtype)
    layer, rope = decoder_layer(shapes, device, dtype)
    x = torch.randn(shapes.batch, shapes.tokens, shapes.hidden, device=device, dtype=dtype,
                    requires_grad=True)

    def forward_backward() -> None:
        layer(x, position_embeddings=rope).sum().backward()

    params = sum(p.numel() for p in layer.parameters())
    flops = 6 * params * shapes.micro_tokens
    dense = summarise([flops / t for t in timed(forward_backward, repeats, device)])

    # the attention block of the ring: B x n queries against n keys, not causal
    kernel = select_block_kernel(device.type).kernel
    q = torch.randn(shapes.batch, shapes.tokens, shapes.heads, shapes.head_dim, dtype=dtype,
                    device=device)
    k = torch.randn(shapes.batch, shapes.tokens, shapes.kv_heads, shapes.head_dim, dtype=dtype,
                    device=device)
    v = torch.randn_like(k)
    scale = shapes.head_dim ** -0.5
    attn_flops = 4 * shapes.batch * shapes.tokens**2 * shapes.heads * shapes.head_dim
    fwd = timed(lambda: kernel.forward(q, k, v, False, scale), repeats, device)
    o, lse = kernel.forward(q, k, v, False, scale)
    dout = torch.randn_like(o)
    bwd = timed(lambda: kernel.backward(dout, q, k, v, o, lse, False, scale), repeats, device)
    return (dense, summarise([attn_flops / t for t in fwd]),
            summarise([b / f for b, f in zip(bwd, fwd)]))


def _framework_overhead(shapes: Shapes, world: int, repeats: int, device: torch.device, *,
                        dense: float, attention: float, bwd_over_fwd: float, p2p: dict
                        ) -> tuple[dict, dict]:
    """(per decoder layer, per root) seconds per micro-step beyond what the model prices.

    Per layer: what a decoder layer costs as training runs it, beyond the compute
    and communication the cost model prices: a stack of decoder layers checkpointed, each
    sharded by FSDP2 over the group under a root, computing ring attention around it (the
    trainer's own apply_layout), forward and backward, timed with two layers and with one; the
    difference is one layer without the root's own per-step work. Less its dense work at
    `dense` FLOP/s (forward again for the recompute), its ring attention's blocks at
    `attention` FLOP/s, its K/V hops and its FSDP collectives (2 all-gathers, 1
    reduce-scatter) as measured here, what is left is the framework's own time (FSDP's hooks
    and copies, DTensor, the ring's merges and buffers, Python between kernels): on a CPU
    worker much of a small layer's step; on a GPU it mostly runs ahead of the kernels and comes
    out near zero. Per root: what the one-layer stack costs beyond its layer (priced plus its
    overhead): the FSDP root's own work per forward and backward. Never negative."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from ray_jobs.ring_attention import Ring
    from ray_jobs.train.parallelize import apply_layout

    dtype = getattr(torch, shapes.dtype)
    mesh = init_device_mesh(device.type, (world,))
    ring = Ring(group=dist.group.WORLD, ranks=tuple(range(world)))

    class Stack(nn.Module):
        def __init__(self, count: int):
            super().__init__()
            built = [decoder_layer(shapes, device, dtype) for _ in range(count)]
            self.rope = built[0][1]
            self.layers = nn.ModuleList(layer for layer, _ in built)
            apply_layout(self, self.layers, attention=ring, fsdp_mesh=mesh,
                         activation_checkpointing="full", mixed_precision=None)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                h = layer(h, position_embeddings=self.rope)
            return h

    x = torch.randn(shapes.batch, shapes.tokens, shapes.hidden, device=device, dtype=dtype,
                    requires_grad=True)

    def step(model: nn.Module) -> Callable[[], None]:
        def go() -> None:
            model(x).sum().backward()
        return go

    one, two = Stack(1), Stack(2)
    params = sum(p.numel() for p in one.parameters())
    # interleaved, so a slow moment of the machine lands on both of a pair; the difference of
    # each stack's fastest run (a slow moment hits one run of a pair, not both) is the estimate,
    # the pairs' differences give its spread
    runs = [timed(step(one), 1, device) + timed(step(two), 1, device) for _ in range(repeats)]
    whole = [t2 - t1 for t1, t2 in runs]
    best = min(t2 for _, t2 in runs) - min(t1 for t1, _ in runs)

    # what the cost model prices, measured here at this shape
    elem = torch.finfo(dtype).bits // 8
    shard = torch.empty(max(params // world, 1), dtype=dtype, device=device)
    full = torch.empty(shard.numel() * world, dtype=dtype, device=device)
    gather = statistics.median(timed(lambda: _all_gather(full, shard), repeats, device))
    reduce = statistics.median(timed(lambda: _reduce_scatter(shard, full), repeats, device))
    R, n, B = world, shapes.tokens, shapes.batch
    block = 2 * B * n * n * shapes.heads * shapes.head_dim / attention  # half a block: causal
    kv = 2 * B * n * shapes.kv_heads * shapes.head_dim * elem

    def hop(nbytes: float) -> float:
        return p2p["p2p_latency_us"]["value"] * 1e-6 + nbytes / (p2p["p2p_gb_s"]["value"] * GB)

    priced = (8 * params * B * n / dense
              + R * block * (2 + bwd_over_fwd)
              + (R - 1) * (2 * hop(kv) + hop(2 * kv))
              + 2 * gather + reduce)
    left = [max(0.0, t - priced) for t in whole]
    value = max(0.0, best - priced)
    roots = [max(0.0, t1 - priced - value) for t1, _ in runs]
    root = max(0.0, min(t1 for t1, _ in runs) - priced - value)
    return ({"value": value, "spread": (max(left) - min(left)) / value if value else 0.0,
             "samples": len(left)},
            {"value": root, "spread": (max(roots) - min(roots)) / root if root else 0.0,
             "samples": len(roots)})


def _overlap(shapes: Shapes, repeats: int, device: torch.device) -> dict:
    """Fraction of an all-gather that hides behind compute: (compute + comm - both) over the
    shorter of the two, with compute (matmuls of the stage's dense shape) sized to about the
    all-gather's length; 0 when running them together takes their sum, 1 when it takes the
    longer one's."""
    dtype = getattr(torch, shapes.dtype)
    world = dist.get_world_size()
    shard = torch.ones(OVERLAP_BYTES // 4 // world, dtype=torch.float32, device=device)
    gathered = torch.empty(shard.numel() * world, dtype=torch.float32, device=device)
    a = torch.randn(shapes.micro_tokens, shapes.hidden, dtype=dtype, device=device)
    w = torch.randn(shapes.hidden, shapes.intermediate, dtype=dtype, device=device)
    comm = statistics.median(timed(lambda: _all_gather(gathered, shard), repeats, device))
    one = statistics.median(timed(lambda: a @ w, repeats, device))
    count = [max(1, round(comm / one))]
    dist.broadcast_object_list(count)  # every rank computes as long: the gathers pair up

    def compute() -> None:
        for _ in range(count[0]):
            a @ w

    def both() -> None:
        work = _all_gather(gathered, shard, async_op=True)
        compute()
        work.wait()

    fractions = []
    for _ in range(repeats):
        t_comp, t_comm = (statistics.median(timed(f, 1, device))
                          for f in (compute, lambda: _all_gather(gathered, shard)))
        t_both = statistics.median(timed(both, 1, device))
        hidden = (t_comp + t_comm - t_both) / min(t_comp, t_comm)
        fractions.append(min(1.0, max(0.0, hidden)))
    med = statistics.median(fractions)
    return {"value": med, "spread": max(fractions) - min(fractions), "samples": len(fractions)}


def _optimizer(shapes: Shapes, world: int, repeats: int, device: torch.device) -> dict:
    """Parameters per second per device that the trainer's clipping and AdamW update: one
    decoder layer sharded by FSDP2 over the group, its gradients from one forward and
    backward, then clip_gradients + step timed (the gradients stay: every step updates)."""
    from torch.distributed.device_mesh import init_device_mesh

    from ray_jobs.train.parallelize import apply_fsdp, build_optimizer, clip_gradients

    layer, rope = decoder_layer(shapes, device, getattr(torch, shapes.state_dtype))
    # the layer is its own FSDP root: no decoder layers inside it to shard apart
    apply_fsdp(layer, (), init_device_mesh(device.type, (world,)), None)
    x = torch.randn(1, shapes.tokens, shapes.hidden, device=device,
                    dtype=getattr(torch, shapes.state_dtype))
    layer(x, position_embeddings=rope).sum().backward()
    opt = build_optimizer(layer, 1e-4)

    def step() -> None:
        clip_gradients(layer, 1.0)
        opt.step()

    per_device = sum(p.numel() for p in layer.parameters()) / world
    # a short step (milliseconds on a small model): more repeats for a steady median
    return summarise([per_device / t for t in timed(step, max(repeats, 20), device)])


COLLECTIVES = ("all_reduce/", "all_gather/", "reduce_scatter/")


def to_profile(measured: dict, *, cluster: str, node_type: str, link: str, base_profile: str,
               stages: Shapes | list[Shapes], backend: str, hops: int = 2) -> dict:
    """The CalibratedProfile document of `measure`'s result (validated by the caller). The two
    ranks' path crosses `hops` links of type `link` (device -> switch -> device: 2): the
    path's bandwidth is the link's, its latency is split evenly over them."""
    stages = [stages] if isinstance(stages, Shapes) else list(stages)
    links = {}
    if "p2p_gb_s" in measured:
        lat = measured["p2p_latency_us"]
        links[link] = {"bandwidth_gb_s": measured["p2p_gb_s"],
                       "latency_us": {**lat, "value": lat["value"] / hops},
                       "between": f"Ray Train ranks 0 and 1 of one node, {hops} {link} links"}
    last = stages[-1]
    micro = ", ".join(f"{sh.batch}x{sh.tokens}" for sh in stages)
    return {
        "kind": "ringpilot.io/calibrated-profile", "cluster": cluster, "node_type": node_type,
        "base_profile": base_profile,
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": (f"ringpilot calibrate: {measured['ranks']} {backend} ranks; decoder layer "
                 f"(hidden {last.hidden}, intermediate {last.intermediate}) and attention block "
                 f"({last.heads} heads of {last.head_dim}) at micro-batches of {micro} "
                 f"sequences x tokens, {last.dtype}"),
        "dense_flops": measured["dense_flops"], "attention_flops": measured["attention_flops"],
        "attention_bwd_over_fwd": measured["attention_bwd_over_fwd"],
        "dense_flops_at": {int(k.split("/")[1]): v for k, v in measured.items()
                           if k.startswith("dense_at/")},
        "attention_flops_at": {int(k.split("/")[1]): v for k, v in measured.items()
                               if k.startswith("attention_at/")},
        "layer_overhead_s_at": {int(k.split("/")[1]): v for k, v in measured.items()
                                if k.startswith("layer_overhead_at/")},
        "root_overhead_s_at": {int(k.split("/")[1]): v for k, v in measured.items()
                               if k.startswith("root_overhead_at/")},
        **{k: measured[k] for k in ("comm_overlap", "optimizer_params_per_s") if k in measured},
        "links": links,
        "collectives": {k: v for k, v in measured.items() if k.startswith(COLLECTIVES)},
    }


def same_switch_link(spec, node_type: str) -> str | None:
    """The link type joining two devices of one node under one switch: what the first two
    workers Ray places on a node talk over (local ranks 0 and 1). None if no switch has two."""
    for socket in spec.node_types[node_type].sockets:
        for switch in socket.switches:
            if len(switch.gpus) >= 2:
                return switch.gpu_link
    return None


def _worker(config: dict) -> None:
    import json

    import ray.train

    from ray_jobs.ray_setup import quiet_worker_logs

    quiet_worker_logs()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["gpu"] else torch.device("cpu")
    got = measure(config["stages"], config["repeats"], device)
    # Ray Train's Result carries rank 0's reported checkpoint: the numbers travel in one.
    with tempfile.TemporaryDirectory(prefix="ringpilot-measured-") as d:
        checkpoint = None
        if got is not None:
            (Path(d) / "measured.json").write_text(json.dumps(got))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({}, checkpoint=checkpoint)


def calibrate(run, spec, *, node_type: str | None = None, repeats: int = 5,
              address: str | None = None, stage_index: int | None = None) -> dict:
    """Run `measure` on two Ray Train workers of `run`'s resources on one node of `spec`; the
    CalibratedProfile document (a dict). Starts or joins Ray like the trainer."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_jobs.ray_setup import connect_ray, quiet_run_config

    node_type = node_type or next(iter(spec.node_types))
    if node_type not in spec.node_types:
        raise ValueError(f"--node-type {node_type!r} is not a node type of cluster {spec.name!r} "
                         f"({', '.join(sorted(spec.node_types))})")
    res = run.resources
    stages = [Shapes.of(run, stage_index)] if stage_index is not None else Shapes.stages(run)
    workers = min(2, res.workers)
    connect_ray(address, workers * res.cpus_per_worker)
    gpu = res.device == "gpu"
    scaling = ScalingConfig(num_workers=workers, use_gpu=gpu, placement_strategy="STRICT_PACK",
                            resources_per_worker={"CPU": res.cpus_per_worker,
                                                  **({"GPU": 1} if gpu else {})})
    with tempfile.TemporaryDirectory(prefix="ringpilot-calibrate-") as storage:
        trainer = TorchTrainer(
            _worker, train_loop_config={"stages": stages, "repeats": repeats, "gpu": gpu,
                                        "threads": res.cpus_per_worker},
            scaling_config=scaling,
            run_config=RunConfig(name="ringpilot-calibrate", storage_path=storage,
                                 **quiet_run_config()))
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            measured = json.loads((Path(d) / "measured.json").read_text())
    link = same_switch_link(spec, node_type)
    doc = to_profile(measured, cluster=spec.name, node_type=node_type, link=link or "",
                     base_profile=spec.profile, stages=stages,
                     backend="nccl" if gpu else "gloo")
    if link is None:
        doc["links"] = {}
    return doc


def calibrated_plan(run, cluster: str | Path, out: Path, *, address: str | None = None,
                    repeats: int = 5):
    """(the plan of `run` on `cluster` with a calibrated profile, whether it was measured now).

    The profile is `out`: kept when a valid one for this cluster is already there (a resumed
    run keeps its calibration), else measured (`calibrate`), checked against the cluster and
    written atomically. SpecError for a bad cluster file, CalibrationError for a measurement
    that does not fit the cluster (nothing written then)."""
    import yaml

    from specs.atomic import atomic_write
    from specs.loading import SpecError, load_model
    from topology.calibration import CalibratedProfile, CalibrationError, apply_profile
    from topology.run_plan import plan_run
    from topology.sources import load_cluster

    spec = load_cluster(cluster)
    profile = None
    if out.is_file():
        try:
            profile = load_model(out, CalibratedProfile)
            apply_profile(spec, profile)
        except (SpecError, CalibrationError):
            profile = None  # another cluster's, or damaged: measure again
    fresh = profile is None
    if fresh:
        profile = CalibratedProfile.model_validate(
            calibrate(run, spec, repeats=repeats, address=address))
    calibrated, hardware, notes = apply_profile(spec, profile)
    if fresh:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
    return plan_run(calibrated, run, profile=hardware, notes=notes), fresh
