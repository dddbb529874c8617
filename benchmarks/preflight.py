"""Preflight benchmark: how often tomography names a throttled link, and how long a preflight
of a 64-GPU plan would take. Simulated on the cost model: no fabric is timed here.

Run: python benchmarks/preflight.py [--trials N]   (its run time here: benchmarks/RESULTS.md)
Prints one table per measurement, then ONE JSON object on the last line:
  tomography_accuracy     share of TRIALS seeded trials whose final explanation (after one
                          probe round) is exactly the throttled link: each trial a generated
                          fabric (topology.fabrics, up to 16 GPUs), a random ring layout over all
                          its GPUs, one directed link that a ring hop crosses throttled to 1/10 to
                          1/50 of its bandwidth, hop times from the cost model with that link
                          slowed, times log-normal noise of sigma NOISE. A link that every route
                          crosses together with others (topology.tomography's link classes) is
                          named by its class: the throttled link must be a member of the one
                          suspect named
  tomography_ambiguous    share still with several explanations after the probe round
  tomography_wrong        share naming something else, or nothing that explains the slow hops
  tomography_missed       share where no hop ran slow enough to count (the throttle hid behind
                          another bottleneck of its hops); tomography_missed_harmless: of those,
                          the ones where even without noise no hop ran SLOW_FACTOR x slower (a
                          throttle the planned rings do not feel at this size)
  round_one_unique        share already unique and right after round one (no probes needed)
  probe_pairs_mean        probe pairs per trial that needed probes
  tomography_seconds_64_nodes  CPU seconds of explain + probe_pairs + refine on the longest
                          stage of the plan below with one link throttled (this process)
  preflight_seconds_64_nodes  simulated wall seconds of a preflight of configs/llama3-8b-1m.yaml's
                          plan on configs/clusters/l40s-64-leaf-spine.yaml (64 nodes of 8 L40S:
                          512 GPUs; the recipe's 524k stage does not fit 64 GPUs, 79.6 GB per
                          GPU at ring 32, so there is no 64-GPU plan to time). STARTUP_S, then per
                          stage REPS timed repetitions (and one warm-up) of the ring round (all
                          ring hops at once at the K/V block size: the slowest hop), of the
                          collective round (one decoder layer's all-gather and reduce-scatter
                          around each shard group, and the replicas' all-reduce of its gradient
                          shard; ring algorithms, hop times from the cost model) and of one
                          probe round (as tomography chooses it for a link throttled 20x)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specs.cluster import ClusterSpec  # noqa: E402
from specs.plan import StagePlan  # noqa: E402
from specs.run import RunSpec  # noqa: E402
from topology.cost import StageShape, dp_flows, evaluate_flows, ring_flows  # noqa: E402
from topology.fabrics import build_generated_cluster  # noqa: E402
from topology.graph import Router, build_graph  # noqa: E402
from topology.run_plan import plan_run  # noqa: E402
from topology.sources import load_cluster  # noqa: E402
from topology.tomography import (  # noqa: E402
    SLOW_FACTOR,
    Explanation,
    explain,
    probe_pairs,
    refine,
    simulate_round,
    slowed,
)

TRIALS = 200
NOISE = 0.1  # sigma of the log-normal measurement noise
NBYTES = 64 << 20  # bytes per hop in the accuracy trials (a K/V block of a long stage)
REPS = 5  # timed repetitions per round, after one warm-up
STARTUP_S = 30.0  # assumption: `ray job submit` (~8 s here), the Train worker group (~10 s on
# CPU here, FACTS.md), NCCL communicators over 64 GPUs (a few seconds, not measured), rounded up
PROBE_THROTTLE = 20.0  # the throttled link of the 64-GPU probe round


def outcome(final: Explanation, throttled: tuple[str, str], router: Router) -> str:
    """correct / ambiguous / wrong / missed, for a trial whose truth is `throttled`."""
    if not final.slow_hops:
        return "missed"
    if len(final.candidates) > 1:
        return "ambiguous"
    if final.unique and len(final.candidates[0]) == 1:
        (named,) = final.candidates[0]
        if not isinstance(named, str) and throttled in final.aliases.get(named, (named,)):
            return "correct"
    return "wrong"


def one_trial(seed: int) -> dict | None:
    """A generated fabric, a random ring layout, one throttled link, two rounds; None for a
    fabric of one GPU (no hop to time)."""
    pick = random.Random(seed)
    spec = build_generated_cluster(pick.choice)
    router = Router(spec, build_graph(spec))
    gpus = [f"{n.name}/gpu{g}" for n in spec.nodes for g in spec.node_types[n.node_type].gpus]
    if len(gpus) < 2:
        return None
    sizes = [r for r in range(2, len(gpus) + 1) if len(gpus) % r == 0]
    ring = pick.choice(sizes)
    order = gpus[:]
    pick.shuffle(order)
    rings = [order[i:i + ring] for i in range(0, len(order), ring)]
    pairs = ring_flows(rings)
    crossed = sorted({lk for s, d in pairs for lk in router.route(s, d)})
    throttled = pick.choice(crossed)
    truth = slowed(router, {throttled: pick.uniform(10.0, 50.0)})
    clean = simulate_round(router, truth, [pairs], NBYTES)
    rng = np.random.default_rng(seed)
    first = explain(router, simulate_round(router, truth, [pairs], NBYTES, NOISE, rng))
    batches = probe_pairs(router, first, gpus)
    final = refine(router, first, simulate_round(router, truth, batches, NBYTES, NOISE, rng))
    return {"seed": seed, "gpus": len(gpus), "ring": ring, "outcome": outcome(final, throttled,
                                                                              router),
            "round_one": outcome(first, throttled, router),
            "probes": sum(len(b) for b in batches),
            "harmless": max(h.ratio for h in clean) <= SLOW_FACTOR}


def accuracy(trials: int) -> dict:
    rows, seed = [], 0
    while len(rows) < trials:
        row = one_trial(seed)
        seed += 1
        if row is not None:
            rows.append(row)
    share = {k: sum(r["outcome"] == k for r in rows) / trials
             for k in ("correct", "ambiguous", "wrong", "missed")}
    probed = [r["probes"] for r in rows if r["probes"]]
    out = {**share, "missed_harmless": sum(r["outcome"] == "missed" and r["harmless"]
                                           for r in rows) / trials,
           "round_one_unique": sum(r["round_one"] == "correct" for r in rows) / trials,
           "probe_pairs_mean": statistics.mean(probed) if probed else 0.0, "trials": trials}
    print(f"tomography on {trials} generated fabrics (noise {NOISE:.0%}, one link throttled "
          "10-50x): " + ", ".join(f"{k} {v:.3f}" for k, v in share.items())
          + f" (harmless {out['missed_harmless']:.3f}); unique after round one "
          f"{out['round_one_unique']:.3f}; "
          f"{out['probe_pairs_mean']:.1f} probe pairs where probed")
    for r in rows:
        if r["outcome"] != "correct":
            print(f"  seed {r['seed']}: {r['gpus']} GPUs, rings of {r['ring']}: {r['outcome']}")
    return out


# ---- a 64-GPU preflight ------------------------------------------------------------------------

def kv_rings(stage: StagePlan) -> list[list[str]]:
    """The K/V rings of a planned stage: member k of each Ulysses group passes to member k of the
    next group (without Ulysses: the rings themselves)."""
    u = stage.dims.ulysses
    out = []
    for ring in stage.rings:
        names = [f"{w.node}/gpu{w.gpu}" for w in ring]
        groups = [names[i:i + u] for i in range(0, len(names), u)]
        out += [[g[k] for g in groups] for k in range(u)]
    return out


def shard_groups(stage: StagePlan) -> list[list[str]]:
    """Each shard group's GPUs in ring order: dp_shard consecutive rings joined."""
    rings = [[f"{w.node}/gpu{w.gpu}" for w in r] for r in stage.rings]
    k = stage.dims.dp_shard
    return [[g for r in rings[i:i + k] for g in r] for i in range(0, len(rings), k)]


def collective_seconds(router: Router, stage: StagePlan, shape: StageShape) -> float:
    """One decoder layer's all-gather (compute dtype) and reduce-scatter (reduce dtype) around
    every shard group at once, (S - 1) hops each, and the replicas' all-reduce of the layer's
    gradient shard, 2 (R - 1) hops: ring algorithms, each hop priced with all groups' hops at
    once."""
    layer = (shape.params - shape.root_params) / shape.layers
    groups = shard_groups(stage)
    s = len(groups[0])
    around = ring_flows(groups)
    total = 0.0
    if s > 1:
        total += (s - 1) * evaluate_flows(router, around, layer * shape.elem_bytes / s).seconds
        total += (s - 1) * evaluate_flows(router, around,
                                          layer * shape.grad_reduce_bytes / s).seconds
    replicas = len(groups)
    if replicas > 1:
        shard = layer * shape.grad_reduce_bytes / s
        total += 2 * (replicas - 1) * evaluate_flows(router, dp_flows(groups),
                                                     shard / replicas).seconds
    return total


def probe_round(router: Router, stage: StagePlan, shape: StageShape, seed: int
                ) -> tuple[float, float, int]:
    """(wall seconds of one probe repetition, CPU seconds of the analysis, probe pairs) for a
    seeded link of the stage's rings throttled PROBE_THROTTLE x."""
    pairs = ring_flows(kv_rings(stage))
    crossed = sorted({lk for s, d in pairs for lk in router.route(s, d)})
    pick = random.Random(seed)
    truth = slowed(router, {pick.choice(crossed): PROBE_THROTTLE})
    gpus = sorted({g for r in kv_rings(stage) for g in r})
    nbytes = shape.kv_block_bytes
    rng = np.random.default_rng(seed)
    hops = simulate_round(router, truth, [pairs], nbytes, NOISE, rng)
    t = time.process_time()
    first = explain(router, hops)
    batches = probe_pairs(router, first, gpus)
    analysis = time.process_time() - t
    probes = simulate_round(router, truth, batches, nbytes, NOISE, rng)
    t = time.process_time()
    refine(router, first, probes)
    analysis += time.process_time() - t
    wall, k = 0.0, 0
    for batch in batches:
        wall += max(h.measured_s for h in probes[k:k + len(batch)])
        k += len(batch)
    return wall, analysis, len(probes)


def preflight_seconds(spec: ClusterSpec, run: RunSpec) -> dict:
    """The simulated wall time of a preflight of `run`'s plan on `spec`, by part."""
    router = Router(spec, build_graph(spec))
    t = time.perf_counter()
    plan = plan_run(spec, run)
    plan_s = time.perf_counter() - t
    print(f"\npreflight of {run.name} on {spec.name} ({spec.num_gpus} GPUs; planned in "
          f"{plan_s:.1f} s): {REPS} repetitions and a warm-up per round, start-up "
          f"{STARTUP_S:.0f} s (assumption)")
    print(f"{'stage':<8}{'layout':>14}{'K/V MiB':>9}{'ring hop ms':>12}{'ring s':>8}"
          f"{'coll. s':>9}{'probes':>8}{'probe s':>9}{'analysis s':>11}")
    parts = {"startup": STARTUP_S}
    analysis_s = {}
    for index, (stage, st) in enumerate(zip(plan.stages, run.stages)):
        shape = StageShape.of(run, st, stage.dims)
        hop = evaluate_flows(router, ring_flows(kv_rings(stage)), shape.kv_block_bytes).seconds
        ring_s = (REPS + 1) * hop
        coll_s = (REPS + 1) * collective_seconds(router, stage, shape)
        probe_wall, analysis, n_probes = probe_round(router, stage, shape, seed=index)
        probe_s = (REPS + 1) * probe_wall
        parts[stage.name] = ring_s + coll_s + probe_s
        analysis_s[stage.name] = analysis
        d = stage.dims
        layout = f"{d.ring}x{d.dp}" + (f"xu{d.ulysses}" if d.ulysses > 1 else "")
        print(f"{stage.name:<8}{layout:>14}{shape.kv_block_bytes / 2**20:>9.1f}"
              f"{hop * 1e3:>12.2f}{ring_s:>8.2f}{coll_s:>9.2f}{n_probes:>8}{probe_s:>9.2f}"
              f"{analysis:>11.3f}")
    total = sum(parts.values())
    longest = max(plan.stages, key=lambda s: s.seq_len).name
    print(f"total {total:.1f} s, of which start-up {STARTUP_S:.0f} s")
    return {"total": total, "parts": parts, "analysis_longest": analysis_s[longest]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=TRIALS, help=f"accuracy trials ({TRIALS})")
    args = parser.parse_args()
    if args.trials < 20:
        parser.error(f"--trials {args.trials}: give at least 20")
    acc = accuracy(args.trials)
    run = RunSpec.model_validate(yaml.safe_load((ROOT / "configs/llama3-8b-1m.yaml").read_text()))
    pre = preflight_seconds(load_cluster(ROOT / "configs/clusters/l40s-64-leaf-spine.yaml"), run)
    print(json.dumps({
        "tomography_accuracy": round(acc["correct"], 3),
        "tomography_ambiguous": round(acc["ambiguous"], 3),
        "tomography_wrong": round(acc["wrong"], 3),
        "tomography_missed": round(acc["missed"], 3),
        "tomography_missed_harmless": round(acc["missed_harmless"], 3),
        "tomography_trials": acc["trials"],
        "round_one_unique": round(acc["round_one_unique"], 3),
        "probe_pairs_mean": round(acc["probe_pairs_mean"], 1),
        "tomography_seconds_64_nodes": round(pre["analysis_longest"], 3),
        "preflight_seconds_64_nodes": round(pre["total"], 1),
        "preflight_parts_64_nodes": {k: round(v, 2) for k, v in pre["parts"].items()},
        "noise": NOISE, "reps": REPS, "startup_seconds": STARTUP_S,
    }))


if __name__ == "__main__":
    main()
