"""Network tomography: which links or devices explain the hops that ran slower than predicted.

A preflight times every hop a plan's rings make (all at once, as training runs them) and sets
each measurement beside the cost model's prediction for the same concurrent transfers. A hop is
slow when its ratio measured / predicted exceeds `slow_factor` times the round's (lower) median
ratio: the median absorbs a fabric that is uniformly off its profile (reported apart, as a
fabric-wide finding), so only what stands out from the rest is blamed on a link.

Suspects are directed links and vertices (a GPU, NIC or switch that slows everything through
it). A fast hop exonerates a suspect it crosses when the throttle the slow hops imply for that
suspect would have slowed the fast hop too: a hop limited by a bottleneck elsewhere has slack on
its other links and clears none of them (the fair-share model says how much). The explanations
are the smallest sets of the remaining suspects that cross every slow hop (a minimum hitting
set, found exactly over the few candidates exoneration leaves). Suspects that exactly the same
GPU pairs cross can never be told apart by timing GPU pairs: they are one suspect, named by the
link nearest the fabric, the others kept as its aliases. The commonest case is structural (a
route into a vertex that is no GPU and has two neighbours leaves by the other: a NIC between its
PCIe switch and its leaf) and is found from the graph alone; the rest from the routes of the
GPU pairs themselves.

When several explanations remain, `probe_pairs` picks GPU pairs on which they predict different
outcomes, grouped into batches whose routes share no link, and `refine` explains again with both
rounds' evidence.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from topology.cost import GB, evaluate_flows
from topology.graph import Link, Router

Suspect = Link | str  # a directed link (u, v), or a vertex of the cluster graph
Pair = tuple[str, str]  # (source GPU vertex, destination GPU vertex)

SLOW_FACTOR = 2.0  # a hop is slow above this many times the round's median ratio
FABRIC_FACTOR = 2.0  # the median ratio itself beyond this (either way): a fabric-wide finding
MAX_EXPLANATION_SIZE = 4  # suspects per explanation the exact search tries
MAX_COMBINATIONS = 200_000  # suspect sets of one size the exact search may try
MAX_EXPLANATIONS = 256  # minimal explanations kept (the rest counted in a note)
MAX_PROBE_GPUS = 128  # GPUs whose every ordered pair is a possible probe
FABRIC_KINDS = ("leaf", "spine", "core")


@dataclass(frozen=True)
class HopTiming:
    """One timed transfer of `nbytes` from GPU vertex `src` to `dst`, beside its prediction
    (the cost model's time for the same transfers running at once)."""

    src: str
    dst: str
    nbytes: float
    predicted_s: float
    measured_s: float

    @property
    def ratio(self) -> float:
        """Measured over predicted: 1.0 where the fabric behaves as its profile says."""
        return self.measured_s / self.predicted_s


@dataclass(frozen=True)
class Classification:
    """Which hops of a round are slow, against the round's median ratio."""

    median_ratio: float
    slow: tuple[bool, ...]
    slow_factor: float
    fabric_factor: float

    @property
    def fabric_off(self) -> bool:
        """The whole fabric runs far from its profile (either way)."""
        return not 1 / self.fabric_factor <= self.median_ratio <= self.fabric_factor


@dataclass(frozen=True)
class Explanation:
    """What the timed hops say about the fabric.

    `rounds` holds the evidence (round one: the ring hops; then probe rounds), `slow` flags each
    of its hops in order. `candidates` are all minimal explanations (each a set of suspects that
    crosses every slow hop and no fast one), sorted; `unique` when exactly one is left.
    `unexplained`: slow hops whose every suspect also carried a fast hop (inconsistent evidence:
    noise, a transient, or a slowdown the model cannot express). `hop_suspects` gives, per hop,
    the candidate suspects its route crosses; `aliases` the links and vertices merged into a
    suspect because no GPU pair tells them apart (the suspect itself included).
    """

    rounds: tuple[tuple[HopTiming, ...], ...]
    slow: tuple[bool, ...]
    median_ratio: float
    slow_factor: float
    fabric_factor: float
    candidates: tuple[frozenset[Suspect], ...]
    unexplained: tuple[HopTiming, ...]
    hop_suspects: tuple[tuple[Suspect, ...], ...]
    aliases: Mapping[Suspect, tuple[Suspect, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def hops(self) -> tuple[HopTiming, ...]:
        return tuple(h for r in self.rounds for h in r)

    @property
    def slow_hops(self) -> tuple[HopTiming, ...]:
        return tuple(h for h, s in zip(self.hops, self.slow) if s)

    @property
    def unique(self) -> bool:
        return len(self.candidates) == 1

    @property
    def fabric_off(self) -> bool:
        return not 1 / self.fabric_factor <= self.median_ratio <= self.fabric_factor

    @property
    def found(self) -> bool:
        """Anything to report: a slow hop, or a fabric far from its profile."""
        return bool(self.slow_hops) or self.fabric_off

    def suspects(self) -> list[Suspect]:
        """Every suspect of any candidate explanation, sorted."""
        return sorted({s for c in self.candidates for s in c}, key=suspect_name)


def suspect_name(s: Suspect) -> str:
    """How findings print a suspect, and how `ringpilot plan --exclude` takes it."""
    return s if isinstance(s, str) else f"{s[0]}->{s[1]}"


def predict_hops(router: Router, pairs: Sequence[Pair], nbytes: float) -> list[float]:
    """Predicted seconds per pair when all `pairs` transfer `nbytes` at once (the cost model's
    fair share per link, topology.cost.evaluate_flows)."""
    _check_pairs(router, pairs)
    return evaluate_flows(router, list(pairs), nbytes).hop_seconds


def classify(hops: Sequence[HopTiming], slow_factor: float = SLOW_FACTOR,
             fabric_factor: float = FABRIC_FACTOR,
             median_ratio: float | None = None) -> Classification:
    """Slow hops of a round: ratio above `slow_factor` x the median ratio (the round's own, or
    `median_ratio` when given: probes are judged against round one's)."""
    _check_factor("slow_factor", slow_factor)
    _check_factor("fabric_factor", fabric_factor)
    if not hops:
        raise ValueError("hops: no timed hop given; time at least one GPU pair")
    for h in hops:
        for name in ("nbytes", "predicted_s", "measured_s"):
            value = getattr(h, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"hop {h.src} -> {h.dst}: {name} is {value}; every hop needs "
                                 "a finite value > 0 (a transfer that failed is no timing)")
    median = (statistics.median_low(h.ratio for h in hops) if median_ratio is None
              else median_ratio)
    return Classification(median, tuple(h.ratio > slow_factor * median for h in hops),
                          slow_factor, fabric_factor)


def explain(router: Router, hops: Sequence[HopTiming], slow_factor: float = SLOW_FACTOR,
            fabric_factor: float = FABRIC_FACTOR) -> Explanation:
    """The smallest sets of suspects that explain round one's slow hops (see the module)."""
    cls = classify(hops, slow_factor, fabric_factor)
    return _explain(router, (tuple(hops),), cls.slow, cls.median_ratio, slow_factor,
                    fabric_factor)


def refine(router: Router, first: Explanation, probes: Sequence[HopTiming]) -> Explanation:
    """Explain again with the probe round's evidence beside everything `first` saw; probes are
    classified against the first round's median ratio (a probe round has too few hops, and
    deliberately slow ones, to set its own). The probes are taken to have run as probe_pairs
    batches them, each with its links to itself, and to be predicted so: `predict_hops` of
    each batch."""
    if not probes:
        return first
    cls = classify(probes, first.slow_factor, first.fabric_factor, first.median_ratio)
    return _explain(router, (*first.rounds, tuple(probes)), first.slow + cls.slow,
                    first.median_ratio, first.slow_factor, first.fabric_factor)


def probe_pairs(router: Router, explanation: Explanation, gpus: Sequence[str]
                ) -> list[list[Pair]]:
    """A second round of GPU pairs on which the candidate explanations predict different
    outcomes (a pair is predicted slow under an explanation when it crosses one of its
    suspects): first, per suspect, a pair that crosses it and no other candidate suspect, when
    that separates explanations; then pairs separating the most explanations still alike.
    Grouped into batches to run one after the other, the pairs of a batch at once: their
    routes share no link, so each probe has its links to itself. Empty when nothing is left to
    separate. `gpus`: the GPUs that may take part (the stage's); above MAX_PROBE_GPUS, those
    of the slow hops' nodes and one per other node, up to that many."""
    cands = explanation.candidates
    if len(cands) < 2:
        return []
    for g in gpus:
        _check_gpu(router, g, f"gpus: {g!r}")
    suspects = explanation.suspects()
    pool = _probe_pool(explanation.slow_hops, gpus)
    classes = _LinkClasses(router)
    rep_of = {classes.canonical(m) if not isinstance(m, str) else m: x for x in suspects
              for m in explanation.aliases.get(x, (x,))}
    rows: list[tuple[Pair, frozenset[Suspect], list[Link]]] = []
    for src in pool:
        for dst in pool:
            if src != dst:
                route = router.route(src, dst)
                crossed = {rep_of[x] for x in _crossed(route, src, classes) if x in rep_of}
                if crossed:
                    rows.append(((src, dst), frozenset(crossed), route))
    rows.sort(key=lambda r: (len(r[2]), r[0]))  # short routes first: fewer other links at play
    apart = {(i, j) for i in range(len(cands)) for j in range(i + 1, len(cands))}
    chosen: list[tuple[Pair, list[Link]]] = []

    def separates(crossed: frozenset[Suspect]) -> set[tuple[int, int]]:
        slow = [bool(c & crossed) for c in cands]
        return {(i, j) for i, j in apart if slow[i] != slow[j]}

    for s in suspects:  # one isolating probe per suspect: direct evidence on it alone
        hit = next((r for r in rows if r[1] == {s} and separates(r[1])), None)
        if hit is not None:
            apart -= separates(hit[1])
            chosen.append((hit[0], hit[2]))
    while apart:  # then whatever separates the most explanations still alike
        best = max(rows, key=lambda r: len(separates(r[1])), default=None)
        if best is None or not separates(best[1]):
            break  # no pair tells the rest apart (see the explanation's aliases)
        apart -= separates(best[1])
        chosen.append((best[0], best[2]))
    return _batches(chosen)


def route_suspects(router: Router, src: str, dst: str) -> set[Suspect]:
    """Every suspect a transfer from GPU `src` to GPU `dst` crosses: its links (each as the
    suspect it belongs to, see the module) and the vertices on its way, ends included."""
    _check_pairs(router, [(src, dst)])
    return _crossed(router.route(src, dst), src, _LinkClasses(router))


def simulate_round(model: Router, truth: Router, batches: Sequence[Sequence[Pair]],
                   nbytes: float, noise: float = 0.0,
                   rng: np.random.Generator | None = None) -> list[HopTiming]:
    """Timings a preflight would see: each batch's pairs at once, predicted on `model`,
    "measured" on `truth` (the same cluster with some links slowed: `slowed`) times a
    multiplicative log-normal noise of sigma `noise`. For tests and benchmarks."""
    if noise and rng is None:
        raise ValueError("noise needs rng (a numpy Generator), so the draw can be repeated")
    out = []
    for batch in batches:
        predicted = predict_hops(model, batch, nbytes)
        measured = predict_hops(truth, batch, nbytes)
        for (src, dst), p, m in zip(batch, predicted, measured):
            factor = float(rng.lognormal(0.0, noise)) if noise else 1.0
            out.append(HopTiming(src, dst, nbytes, p, m * factor))
    return out


def slowed(router: Router, factors: Mapping[Suspect, float]) -> Router:
    """A copy of `router` whose suspects carry 1 / factor of their bandwidth: a directed link
    in its direction, a vertex on every link touching it (both directions)."""
    out = copy.copy(router)
    out.bandwidth = router.bandwidth.copy()
    for s, factor in factors.items():
        if not factor > 0:
            raise ValueError(f"slowdown of {suspect_name(s)}: {factor}; give a factor > 0")
        if isinstance(s, str):
            ids = [i for i, (u, v) in enumerate(router.links) if s in (u, v)]
            if not ids:
                raise ValueError(f"vertex {s!r} has no link in the cluster graph")
        elif s in router.link_id:
            ids = [router.link_id[s]]
        else:
            raise ValueError(f"link {suspect_name(s)} is not in the cluster graph")
        out.bandwidth[ids] /= factor
    return out


# ---- the explanation ---------------------------------------------------------------------------

@dataclass
class _Hop:
    """A hop as the model sees it: the suspects it crosses, each with the smallest bandwidth
    share (GB/s) the hop gets on that suspect's links, its latency and its modelled time."""

    shares: dict[Suspect, float]
    latency_s: float
    model_s: float
    nbytes: float

    def throttle_to(self, suspect: Suspect, ratio: float) -> float:
        """How many times slower `suspect` must run for this hop to take `ratio` times its
        modelled time (its other links as they are; at least the slack the suspect has)."""
        return self.shares[suspect] * GB * (ratio * self.model_s - self.latency_s) / self.nbytes


def _evidence(router: Router, rounds: tuple[tuple[HopTiming, ...], ...],
              classes: _LinkClasses) -> list[_Hop]:
    """Per hop, the shares it got: round one's hops ran at once (each link's bandwidth split
    among the hops crossing it); a probe round's batches share no link, so its hops had their
    links to themselves."""
    out = []
    for k, hops in enumerate(rounds):
        routes = [router.route(h.src, h.dst) for h in hops]
        load: dict[Link, int] = {}
        for route in routes:
            for lk in route:
                load[lk] = load.get(lk, 0) + 1 if k == 0 else 1
        for h, route in zip(hops, routes):
            shares: dict[Suspect, float] = {}
            for lk in route:
                share = float(router.bandwidth[router.link_id[lk]]) / load[lk]
                for s in (classes.canonical(lk), *lk):
                    shares[s] = min(shares.get(s, share), share)
            latency = float(sum(router.latency_us[router.link_id[lk]] for lk in route)) * 1e-6
            rate = min(shares[classes.canonical(lk)] for lk in route)
            out.append(_Hop(shares, latency, latency + h.nbytes / (rate * GB), h.nbytes))
    return out


def _explain(router: Router, rounds: tuple[tuple[HopTiming, ...], ...], slow: tuple[bool, ...],
             median: float, slow_factor: float, fabric_factor: float) -> Explanation:
    hops = [h for r in rounds for h in r]
    _check_pairs(router, [(h.src, h.dst) for h in hops])
    classes = _LinkClasses(router)
    evidence = _evidence(router, rounds, classes)
    # If a suspect is the culprit, it is throttled at least enough to explain one of its slow
    # hops: the least such throttle, per suspect
    throttle: dict[Suspect, float] = {}
    for h, e, s in zip(hops, evidence, slow):
        if s:
            for x in e.shares:
                throttle[x] = min(throttle.get(x, math.inf), e.throttle_to(x, h.ratio / median))
    # A fast hop clears a suspect when that throttle would have made it slow too
    cleared = {x for e, s in zip(evidence, slow) if not s for x in e.shares
               if x in throttle and e.throttle_to(x, slow_factor) <= throttle[x]}
    open_sets = [frozenset(set(e.shares) - cleared) for e, s in zip(evidence, slow) if s]
    unexplained = tuple(h for h, c in zip((h for h, s in zip(hops, slow) if s), open_sets)
                        if not c)
    rep, members = _indistinguishable(router, set().union(*open_sets), hops, slow, classes)
    candidates, notes = _minimal_hitting_sets([frozenset(rep[x] for x in c)
                                               for c in open_sets if c])
    named = {x for c in candidates for x in c}
    hop_suspects = tuple(tuple(sorted({rep[x] for x in e.shares if x in rep} & named,
                                      key=suspect_name)) if s else ()
                         for e, s in zip(evidence, slow))
    aliases = {x: members[x] for x in named if len(members[x]) > 1}
    return Explanation(rounds, slow, median, slow_factor, fabric_factor, candidates,
                       unexplained, hop_suspects, aliases, tuple(notes))


def _indistinguishable(router: Router, candidates: set[Suspect], hops: list[HopTiming],
                       slow: tuple[bool, ...], classes: _LinkClasses
                       ) -> tuple[dict[Suspect, Suspect], dict[Suspect, tuple[Suspect, ...]]]:
    """Candidates that exactly the same GPU pairs cross (over the pool of `_probe_pool`: the
    cluster's GPUs up to MAX_PROBE_GPUS) can never be told apart by timing pairs: one
    suspect, named by a link before a vertex, the link nearest the fabric first. Returns each
    candidate's representative and each representative's members (the links every route
    crosses with a member link included)."""
    gpus = [v for v, k in router.graph.nodes(data="kind") if k == "gpu"]
    crossing: dict[Suspect, list[int]] = {x: [] for x in candidates}
    if len(candidates) > 1:
        pool = _probe_pool([h for h, s in zip(hops, slow) if s], gpus)
        pairs = [(a, b) for a in pool for b in pool if a != b]
        for i, (a, b) in enumerate(pairs):
            for x in _crossed(router.route(a, b), a, classes) & candidates:
                crossing[x].append(i)
    groups: dict[tuple[int, ...], list[Suspect]] = {}
    for x in candidates:
        groups.setdefault(tuple(crossing[x]), []).append(x)
    rep: dict[Suspect, Suspect] = {}
    members: dict[Suspect, tuple[Suspect, ...]] = {}
    for group in groups.values():
        head = min(group, key=lambda x: (isinstance(x, str), classes.preference(x)
                                         if not isinstance(x, str) else (), suspect_name(x)))
        flat = [m for x in sorted(group, key=suspect_name)
                for m in ((x,) if isinstance(x, str) else classes.members(x))]
        members[head] = tuple(dict.fromkeys(flat))
        rep.update({x: head for x in group})
    return rep, members


def _minimal_hitting_sets(sets: list[frozenset[Suspect]]
                          ) -> tuple[tuple[frozenset[Suspect], ...], list[str]]:
    """Every smallest set of suspects meeting each of `sets`: exact search over growing sizes
    up to MAX_EXPLANATION_SIZE while the combinations stay under MAX_COMBINATIONS; past that,
    one greedy set (most sets met first) with a note saying it is not proven smallest."""
    distinct = sorted(set(sets), key=lambda c: sorted(map(suspect_name, c)))
    if not distinct:
        return (), []
    universe = sorted(set().union(*distinct), key=suspect_name)
    for size in range(1, MAX_EXPLANATION_SIZE + 1):
        if math.comb(len(universe), size) > MAX_COMBINATIONS:
            break
        found = [frozenset(c) for c in itertools.combinations(universe, size)
                 if all(not s.isdisjoint(c) for s in distinct)]
        if found:
            notes = []
            if len(found) > MAX_EXPLANATIONS:
                notes.append(f"{len(found)} explanations of {size} suspects fit; the first "
                             f"{MAX_EXPLANATIONS} are kept")
            return tuple(found[:MAX_EXPLANATIONS]), notes
    greedy: set[Suspect] = set()
    left = list(distinct)
    while left:
        best = max(universe, key=lambda s: (sum(s in c for c in left), -universe.index(s)))
        greedy.add(best)
        left = [c for c in left if best not in c]
    return (frozenset(greedy),), [
        f"greedy explanation of {len(greedy)} suspects: the exact search stops at "
        f"{MAX_EXPLANATION_SIZE} suspects or {MAX_COMBINATIONS:,} combinations of "
        f"{len(universe)} candidates, so a smaller one may exist"]


def _crossed(route: Iterable[Link], src: str, classes: _LinkClasses) -> set[Suspect]:
    """Suspects a route crosses: each link's class and every vertex on the way, ends
    included."""
    out: set[Suspect] = {src}
    for u, v in route:
        out.add(classes.canonical((u, v)))
        out.add(v)
    return out


class _LinkClasses:
    """Directed links that every route crosses together: chains through vertices that are no
    GPU and have exactly two neighbours (a route entering such a vertex must leave by the other
    side). Each chain is named by one member: the link touching a fabric switch from a NIC,
    else any link touching a fabric switch, else the first by name."""

    def __init__(self, router: Router):
        self.graph = router.graph
        self._canonical: dict[Link, Link] = {}
        self._members: dict[Link, tuple[Link, ...]] = {}

    def _passes(self, vertex: str) -> bool:
        return (self.graph.nodes[vertex].get("kind") != "gpu"
                and self.graph.degree(vertex) == 2)

    def _chain(self, link: Link) -> list[Link]:
        chain = [link]
        u, v = link
        while self._passes(v) and len(chain) <= self.graph.number_of_nodes():
            w = next(x for x in self.graph.neighbors(v) if x != chain[-1][0])
            chain.append((v, w))
            v = w
        u = link[0]
        while self._passes(u) and len(chain) <= self.graph.number_of_nodes():
            w = next(x for x in self.graph.neighbors(u) if x != chain[0][1])
            chain.insert(0, (w, u))
            u = w
        return chain

    def preference(self, link: Link) -> tuple:
        """Sort key: a NIC's link to a fabric switch first, then other fabric links."""
        kinds = {self.graph.nodes[link[0]].get("kind"), self.graph.nodes[link[1]].get("kind")}
        fabric = bool(kinds & set(FABRIC_KINDS))
        return (not (fabric and "nic" in kinds), not fabric, link)

    def canonical(self, link: Link) -> Link:
        hit = self._canonical.get(link)
        if hit is None:
            chain = self._chain(link)
            hit = min(chain, key=self.preference)
            for lk in chain:
                self._canonical[lk] = hit
            self._members[hit] = tuple(chain)
        return hit

    def members(self, link: Link) -> tuple[Link, ...]:
        return self._members[self.canonical(link)]


# ---- probes ------------------------------------------------------------------------------------

def _probe_pool(slow_hops: Sequence[HopTiming], gpus: Sequence[str]) -> list[str]:
    """The GPUs probes may use: all of `gpus` up to MAX_PROBE_GPUS; above, the slow hops' own
    nodes' GPUs first, then one GPU of each other node, up to that many."""
    gpus = sorted(set(gpus))
    if len(gpus) <= MAX_PROBE_GPUS:
        return gpus
    node = {g: g.rpartition("/gpu")[0] for g in gpus}
    near = {node[x] for h in slow_hops for x in (h.src, h.dst) if x in node}
    pool = [g for g in gpus if node[g] in near]
    seen = set(near)
    for g in gpus:
        if node[g] not in seen:
            seen.add(node[g])
            pool.append(g)
    return pool[:MAX_PROBE_GPUS]


def _batches(chosen: list[tuple[Pair, list[Link]]]) -> list[list[Pair]]:
    """First fit: each pair joins the first batch none of whose routes shares a link with it."""
    batches: list[tuple[list[Pair], set[Link]]] = []
    for pair, route in chosen:
        for pairs, used in batches:
            if used.isdisjoint(route):
                pairs.append(pair)
                used.update(route)
                break
        else:
            batches.append(([pair], set(route)))
    return [pairs for pairs, _ in batches]


# ---- checks ------------------------------------------------------------------------------------

def _check_factor(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 1):
        raise ValueError(f"{name} is {value}; give a finite number > 1 (e.g. 2.0: twice the "
                         "median ratio)")


def _check_pairs(router: Router, pairs: Sequence[Pair]) -> None:
    """ValueError naming the first pair that is not two different GPUs of the cluster."""
    for src, dst in pairs:
        for end in (src, dst):
            _check_gpu(router, end, f"hop {src} -> {dst}: {end!r}")
        if src == dst:
            raise ValueError(f"hop {src} -> {dst}: a GPU does not send to itself; give two "
                             "different GPUs")


def _check_gpu(router: Router, name: str, where: str) -> None:
    nodes = router.graph.nodes
    if name not in nodes or nodes[name].get("kind") != "gpu":
        example = next(v for v, k in nodes(data="kind") if k == "gpu")
        raise ValueError(f"{where} is not a GPU of cluster {router.spec.name!r}; GPUs are named "
                         f"NODE/gpuK, e.g. {example}")
