"""Evaluation gangs: P Ray actors that evaluate one context too long for one evaluator.

A gang is started together (one placement group of P bundles, gang-scheduled: all or none),
joined in a gloo (CPU) or NCCL (GPU) process group whose rank order is the ring order the
caller gives (the planner's, `plan.json` eval section), and loads the checkpoint in every member
with the sequence-parallel inference attention (`ray_jobs.ring_attention.inference`): ring
prefill with the same exact ring attention as training, K/V kept sharded where it was computed,
and decoding where every member attends the new token to its own shard and the partial outputs
merge through their log-sum-exp. The weights are replicated in every member; only the
sequence (and its KV cache) is split.

Failure: a member that dies or raises fails the gang: every member is killed and the placement
group removed, and `GangFailed` goes up to the evaluation, which the scheduler retries as a
whole. A gang that cannot be placed raises `GangUnplaceable` at once when it is larger than the
cluster, or after `place_timeout_s` when its resources stay taken; it never hangs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ray_jobs.ray_setup import free_port

GANG_RANK_TIMEOUT_S = 300.0  # gloo/NCCL collectives of a gang give up after this
NODE_LABEL = "ringpilot.io/node"  # ray_jobs.train.placement's: `ray start --labels` per node


def node_selector(nodes: tuple[str, ...] | list[str]) -> dict[str, str]:
    """A Ray label selector for "on one of `nodes`" (the plan's evaluation nodes)."""
    return {NODE_LABEL: f"in({', '.join(nodes)})"}


class GangError(RuntimeError):
    """A gang could not evaluate (base class)."""


class GangUnplaceable(GangError):
    """The gang's P bundles cannot be placed on the cluster (now or ever)."""


class GangFailed(GangError):
    """A gang member died or raised; the whole gang was torn down."""


class GangMember:
    """One member of an evaluation gang (a Ray actor, one per device or CPU process)."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        import transformers.models.llama.modeling_llama  # noqa: F401
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = None
        self.ring = None

    def where(self) -> tuple[str, tuple[int, ...]]:
        """(node IP, GPU ids) this member runs on: the gang's ring order follows them."""
        import ray

        return ray.util.get_node_ip_address(), tuple(sorted(ray.get_gpu_ids()))

    def address(self) -> tuple[str, int]:
        """(host, free port) for the process group's rendezvous (asked of member 0)."""
        import ray

        return ray.util.get_node_ip_address(), free_port("0.0.0.0")

    def join(self, rank: int, world: int, host: str, port: int, ring: list[int]) -> int:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        from ray_jobs.ring_attention.comm import Ring

        if host in ("127.0.0.1", "localhost"):  # gloo picks an interface by hostname otherwise
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=GANG_RANK_TIMEOUT_S))
        self.ring = Ring(group=None, ranks=tuple(ring))
        return os.getpid()

    def load(self, checkpoint: str, compute_dtype: str = "float32") -> None:
        import torch

        from ray_jobs.eval.model import load_checkpoint
        from ray_jobs.ring_attention.inference import (
            INFERENCE_ATTENTION,
            register_inference_attention,
        )

        # the evaluator's dtype rule (bf16 on CUDA for a bf16 run): the ring refuses fp32 there
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = load_checkpoint(checkpoint, device, compute_dtype)
        register_inference_attention()
        model.set_attn_implementation(INFERENCE_ATTENTION)
        self.model = model

    def generate(self, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
        from ray_jobs.ring_attention.inference import greedy_generate

        return greedy_generate(self.model, self.ring, prompt, max_new_tokens, eos)

    def timed(self, prompt: list[int], new_tokens: int) -> dict:
        """Prefill and `new_tokens` forced decoding steps, timed (benchmarks)."""
        import torch.distributed as dist

        from ray_jobs.ring_attention.inference import GangSession

        dist.barrier()
        t0 = time.perf_counter()
        session = GangSession(self.model, self.ring, new_tokens)
        logits = session.prefill(prompt)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            logits = session.step(int(logits.argmax()))
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s_per_token": (t2 - t1) / max(new_tokens, 1)}

    def prefill_logits(self, prompt: list[int]):
        """Logits of every prompt position (S, vocab) as numpy (checks)."""
        from ray_jobs.ring_attention.inference import GangSession

        return GangSession(self.model, self.ring, 1).prefill(prompt, all_logits=True).numpy()

    def pid(self) -> int:
        return os.getpid()


@dataclass
class EvalGang:
    """Driver side of a gang: start, load, generate, shut down.

    size: members; cpus/gpus: each member's resources (eval.cpus / eval.gpus, never the
    training workers'); ring: the order of the members around the ring (member indices),
    default: by (node, GPU ids) once placed (`locality_order`), else 0..P-1. Use as a context
    manager, or call start() and shutdown().
    """

    size: int
    cpus: float = 1.0
    gpus: float = 0.0
    ring: list[int] | None = None
    place_timeout_s: float = 60.0
    locality_order: bool = True  # order the ring by (node, GPU ids) once placed
    # the plan's evaluation nodes (NODE_LABEL values): every bundle is placed on one of them,
    # never beside the training workers; empty: wherever Ray finds room
    nodes: tuple[str, ...] = ()
    members: list = field(default_factory=list)
    _pg: object = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a gang needs at least one member, got size {self.size}")
        if self.ring is not None:
            self.locality_order = False  # the caller's order (e.g. the plan's) stands
        order = self.ring if self.ring is not None else list(range(self.size))
        if sorted(order) != list(range(self.size)):
            raise ValueError(f"ring {order} is not an order of members 0..{self.size - 1}")
        self.ring = list(order)

    def __enter__(self) -> EvalGang:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _check_fits(self) -> None:
        import ray

        total = ray.cluster_resources()
        for name, each in (("CPU", self.cpus), ("GPU", self.gpus)):
            need, have = each * self.size, total.get(name, 0.0)
            if need > have:
                raise GangUnplaceable(
                    f"an evaluation gang of {self.size} needs {need:g} {name}s ({each:g} each) "
                    f"and the whole cluster has {have:g}; lower the gang size (eval.gang_size / "
                    f"--gang-size), the {name}s per member (eval.{name.lower()}s), or add nodes")

    def start(self) -> EvalGang:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._check_fits()
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        self._pg = placement_group([dict(bundle) for _ in range(self.size)], strategy="PACK",
                                   bundle_label_selector=[node_selector(self.nodes)] * self.size
                                   if self.nodes else None)
        ready, _ = ray.wait([self._pg.ready()], timeout=self.place_timeout_s)
        if not ready:
            remove_placement_group(self._pg)
            self._pg = None
            free = ray.available_resources()
            raise GangUnplaceable(
                f"an evaluation gang of {self.size} x {bundle} could not be placed within "
                f"{self.place_timeout_s:g} s (free now: {free.get('CPU', 0):g} CPUs, "
                f"{free.get('GPU', 0):g} GPUs; training or another gang holds the rest)")
        cls = ray.remote(GangMember)
        self.members = [
            cls.options(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            self._pg, placement_group_bundle_index=i)
                        ).remote(max(1, int(self.cpus)))
            for i in range(self.size)]
        try:
            if self.locality_order:
                # Neighbours on the ring share a node, and within it adjacent GPU ids (the
                # planner's locality order, `plan.json` eval section): one node crossing per
                # node boundary instead of wherever the placement group put each member.
                places = ray.get([m.where.remote() for m in self.members])
                self.ring = sorted(range(self.size), key=lambda i: (places[i], i))
            host, port = ray.get(self.members[0].address.remote())
            # Global rank = member index; the ring visits members in `ring` order.
            self._gather([m.join.remote(i, self.size, host, port, self.ring)
                          for i, m in enumerate(self.members)], "join")
        except BaseException:
            self.shutdown()
            raise
        return self

    def load(self, checkpoint: str, compute_dtype: str = "float32") -> None:
        self._gather([m.load.remote(checkpoint, compute_dtype) for m in self.members], "load")

    def generate(self, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
        """The gang's greedy continuation (member 0's, which every member shares)."""
        return self._gather([m.generate.remote(prompt, max_new_tokens, eos)
                             for m in self.members], "generate")[0]

    def call(self, method: str, *args) -> list:
        """Every member's result of `method(*args)` (checks, benchmarks)."""
        return self._gather([getattr(m, method).remote(*args) for m in self.members], method)

    def _gather(self, refs: list, what: str) -> list:
        """Results in member order; the first member to die or raise fails the whole gang (the
        others would wait for it in a collective until the timeout)."""
        import ray

        index = {ref: i for i, ref in enumerate(refs)}
        results, pending = [None] * len(refs), list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results[index[done[0]]] = ray.get(done[0])
            except Exception as err:
                self.shutdown()
                raise GangFailed(f"evaluation gang member {index[done[0]]} of {len(refs)} failed "
                                 f"in {what}: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}") from err
        return results

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for m in self.members:
            ray.kill(m)
        self.members = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


@dataclass
class LongContexts:
    """What evaluates a checkpoint's contexts longer than one evaluator holds: a started gang
    and its `Generate`, or why there is none (`unavailable`, written into results.json)."""

    gang: EvalGang | None = None
    generate: object = None  # ray_jobs.eval.model.Generate
    engine: str = ""
    unavailable: str = ""
    info: dict | None = None

    def shutdown(self) -> None:
        if self.gang is not None:
            self.gang.shutdown()


def start_long_contexts(long: list[int], max_length: int, gang_size: int, checkpoint: str,
                        tokenizer, *, cpus: float, gpus: float, place_timeout_s: float,
                        compute_dtype: str = "float32", nodes: tuple[str, ...] = (),
                        on_gang=None) -> LongContexts:
    """Start one gang for every context in `long` (sized for the longest, or `gang_size`) and
    load the checkpoint in it. A gang that cannot be placed is no error here: the contexts are
    recorded as not run, with the reason; `on_gang(gang)` is a test hook."""
    import logging

    from ray_jobs.eval.model import build_gang_generate
    from topology.eval_plan import gang_size_for

    if not long:
        return LongContexts()
    size = gang_size_for(max(long), max_length, gang_size)
    log = logging.getLogger("ringpilot.eval")
    t0 = time.time()
    try:
        gang = EvalGang(size, cpus=cpus, gpus=gpus, place_timeout_s=place_timeout_s,
                        nodes=tuple(nodes)).start()
    except GangUnplaceable as e:
        log.warning("evaluation gang: %s", e)
        return LongContexts(unavailable=f"not run: {e}")
    try:
        if on_gang is not None:
            on_gang(gang)
        gang.load(checkpoint, compute_dtype)
        info = {"size": size, "ring": gang.ring, "pids": gang.call("pid"),
                "start_seconds": round(time.time() - t0, 2)}
    except BaseException:
        gang.shutdown()
        raise
    log.info("evaluation gang of %d started in %.1f s for %s tokens", size, time.time() - t0,
             ", ".join(f"{n:,}" for n in long))
    return LongContexts(gang=gang, generate=build_gang_generate(gang, tokenizer),
                        engine=f"evaluation gang of {size}", info=info)
