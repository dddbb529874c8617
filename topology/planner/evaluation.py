"""What a ring layout is worth: its prediction on the cost model, and how placements rank."""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from topology.cost import (
    FlowResult,
    LinkLoads,
    StageCost,
    StageShape,
    evaluate_index_flows,
    predict_stage,
    ring_index_flows,
)
from topology.graph import Router
from topology.profile import HardwareProfile
from topology.routes import route_table

TIE = 0.005  # relative step-time (and ring-hop) difference below which placements count as equal
TIERS = ("core uplinks", "leaf uplinks", "NIC links", "socket links")  # highest first


@dataclass
class Evaluated:
    """A placement (rings of GPU vertices) with its predicted flows, step cost and traffic."""

    rings: list[list[str]]
    ring: FlowResult
    dp: FlowResult
    cost: StageCost
    a2a: FlowResult | None = None  # the Ulysses all-to-alls (None without Ulysses)
    traffic: tuple[float, ...] = field(default=())  # bytes a step sends over each of TIERS

    def key(self) -> tuple:
        """The exhaustive search's order: step time, then slowest K/V hop, data-parallel hop,
        and the sum of the K/V hops."""
        return (round(self.cost.step_seconds, 9), self.ring.seconds, self.dp.seconds,
                sum(self.ring.hop_seconds))


class Evaluator:
    """Prices ring layouts on one cluster's contention model; the link tiers computed once."""

    def __init__(self, router: Router, graph: nx.Graph, profile: HardwareProfile):
        self.router = router
        self.graph = graph
        self.profile = profile
        self._tier_of_link: np.ndarray | None = None

    def evaluate(self, rings: list[list[str]], shape: StageShape) -> Evaluated:
        """The stage's prediction for these rings (each lists ring x ulysses GPUs: with
        Ulysses, one ring position's group after another)."""
        index = route_table(self.router).index
        idx = np.array([[index[v] for v in r] for r in rings], dtype=np.int64)
        u = shape.ulysses
        # K/V rings: member k of each Ulysses group passes to member k of the next group
        kv = idx.reshape(len(rings), shape.ring, u).transpose(0, 2, 1).reshape(-1, shape.ring)
        ring = evaluate_index_flows(self.router, *ring_index_flows(kv), shape.kv_block_bytes)
        # data-parallel groups: the same ring rank across rings, in ring order
        dp = evaluate_index_flows(self.router, *ring_index_flows(idx.T if len(rings) > 1 else
                                                                 idx[:, :1]), shape.kv_block_bytes)
        a2a = around = None
        if u > 1:  # every member of a Ulysses group sends to every other one, all at once
            groups = idx.reshape(-1, u)
            src = np.repeat(groups, u, axis=1).ravel()
            dst = np.tile(groups, (1, u)).ravel()
            other = src != dst
            a2a = evaluate_index_flows(self.router, src[other], dst[other],
                                       shape.all_to_all_bytes)
            # FSDP's collectives go around the whole sequence group, in its order
            around = evaluate_index_flows(self.router, *ring_index_flows(idx),
                                          shape.kv_block_bytes)
        traffic = (self._tier_bytes(ring, _ring_weight(shape))
                   + self._tier_bytes(dp, _dp_weight(shape)))
        if a2a is not None:
            traffic = (traffic + self._tier_bytes(a2a, _a2a_weight(shape))
                       + self._tier_bytes(around, _shard_weight(shape)))
        return Evaluated(rings, ring, dp,
                         predict_stage(shape, ring, dp, self.profile, a2a, around), a2a,
                         tuple(float(x) for x in traffic))

    def tier_of_link(self) -> np.ndarray:
        """Per directed link (Router numbering) its index in TIERS: spine-core links 0,
        leaf-spine 1, NIC-leaf 2, socket-socket 3; len(TIERS) for the PCIe links inside a
        node, which no tier counts."""
        if self._tier_of_link is None:
            kind = dict(self.graph.nodes(data="kind"))
            rank = {"core": 0, "spine": 1, "leaf": 2, "socket": 3}
            tiers = []
            for u, v in self.router.links:
                ku, kv = kind.get(u), kind.get(v)
                if ku == kv == "socket":
                    tiers.append(3)
                elif {ku, kv} == {"nic", "leaf"}:
                    tiers.append(2)
                elif ku in rank and kv in rank:  # fabric: by the higher end
                    tiers.append(min(rank[ku], rank[kv]))
                else:
                    tiers.append(len(TIERS))
            self._tier_of_link = np.array(tiers, dtype=np.int64)
        return self._tier_of_link

    def _tier_bytes(self, res: FlowResult, weight: float) -> np.ndarray:
        """Bytes a step sends over each tier for these flows: transfers per link (the
        result's load counts) times the bytes each transfer moves per step."""
        if not isinstance(res.loads, LinkLoads):  # no flows: an empty mapping
            return np.zeros(len(TIERS))
        used, counts = res.loads.counts()
        if not len(used):
            return np.zeros(len(TIERS))
        per_tier = np.bincount(self.tier_of_link()[used], weights=counts,
                               minlength=len(TIERS) + 1)
        return per_tier[:len(TIERS)] * weight


def rank(ev: Evaluated, floor: tuple[float, float]) -> tuple:
    """The hierarchical objective, given the best step time and the best slowest hop seen
    (`floor`): step time first, every step within TIE of the best counting as equal; then the
    slowest K/V hop, likewise (a hop hidden behind compute today shows with shorter shards, a
    smaller model or a slower fabric); then the bytes each tier carries, highest tier first
    (a ring crosses the spine only when that buys step or hop time); then exact hop and step."""
    s, h = ev.cost.step_seconds, ev.ring.seconds
    step_out = s > floor[0] * (1 + TIE)
    hop_out = h > floor[1] * (1 + TIE)
    return (step_out, s if step_out else 0.0, hop_out, h if hop_out else 0.0, ev.traffic, h, s)


def floor_of(evals) -> tuple[float, float]:
    """The best step time, and the best slowest hop among placements within TIE of it."""
    evals = list(evals)
    step = min(ev.cost.step_seconds for ev in evals)
    return step, min(ev.ring.seconds for ev in evals if ev.cost.step_seconds <= step * (1 + TIE))


def _ring_weight(s: StageShape) -> float:
    """Bytes one K/V transfer slot moves a step: forward, recomputed forward and backward
    (with dK, dV) blocks of every layer and micro-step; without Ulysses the sharding
    collectives go around the ring too."""
    kv = s.seqs_per_ring * s.layers * s.grad_accum * (3 * s.kv_block_bytes + s.kv_grad_bytes)
    return kv + (_shard_weight(s) if s.ulysses == 1 else 0.0)


def _dp_weight(s: StageShape) -> float:
    """Bytes one GPU sends a step in the data-parallel ring all-reduce of its gradient shard."""
    return 2 * (s.dp - 1) / s.dp * s.grad_reduce_bytes * s.params / s.shard_ways


def _a2a_weight(s: StageShape) -> float:
    """Bytes one GPU sends each Ulysses peer a step (a round trip in each of three phases)."""
    return 2 * 3 * s.layers * s.grad_accum * s.seqs_per_ring * s.all_to_all_bytes


def _shard_weight(s: StageShape) -> float:
    """Bytes one GPU sends a step in the weight all-gathers and gradient reduce-scatter."""
    S = s.shard_ways
    return (S - 1) / S * (2 * s.elem_bytes + s.grad_reduce_bytes) * s.params * s.grad_accum
