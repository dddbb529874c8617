"""The Planner: a stage's degrees, shard group and rings, decided on the orders, candidates,
search and bound of one cluster."""

from __future__ import annotations

from specs.cluster import ClusterSpec
from specs.degrees import (
    DegreeError,
    NothingFits,
    ParallelDims,
    divisors,
    resolve_degrees,
    ulysses_of,
)
from specs.run import RunSpec, StageSpec
from topology.cost import FlowResult, StageShape, check_fits, predict_stage
from topology.graph import Router, build_graph, split_gpu_vertex
from topology.planner.bound import RingBound
from topology.planner.candidates import CandidateRings
from topology.planner.evaluation import TIE, TIERS, Evaluated, Evaluator, floor_of, rank
from topology.planner.moves import Moves
from topology.planner.orders import Orders
from topology.planner.search import LocalSearch
from topology.profile import HardwareProfile, get_profile

SEARCH_SECONDS = 0.25  # default local-search budget per placement (a stage, or a Ulysses split)
GREEDY_GPUS = 512  # up to this many GPUs the nearest-neighbour construction is a start


class PlanError(ValueError):
    """A stage that cannot be placed as asked."""


class Planner:
    """Plans every stage of a run on one cluster; built once, reused across stages."""

    def __init__(self, spec: ClusterSpec, graph=None, profile: HardwareProfile | None = None,
                 search_seconds: float = SEARCH_SECONDS, seed: int = 0):
        if not search_seconds > 0:
            raise PlanError(f"search_seconds is {search_seconds}; the placement search needs a "
                            f"budget > 0 seconds (e.g. --search-seconds {SEARCH_SECONDS:g}; it "
                            "stops sooner when no move helps)")
        self.spec = spec
        self.graph = graph if graph is not None else build_graph(spec)
        self.router = Router(spec, self.graph)
        self.profile = profile or get_profile(spec.profile)
        self.search_seconds = search_seconds
        self.seed = seed
        self.orders = Orders(spec, self.graph, self.router)
        self.evaluator = Evaluator(self.router, self.graph, self.profile)
        self.candidate_rings = CandidateRings(self.orders, self.evaluator)
        self.bound = RingBound(self.orders)
        self.moves = Moves(self.orders)
        self._health: dict[str, float] = {}

    # ---- the parts, as callers and plan_rings use them ----------------------------------------
    def locality_order(self) -> list[str]:
        return self.orders.locality_order()

    def ray_default_order(self, seed: int = 0) -> list[str]:
        return self.orders.ray_default_order(seed)

    def evaluate(self, rings: list[list[str]], shape: StageShape) -> Evaluated:
        return self.evaluator.evaluate(rings, shape)

    def candidates(self, gpus: list[str], ring: int, dp: int) -> dict[str, list[list[str]]]:
        return self.candidate_rings.named(gpus, ring, dp)

    def domain_packed_rings(self, gpus: list[str], n: int, dp: int, shape: StageShape
                            ) -> list[list[str]] | None:
        return self.candidate_rings.domain_packed(gpus, n, dp, shape)

    def nearest_neighbour_rings(self, gpus: list[str], n: int, dp: int, shape: StageShape
                                ) -> list[list[str]]:
        return self.candidate_rings.nearest_neighbour(gpus, n, dp, shape)

    def ring_lower_bound(self, shape: StageShape) -> FlowResult:
        return self.bound.ring_lower_bound(shape)

    def search(self, start: Evaluated, shape: StageShape, spare: list[str],
               floor: tuple[float, float] | None = None) -> tuple[Evaluated, list[str]]:
        """`LocalSearch` from `start` with this planner's budget and seed, `spare` the unused
        GPUs it may bring in; returns the result and notes on the moves that improved it."""
        return LocalSearch(self.evaluator, self.moves, start, shape, floor,
                           self.search_seconds, self.seed).run(spare)

    # ---- decisions ----------------------------------------------------------------------------
    def plan_shard(self, run: RunSpec, stage: StageSpec, ring: int, dp: int
                   ) -> ParallelDims | None:
        """The stage's layout for ring x dp with its shard_degree as given, or with the smallest
        shard group (the ring, then 2, 3, ... rings) whose memory fits; None when none fits."""
        ulysses = ulysses_of(stage)
        if stage.shard_degree != "auto":
            options = [stage.shard_degree]
        else:
            seq = ring * ulysses  # GPUs per sequence
            options = [seq * k for k in divisors(dp)]
        for shard in options:
            try:
                dims = ParallelDims.of(ring, dp, shard, ulysses)
            except ValueError as e:
                raise DegreeError(str(e)) from None
            try:
                check_fits(stage.name, StageShape.of(run, stage, dims), self.profile)
            except ValueError:
                continue
            return dims
        return None

    def plan_degrees(self, run: RunSpec, stage: StageSpec, n_gpus: int, strict: bool = True
                     ) -> tuple[ParallelDims, list[str]]:
        """The stage's layout on `n_gpus` GPUs (specs.degrees.resolve_degrees with this
        planner's memory model): given degrees are honoured, 'auto' ones pick the smallest ring
        that fits memory with the smallest shard group, then as many rings as GPUs and batch
        allow. Returns (layout, notes); PlanError (or StageDoesNotFit, with the shortfall of
        the layout closest to fitting) when there is none."""
        offer = (f"resources.workers is {run.resources.workers}"
                 if n_gpus == run.resources.workers and n_gpus < self.spec.num_gpus
                 else f"the cluster offers {n_gpus} GPUs")
        try:
            return resolve_degrees(
                stage, n_gpus, offer, strict=strict, grow="add nodes",
                shard_for=lambda ring, dp: self.plan_shard(run, stage, ring, dp))
        except NothingFits as e:
            ring, dp = max(e.tried)  # the layout closest to fitting: its shortfall and fix
            u = ulysses_of(stage)
            shard = ring * dp * u if stage.shard_degree == "auto" else stage.shard_degree
            try:
                closest = ParallelDims.of(ring, dp, shard, u)
            except ValueError:  # a shard_degree this dp cannot take: no shortfall to report
                closest = None
            if closest is not None:
                check_fits(stage.name, StageShape.of(run, stage, closest), self.profile)
            raise PlanError(f"stage {stage.name!r}: {e}") from None
        except DegreeError as e:
            raise PlanError(f"stage {stage.name!r}: {e}") from None

    def plan_rings(self, run: RunSpec, stage: StageSpec, dims: ParallelDims
                   ) -> tuple[Evaluated, list[str]]:
        """Rings and their order for `dims`, ring x dp (x ulysses: each ring position a group of
        that many GPUs): the best (by `rank`) of a few hierarchy-aware layouts (whole nodes in
        fabric order; per-node templates found by exhaustive search over one node;
        socket/switch-sized chunks across nodes; data-parallel peers side by side; Ray's
        order; rings packed into the smallest domains; rings grown nearest neighbour first),
        each evaluated on the full contention model, improved by `search` within the
        planner's budget. A ring of ring x ulysses GPUs in locality order keeps each
        Ulysses group on neighbouring GPUs. Notes: the start, the moves that improved it, and
        the slowest hop against `ring_lower_bound`."""
        ring, dp, ulysses = dims.ring, dims.dp, dims.ulysses
        shape = StageShape.of(run, stage, dims)
        check_fits(stage.name, shape, self.profile)
        n = ring * ulysses  # GPUs per sequence: what a candidate's "ring" lists
        total = n * dp
        gpus = self.locality_order()
        if total > len(gpus):
            layout = f"{ring} x {dp}" + ("" if ulysses == 1 else f" x ulysses {ulysses}")
            raise PlanError(f"stage {stage.name!r}: needs {total} GPUs ({layout}), the "
                            f"cluster has {len(gpus)}; lower the degrees or add nodes")
        used = self._choose_gpus(gpus, total)
        cands = self.candidates(used, n, dp)
        ray = self.ray_default_order()[:total]
        cands["ray-default order"] = [ray[i * n:(i + 1) * n] for i in range(dp)]
        if len(gpus) <= GREEDY_GPUS:
            cands["nearest neighbour"] = self.nearest_neighbour_rings(gpus, n, dp, shape)
        packed = self.domain_packed_rings(gpus, n, dp, shape)
        if packed is not None:
            cands["domain-packed"] = packed
        cands = {k: v for k, v in cands.items()  # a layout that does not fit is no candidate
                 if len(v) == dp and all(len(r) == n for r in v)}
        evals = {name: self.evaluate(r, shape) for name, r in cands.items()}
        floor = floor_of(evals.values())
        name = min(sorted(evals), key=lambda k: rank(evals[k], floor))
        start = evals[name]
        notes = [f"placement: started from '{name}', the best of {sorted(evals)} (step times "
                 f"within {TIE:.1%} count as equal, then slowest hops within {TIE:.1%}; then "
                 f"less traffic on {', '.join(TIERS)}, in that order)"]
        taken = {v for r in start.rings for v in r}
        spare = [v for v in gpus if v not in taken]
        bound = self.ring_lower_bound(shape)
        at_bound = predict_stage(shape, bound, start.dp, self.profile, start.a2a).step_seconds
        if total > GREEDY_GPUS and (start.ring.seconds <= bound.seconds * (1 + 1e-9)
                                    or start.cost.step_seconds <= at_bound * (1 + TIE)):
            # each move costs a full evaluation (tens of ms here): spend them only where a
            # faster ring could buy step time
            best, more = start, [f"search: skipped above {GREEDY_GPUS} GPUs: a ring hop at "
                                 "the lower bound would not shorten the step by more than "
                                 f"{TIE:.1%}"]
        else:
            best, more = self.search(start, shape, spare, floor)
        if bound.seconds > 0:
            more.append(f"slowest K/V hop {best.ring.seconds * 1e3:.3f} ms, "
                        f"{best.ring.seconds / bound.seconds:.3f}x the lower bound "
                        f"({bound.seconds * 1e3:.3f} ms)")
        return best, notes + more

    def node_health(self, node: str) -> float:
        """Worst ratio of a link's bandwidth in the graph to its link type's in the spec (1.0:
        as described; < 1: degraded)."""
        if node in self._health:
            return self._health[node]
        worst = 1.0
        lt = self.spec.link_types
        for _, _, data in self.graph.edges(self.router.node_vertices(node), data=True):
            nominal = lt[data["link_type"]].bandwidth_gb_s if data["link_type"] in lt else None
            if nominal:
                worst = min(worst, data["bandwidth"] / nominal)
        self._health[node] = worst
        return worst

    def _choose_gpus(self, gpus: list[str], total: int) -> list[str]:
        """The first `total` GPUs in locality order, after leaving out the most degraded nodes
        that are not needed."""
        by_node: dict[str, list[str]] = {}
        for v in gpus:
            by_node.setdefault(split_gpu_vertex(v)[0], []).append(v)
        spare = len(gpus) - total
        health = {n: self.node_health(n) for n in by_node}
        for n in sorted(by_node, key=lambda n: (health[n], n)):
            if health[n] >= 1.0 or len(by_node[n]) > spare:
                break
            spare -= len(by_node.pop(n))
        return [v for vs in by_node.values() for v in vs][:total]
