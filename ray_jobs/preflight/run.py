"""The preflight job: time a plan's fabric and check its layout before a stage trains on it.

    ringpilot preflight --run RUN.yaml --cluster CLUSTER.yaml [--stage NAME] [--out DIR]
    python -m ray_jobs.preflight --run RUN.yaml --cluster CLUSTER.yaml   # as a Ray job

For each stage (or the one --stage names) the driver plans the run on the cluster file as
`ringpilot plan` does, then starts one Ray Train worker per planned GPU, pinned to its node as
the trainer pins them. Every rank runs `preflight_ranks`, the same function a rank started by
hand runs (ray_jobs/preflight/rank.py: torchrun, or the namespace fabric of the tests):

1. round one: every ring hop of the plan at once, at the stage's K/V block size (capped by
   --max-bytes), as training's ring exchange moves them; rank 0 sets the timings beside the
   cost model's predictions and explains the slow ones (topology.tomography);
2. when several explanations fit, a probe round of GPU pairs that tells them apart, then the
   explanation refined with both rounds;
3. the FSDP shard group's all-gather and reduce-scatter of one decoder layer, and the
   replicas' gradient all-reduce, at their planned sizes (capped), beside the cost model's
   time for the same transfers;
4. the numerics check (numerics.py) on the stage's layout.

Rank 0 writes DIR/<stage>/preflight.json (topology.preflight_report's, plus the stage's
layout, rings and collectives), table.txt and fabric.png, into the run directory by default
(shared storage, as training's). The exit status is 0 when no stage found anything, 1 otherwise,
with one line per finding.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ray_jobs.preflight.cli import MAX_BYTES, REPS
from ray_jobs.preflight.numerics import NumericsShape, attention_numerics, numerics_finding
from ray_jobs.preflight.probe import (
    gather_records,
    median,
    time_collective,
    time_pairs,
    time_ring_hops,
)
from ray_jobs.train.parallelize import build_mesh
from ray_jobs.train.placement import only_stages
from specs.atomic import atomic_write
from specs.cluster import ClusterSpec
from specs.degrees import ParallelDims
from specs.run import RunSpec
from topology.cost import StageShape, evaluate_flows, ring_flows
from topology.graph import Router, build_graph, gpu_vertex
from topology.preflight_report import exit_code, findings, plot_fabric, render_table
from topology.preflight_report import write_preflight as write_report
from topology.run_plan import plan_run
from topology.tomography import (
    FABRIC_FACTOR,
    SLOW_FACTOR,
    HopTiming,
    explain,
    predict_hops,
    probe_pairs,
    refine,
)


@dataclass(frozen=True)
class StageProbe:
    """What every rank needs to probe one stage: its layout and the sizes to move."""

    stage: str
    dims: ParallelDims
    rings: list[list[str]]  # GPU vertices in ring order, each position's Ulysses group in turn
    kv_bytes: int  # one ring hop's message (the K/V of a micro-batch), capped
    collective_bytes: dict[str, int]  # "all_gather" / "reduce_scatter" / "all_reduce", capped
    numerics: NumericsShape

    @property
    def gpus(self) -> list[str]:
        return [g for ring in self.rings for g in ring]

    def kv_rings(self) -> list[list[str]]:
        """The rings K/V travel around: per plan ring and Ulysses index u, the u-th GPU of
        each position's group (all of a ring's GPUs without Ulysses)."""
        u = self.dims.ulysses
        return [ring[i::u] for ring in self.rings for i in range(u)]


@dataclass(frozen=True)
class PreflightConfig:
    """A preflight as every rank receives it (JSON for ranks started by hand)."""

    cluster: dict  # the ClusterSpec as data: rank 0 routes and predicts on it
    stages: list[StageProbe]
    out_dir: str
    reps: int = REPS
    slow_factor: float = SLOW_FACTOR  # a hop is slow above this x the round's median ratio
    fabric_factor: float = FABRIC_FACTOR  # that median itself off by more: a fabric finding
    seed: int = 0

    def to_json(self) -> str:
        doc = asdict(self)
        for stage, probe in zip(doc["stages"], self.stages):
            stage["dims"] = probe.dims.degree_keys()
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PreflightConfig:
        doc = json.loads(text)
        stages = [StageProbe(**{**s, "dims": ParallelDims.from_degree_keys(s["dims"]),
                                "numerics": NumericsShape(**s["numerics"])})
                  for s in doc.pop("stages")]
        return cls(stages=stages, **doc)


def stage_probe(run: RunSpec, index: int, dims: ParallelDims, rings: list[list[str]],
                max_bytes: int) -> StageProbe:
    """The sizes a step of stage `index` moves on layout `dims`, each capped at `max_bytes`:
    a ring hop's K/V block (the micro-batch's sequences), one decoder layer's weights
    all-gathered in the compute dtype and its gradients reduce-scattered in the reduce dtype
    (FSDP2 shards per layer), and the gradient shard the replicas all-reduce per step."""
    shape = StageShape.of(run, run.stages[index], dims)
    layer = (shape.params - shape.root_params) // shape.layers
    sizes = {"all_gather": shape.elem_bytes * layer,
             "reduce_scatter": shape.grad_reduce_bytes * layer,
             "all_reduce": shape.grad_reduce_bytes * shape.params // shape.shard_ways}

    def cap(n: float) -> int:
        return int(max(1, min(n, max_bytes)))

    m = run.model
    return StageProbe(
        stage=run.stages[index].name, dims=dims, rings=rings,
        kv_bytes=cap(shape.seqs_per_ring * shape.kv_block_bytes),
        collective_bytes={k: cap(v) for k, v in sizes.items()},
        numerics=NumericsShape(heads=m.num_attention_heads, kv_heads=m.num_key_value_heads,
                               head_dim=m.head_dim, dtype=run.compute_dtype))


def plan_preflight(run: RunSpec, cluster: ClusterSpec, out_dir: Path, *,
                   stage: str | None = None, max_bytes: int = MAX_BYTES, reps: int = REPS,
                   slow_factor: float = SLOW_FACTOR,
                   fabric_factor: float = FABRIC_FACTOR) -> PreflightConfig:
    """Plan the run's stages (or `stage` alone, on its own GPUs) on `cluster` as `ringpilot
    plan` does, and size each stage's probes. ValueError names a bad argument."""
    names = [s.name for s in run.stages]
    if stage is not None and stage not in names:
        raise ValueError(f"--stage: no stage {stage!r} in the run (stages: {', '.join(names)})")
    if max_bytes < 1:
        raise ValueError(f"--max-bytes {max_bytes}: give a message size of 1 byte or more")
    if reps < 1:
        raise ValueError(f"--reps {reps}: give at least 1 timed repetition")
    for flag, value in (("--slow-factor", slow_factor), ("--fabric-factor", fabric_factor)):
        if not value > 1:
            raise ValueError(f"{flag} {value}: give a number above 1 (e.g. 2: twice the "
                             "median ratio, or half of it)")
    indices = [names.index(stage)] if stage is not None else list(range(len(names)))
    planned = only_stages(run, indices if stage is not None else None)
    plan = plan_run(cluster, planned)
    probes = [stage_probe(run, i, sp.dims, [[gpu_vertex(w.node, w.gpu) for w in ring]
                                            for ring in sp.rings], max_bytes)
              for i, sp in zip(indices, plan.stages)]
    return PreflightConfig(cluster=cluster.model_dump(mode="json"), stages=probes,
                           out_dir=str(out_dir), reps=reps, slow_factor=slow_factor,
                           fabric_factor=fabric_factor)


# ---- every rank -------------------------------------------------------------------------------

@dataclass
class StageResult:
    """What rank 0 found on one stage: the lines to print and the stage's exit status."""

    stage: str
    lines: list[str] = field(default_factory=list)
    code: int = 0


def preflight_ranks(config: PreflightConfig, node: str, local: int,
                    device: torch.device) -> list[StageResult] | None:
    """Probe every stage of `config` (collective: every rank of the world calls it). This
    rank is the worker on `node`'s device `local` (the plan's Worker); the ranks find their
    places from each other's. Rank 0 writes each stage's report and returns the results;
    the others return None."""
    places: list = [None] * dist.get_world_size()
    dist.all_gather_object(places, gpu_vertex(node, local))
    rank_of = {v: r for r, v in enumerate(places)}
    router = None
    if dist.get_rank() == 0:  # the analysis is rank 0's alone
        spec = ClusterSpec.model_validate(config.cluster)
        router = Router(spec, build_graph(spec))
    results = []
    for probe in config.stages:
        missing = sorted(set(probe.gpus) - set(rank_of))
        if missing or len(probe.gpus) != len(places):
            raise RuntimeError(f"stage {probe.stage}: the plan's GPUs {probe.gpus} are not the "
                               f"workers started ({places}); start one worker per planned GPU")
        result = _probe_stage(config, probe, rank_of, places, router, device)
        if result is not None:
            results.append(result)
    return results if dist.get_rank() == 0 else None


def _probe_stage(config: PreflightConfig, probe: StageProbe, rank_of: dict[str, int],
                 places: list[str], router: Router | None,
                 device: torch.device) -> StageResult | None:
    me = dist.get_rank()
    rings = [[rank_of[g] for g in ring] for ring in probe.kv_rings()]
    mine = next(r for r in rings if me in r)
    # 1. round one: every ring hop at once
    seconds = time_ring_hops(mine, probe.kv_bytes, config.reps, device)
    prev = mine[mine.index(me) - 1]
    first = gather_records([{"src": prev, "dst": me, "seconds": seconds}] if seconds else [])
    timings, batches = _agree(lambda: _round_one(config, probe, router, first, places, rank_of))
    rounds = [timings] if timings else []
    # 2. a probe round when several explanations fit
    if batches:
        timed = time_pairs(batches, probe.kv_bytes, config.reps, device)
        second = gather_records([{"src": s, "dst": d, "seconds": t}
                                 for (s, d), t in timed.items()])
        if me == 0:
            rounds.append([h for batch in batches for h in _timings(
                router, [r for r in second if (r["src"], r["dst"]) in batch], places,
                probe.kv_bytes)])
    # 3. the shard group's and the replicas' collectives; 4. numerics, on the stage's layout
    layout = build_mesh(probe.dims, [[rank_of[g] for g in ring] for ring in probe.rings],
                        device.type)
    timed_collectives = _time_collectives(probe, layout, config.reps, device)
    numerics = attention_numerics(layout, probe.numerics, device, seed=config.seed)
    if me != 0:
        return None
    # rank 0 alone from here: an error no longer leaves the others waiting in a collective
    explanation = None
    if rounds:
        explanation = explain(router, rounds[0], config.slow_factor, config.fabric_factor)
        if len(rounds) > 1:
            explanation = refine(router, explanation, rounds[1])
    collectives = [row for op, nbytes, records in timed_collectives
                   for row in _collective_rows(op, nbytes, records, places, router)]
    return _report(Path(config.out_dir) / probe.stage, probe, router, rounds, explanation,
                   collectives, numerics)


def _round_one(config: PreflightConfig, probe: StageProbe, router: Router,
               records: list[dict], places: list[str], rank_of: dict[str, int]
               ) -> tuple[list[HopTiming], list[list[tuple[int, int]]]]:
    """Rank 0: round one's timings, and the probe round's batches of (source, destination)
    ranks, empty when its slow hops have one explanation (or no hop was timed)."""
    if not records:
        return [], []
    timings = _timings(router, records, places, probe.kv_bytes)
    first = explain(router, timings, config.slow_factor, config.fabric_factor)
    return timings, [[(rank_of[a], rank_of[b]) for a, b in batch]
                     for batch in probe_pairs(router, first, probe.gpus)]


def _agree(decide):
    """Rank 0's `decide()` on every rank (collective). Should it raise, every rank raises its
    reason rather than wait for a transfer rank 0 will never make."""
    sent: list = [(None, None)]
    if dist.get_rank() == 0:
        try:
            sent = [(decide(), None)]
        except Exception as e:  # handed to every rank, raised there
            sent = [(None, f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(sent)
    value, error = sent[0]
    if error is not None:
        raise RuntimeError(f"rank 0 could not choose the probe round: {error}")
    return value


def _timings(router: Router, records: list[dict], places: list[str], nbytes: int
             ) -> list[HopTiming]:
    """HopTimings of records timed together (one round, or one probe batch): each beside the
    cost model's time for all of them at once; the median repetition is the measurement."""
    pairs = [(places[r["src"]], places[r["dst"]]) for r in records]
    predicted = predict_hops(router, pairs, nbytes)
    return [HopTiming(src, dst, nbytes, p, median(r["seconds"]))
            for (src, dst), p, r in zip(pairs, predicted, records)]


def _time_collectives(probe: StageProbe, layout, reps: int, device: torch.device
                      ) -> list[tuple[str, int, list[dict]]]:
    """Each collective a step runs, every group at once: FSDP's shard groups (per decoder
    layer) and, with several replicas, the replicas' gradient all-reduce. Rank 0 gets per
    collective (op, bytes, every rank's {group, seconds}); the others an empty list."""
    shard = layout.fsdp_mesh.get_group("shard")
    work = [("all_gather", shard), ("reduce_scatter", shard)]
    if probe.dims.dp_replicate > 1:
        work.append(("all_reduce", layout.fsdp_mesh.get_group("dp_replicate")))
    out = []
    for op, group in work:
        members = dist.get_process_group_ranks(group)
        if len(members) < 2:
            continue
        nbytes = probe.collective_bytes[op]
        seconds = time_collective(group, op, nbytes, reps, device)
        records = gather_records([{"group": members, "seconds": seconds}])
        if records is not None:
            out.append((op, nbytes, records))
    return out


def _collective_rows(op: str, nbytes: int, records: list[dict], places: list[str],
                     router: Router) -> list[dict]:
    """Per group: the median over repetitions of its slowest member, its bus bandwidth
    (NCCL-tests' convention) and the cost model's time for the same ring transfers."""
    groups: dict[tuple[int, ...], list[list[float]]] = {}
    for r in records:
        groups.setdefault(tuple(r["group"]), []).append(r["seconds"])
    # a ring collective over n members moves (n - 1) chunks of nbytes / n per member, twice
    # for all_reduce (reduce-scatter, then all-gather); all groups run at once
    vertices = [[places[r] for r in g] for g in groups]
    n = len(vertices[0])
    hops = evaluate_flows(router, ring_flows(vertices), nbytes / n).hop_seconds
    steps = (2 if op == "all_reduce" else 1) * (n - 1)
    factor = steps / n  # bus bandwidth: bytes over the time, times this
    rows, k = [], 0
    for members, per_rank in groups.items():
        # a repetition is done when its slowest member is
        measured = statistics.median(max(rep) for rep in zip(*per_rank))
        predicted = steps * max(hops[k:k + n])
        k += n
        rows.append({"op": op, "group": [places[r] for r in members], "nbytes": nbytes,
                     "measured_s": measured, "predicted_s": predicted,
                     "ratio": measured / predicted if predicted else None,
                     "bus_gb_s": nbytes * factor / measured / 1e9})
    return rows


def _report(out: Path, probe: StageProbe, router: Router, rounds: list[list[HopTiming]],
            explanation, collectives: list[dict], numerics: dict) -> StageResult:
    """Write the stage's preflight.json, table.txt and fabric.png; its lines and status."""
    result = StageResult(stage=probe.stage)
    wrong = numerics_finding(numerics)
    if explanation is None:  # a ring of one GPU: no hop to time
        out.mkdir(parents=True, exist_ok=True)
        none = "no finding: no ring hop to time (ring_degree 1: K/V never travels a ring)"
        path = atomic_write(out / "preflight.json", json.dumps(
            {"rounds": [], "findings": [{"kind": "none", "text": none, "suspects": []}],
             "numerics": numerics}, indent=1) + "\n")
        result.lines.append(none)
    else:
        path = write_report(out, rounds, explanation, numerics=numerics)
        atomic_write(out / "table.txt", render_table(explanation) + "\n")
        plot_fabric(router, explanation, out / "fabric.png")
        result.lines += [f.text for f in findings(explanation)]
        result.code = exit_code(explanation)
    doc = json.loads(path.read_text())
    doc.update(stage=probe.stage, layout=probe.dims.degree_keys(), rings=probe.rings,
               collectives=collectives)
    if wrong is not None:
        result.lines.append(wrong)
        result.code = 1
        doc["findings"] = [*doc["findings"], {"kind": "numerics", "text": wrong,
                                              "suspects": []}]
    doc["exit_code"] = result.code
    atomic_write(path, json.dumps(doc, indent=1) + "\n")
    return result
