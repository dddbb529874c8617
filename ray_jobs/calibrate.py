"""Measure what the cost model multiplies by, with the kernels and collectives training uses.

`ringpilot calibrate --run RUN.yaml --cluster CLUSTER.yaml --out PROFILE.yaml` starts one Ray
Train worker group (the same TorchTrainer, process group and block kernel as training) and runs
`measure` on every worker:
- point-to-point between ranks 0 and 1: latency (half the round trip of 8 bytes) and bandwidth
  (half the round trip of a 64 MiB tensor sent there and back);
- all_reduce, all_gather and reduce_scatter of 64 MiB over the whole group, as bus bandwidth
  (NCCL-tests' convention: algorithm bandwidth x 2(n-1)/n for all_reduce, x (n-1)/n for the
  other two), so they compare with the point-to-point bandwidth;
- dense matmul throughput at the longest stage's shapes: (tokens per rank) x hidden @ hidden x
  intermediate in the compute dtype;
- the attention block kernel's forward and backward at that stage's block: queries and keys of
  (tokens per rank) each, the model's heads.
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
GB = 1e9


@dataclass(frozen=True)
class Shapes:
    """The shapes one rank computes at (from the stage the measurement is for)."""

    tokens: int  # tokens per rank: seq_len / (ring x ulysses)
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # the compute dtype: "float32" or "bfloat16"

    @classmethod
    def of(cls, run, stage_index: int | None = None) -> Shapes:
        """The longest stage's (or `stage_index`'s) per-rank shapes."""
        from specs.degrees import ulysses_of

        index = max(range(len(run.stages)), key=lambda i: run.stages[i].seq_len) \
            if stage_index is None else stage_index
        stage = run.stages[index]
        ring = stage.ring_degree if isinstance(stage.ring_degree, int) else 2
        m = run.model
        return cls(tokens=stage.seq_len // (ring * ulysses_of(stage)), hidden=m.hidden_size,
                   intermediate=m.intermediate_size, heads=m.num_attention_heads,
                   kv_heads=m.num_key_value_heads, head_dim=m.head_dim, dtype=run.compute_dtype)


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


def measure(shapes: Shapes, repeats: int = 5, device: torch.device | None = None) -> dict | None:
    """Every measurement on this process group; collective. Rank 0 returns them as a dict of
    summaries (others None)."""
    device = device or torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, shapes.dtype)
    out: dict = {}

    # point to point, ranks 0 and 1 (the others wait at the barrier)
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

    if world >= 2:
        lat = [t / 2 * 1e6 for t in timed(ping(8), max(repeats, 20), device)]
        bw = [BIG / (t / 2) / GB for t in timed(ping(BIG), repeats, device)]
        out["p2p_latency_us"], out["p2p_gb_s"] = summarise(lat), summarise(bw)
        dist.barrier()
        n = world
        big = torch.ones(BIG // 4, dtype=torch.float32, device=device)
        shard = torch.empty(BIG // 4 // n, dtype=torch.float32, device=device)
        gathered = torch.empty(shard.numel() * n, dtype=torch.float32, device=device)
        # torch 2.13 renames the tensor forms (*_single); 2.6 has only the old names
        all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
        reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
        for name, fn, factor in [
            ("all_reduce", lambda: dist.all_reduce(big), 2 * (n - 1) / n),
            ("all_gather", lambda: all_gather(gathered, shard), (n - 1) / n),
            ("reduce_scatter", lambda: reduce_scatter(shard, big), (n - 1) / n),
        ]:
            times = timed(fn, repeats, device)
            out[f"{name}/{n}"] = summarise([BIG * factor / t / GB for t in times])

    # dense: one MLP-shaped matmul at the stage's tokens per rank
    a = torch.randn(shapes.tokens, shapes.hidden, dtype=dtype, device=device)
    w = torch.randn(shapes.hidden, shapes.intermediate, dtype=dtype, device=device)
    flops = 2 * shapes.tokens * shapes.hidden * shapes.intermediate
    out["dense_flops"] = summarise([flops / t for t in timed(lambda: a @ w, repeats, device)])

    # attention: one full (non-causal) block of the ring, forward and backward
    kernel = select_block_kernel(device.type).kernel
    q = torch.randn(1, shapes.tokens, shapes.heads, shapes.head_dim, dtype=dtype, device=device)
    k = torch.randn(1, shapes.tokens, shapes.kv_heads, shapes.head_dim, dtype=dtype,
                    device=device)
    v = torch.randn_like(k)
    scale = shapes.head_dim ** -0.5
    attn_flops = 4 * shapes.tokens**2 * shapes.heads * shapes.head_dim
    fwd = timed(lambda: kernel.forward(q, k, v, False, scale), repeats, device)
    o, lse = kernel.forward(q, k, v, False, scale)
    dout = torch.randn_like(o)
    bwd = timed(lambda: kernel.backward(dout, q, k, v, o, lse, False, scale), repeats, device)
    out["attention_flops"] = summarise([attn_flops / t for t in fwd])
    out["attention_bwd_over_fwd"] = summarise([b / f for b, f in zip(bwd, fwd)])

    # every rank measured compute; rank 0 keeps the slowest rank's medians (a step waits for it)
    mine = [out["dense_flops"]["value"], out["attention_flops"]["value"]]
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank != 0:
        return None
    out["dense_flops"]["value"] = min(r[0] for r in every)
    out["attention_flops"]["value"] = min(r[1] for r in every)
    out["ranks"] = world
    return out


def to_profile(measured: dict, *, cluster: str, node_type: str, link: str, base_profile: str,
               shapes: Shapes, backend: str, hops: int = 2) -> dict:
    """The CalibratedProfile document of `measure`'s result (validated by the caller). The two
    ranks' path crosses `hops` links of type `link` (device -> switch -> device: 2): the
    path's bandwidth is the link's, its latency is split evenly over them."""
    links = {}
    if "p2p_gb_s" in measured:
        lat = measured["p2p_latency_us"]
        links[link] = {"bandwidth_gb_s": measured["p2p_gb_s"],
                       "latency_us": {**lat, "value": lat["value"] / hops},
                       "between": f"Ray Train ranks 0 and 1 of one node, {hops} {link} links"}
    return {
        "kind": "ringpilot.io/calibrated-profile", "cluster": cluster, "node_type": node_type,
        "base_profile": base_profile,
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": (f"ringpilot calibrate: {measured['ranks']} {backend} ranks; dense "
                 f"{shapes.tokens}x{shapes.hidden}@{shapes.hidden}x{shapes.intermediate} "
                 f"{shapes.dtype}; attention block {shapes.tokens}x{shapes.tokens}, "
                 f"{shapes.heads} heads of {shapes.head_dim}"),
        "dense_flops": measured["dense_flops"], "attention_flops": measured["attention_flops"],
        "attention_bwd_over_fwd": measured["attention_bwd_over_fwd"],
        "links": links,
        "collectives": {k: v for k, v in measured.items() if "/" in k},
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

    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["gpu"] else torch.device("cpu")
    got = measure(config["shapes"], config["repeats"], device)
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

    from ray_jobs.train import connect_ray

    node_type = node_type or next(iter(spec.node_types))
    if node_type not in spec.node_types:
        raise ValueError(f"--node-type {node_type!r} is not a node type of cluster {spec.name!r} "
                         f"({', '.join(sorted(spec.node_types))})")
    res, shapes = run.resources, Shapes.of(run, stage_index)
    workers = min(2, res.workers)
    connect_ray(address, workers * res.cpus_per_worker)
    gpu = res.device == "gpu"
    scaling = ScalingConfig(num_workers=workers, use_gpu=gpu, placement_strategy="STRICT_PACK",
                            resources_per_worker={"CPU": res.cpus_per_worker,
                                                  **({"GPU": 1} if gpu else {})})
    with tempfile.TemporaryDirectory(prefix="ringpilot-calibrate-") as storage:
        trainer = TorchTrainer(
            _worker, train_loop_config={"shapes": shapes, "repeats": repeats, "gpu": gpu,
                                        "threads": res.cpus_per_worker},
            scaling_config=scaling,
            run_config=RunConfig(name="ringpilot-calibrate", storage_path=storage))
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            measured = json.loads((Path(d) / "measured.json").read_text())
    link = same_switch_link(spec, node_type)
    doc = to_profile(measured, cluster=spec.name, node_type=node_type, link=link or "",
                     base_profile=spec.profile, shapes=shapes,
                     backend="nccl" if gpu else "gloo")
    if link is None:
        doc["links"] = {}
    return doc
