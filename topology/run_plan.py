"""Plan every stage of a RunSpec: on a described cluster (with predictions) or on bare Ray nodes."""

from __future__ import annotations

import random
from typing import Any

import networkx as nx

from specs.cluster import ClusterSpec
from specs.degrees import (
    CHECKPOINT_POLICIES,
    CheckpointPolicy,
    DegreeError,
    kv_replication_note,
    resolve_degrees,
    ulysses_problems,
)
from specs.plan import (
    Alternative,
    AttentionOption,
    CheckpointOption,
    LinkLoad,
    Plan,
    Prediction,
    StagePlan,
    Worker,
)
from specs.run import RunSpec, StageSpec
from topology.cost import (
    GB,
    StageShape,
    evaluate_flows,
    lifecycle_peaks,
    policy_without_memory_model,
    predict_stage,
)
from topology.eval_plan import ANSWER_TOKENS, plan_eval
from topology.graph import gpu_vertex, split_gpu_vertex
from topology.planner import SEARCH_SECONDS, TIE, Evaluated, PlanError, Planner
from topology.profile import HardwareProfile

# what a policy keeps beyond `full`, for the planner's note
KEEPS = {"attention": "keeps ring attention's output and log-sum-exp through the recomputation",
         "none": "keeps every layer's activations, recomputes nothing"}


def _workers(rings: list[list[str]]) -> list[list[Worker]]:
    return [[Worker(node=n, gpu=g) for n, g in map(split_gpu_vertex, r)] for r in rings]


def _prediction(ev: Evaluated, profile) -> Prediction:
    c = ev.cost
    peak = profile.peak_bf16_flops * (ev.cost.step_seconds) * len(ev.rings) * len(ev.rings[0])
    return Prediction(
        step_seconds=c.step_seconds, tokens_per_second=c.tokens_per_second,
        wall_minutes=c.wall_minutes, parts_seconds=c.parts,
        ring_hop_seconds=ev.ring.seconds, ring_hop_gb_s=min(ev.ring.bandwidth_gb_s, 1e6),
        dp_hop_seconds=ev.dp.seconds, mfu=c.model_flops_per_step / peak,
        ring_headroom=None if c.ring_headroom == float("inf") else c.ring_headroom,
        model_flops_per_step=c.model_flops_per_step,
        memory_gb={k: v / GB for k, v in c.memory.items()},
        # priced once per planned stage, not per placement the search evaluates
        lifecycle_gb={phase: {k: v / GB for k, v in sides.items()}
                      for phase, sides in lifecycle_peaks(c.shape, profile).items()})


def _bottlenecks(planner: Planner, ev: Evaluated, top: int = 8) -> list[LinkLoad]:
    g = planner.graph
    rows = []
    for (u, v), flows in ev.ring.loads.items():
        bw = g.edges[u, v]["bandwidth"]
        rows.append((bw / flows, -flows, f"{u} -> {v}", flows, bw))
    rows.sort()
    return [LinkLoad(link=name, flows=f, bandwidth_gb_s=bw, share_gb_s=share)
            for share, _, name, f, bw in rows[:top]]


def plan_stage(planner: Planner, run: RunSpec, index: int, seed: int = 0,
               relax: bool = False) -> StagePlan:
    """Degrees, rings and order for stage `index`, its prediction, baselines and bound. With
    `relax` (what-if), a stage whose fixed degrees no longer fit the GPUs gets fewer rings.
    ulysses_degree 'auto': the ring-only layout's GPUs per sequence, split every legal way
    between Ulysses and the ring; the fastest predicted step wins (ring-only on a tie).
    Degrees and rings are searched under the stage's activation checkpointing policy ('full'
    for 'auto'); every policy is then priced on the chosen layout (plan_checkpointing), and
    with a document-length histogram both attention maskings (plan_attention)."""
    stage = run.stages[index]
    if stage.ulysses_degree != "auto":
        return plan_attention(planner, run, index, plan_checkpointing(
            planner, run, index, *_plan_fixed(planner, run, index, seed, relax), seed))
    ring_only = _plan_fixed(planner, _with_stage(run, index, ulysses_degree=1), index, seed,
                            relax)
    n, m = ring_only[0].dims.sequence, run.model
    options = {1: ring_only}
    for u in range(2, n + 1):
        if n % u or ulysses_problems(m.num_attention_heads, m.num_key_value_heads, u):
            continue
        split = _with_stage(run, index, ring_degree=n // u, ulysses_degree=u,
                            data_parallel_degree=ring_only[0].dims.dp,
                            shard_degree=ring_only[0].dims.shard)
        try:
            options[u] = _plan_fixed(planner, split, index, seed, relax)
        except (PlanError, ValueError):
            continue  # a split that does not fit memory or the GPUs is no option
    step = {u: p.prediction.step_seconds for u, (p, _) in options.items()}
    # a split must beat the ring alone by more than TIE (ring attention alone is simpler)
    best = min((u for u in step if u == 1 or step[u] < step[1] * (1 - TIE)), key=step.get)
    chosen, placed = options[best]
    named = "; ".join(f"{_split_name(n // u, u)} {step[u]:.1f} s" for u in sorted(step))
    parts = chosen.prediction.parts_seconds
    alone = ring_only[0].prediction.parts_seconds
    exposed = alone["exposed ring K/V"] + alone["exposed weight sharding"]
    if len(step) == 1:
        why = "no Ulysses degree fits the heads and the GPUs"
    elif best == 1:
        why = (f"ring attention alone exposes {exposed:.1f} s a step of K/V and sharding "
               "traffic, less than any split's all-to-alls (never overlapped) and traffic add")
    else:
        why = (f"its all-to-alls inside groups of {best} ({parts['Ulysses all-to-all']:.1f} s a "
               f"step) and its exposed traffic ({parts['exposed ring K/V']:.1f} s K/V, "
               f"{parts['exposed weight sharding']:.1f} s sharding) beat the {exposed:.1f} s "
               "that ring attention alone exposes")
    note = (f"ulysses auto: step time per split of the {n} GPUs of a sequence: {named}; "
            f"chose {_split_name(n // best, best)}: {why}")
    chosen = chosen.model_copy(update={"notes": [note, *chosen.notes]})
    return plan_attention(planner, run, index,
                          plan_checkpointing(planner, run, index, chosen, placed, seed))


def _split_name(ring: int, ulysses: int) -> str:
    if ulysses == 1:
        return f"ring {ring} alone"
    return f"pure Ulysses {ulysses}" if ring == 1 else f"ring {ring} x ulysses {ulysses}"


def _with_stage(run: RunSpec, index: int, **changes) -> RunSpec:
    stages = list(run.stages)
    stages[index] = stages[index].model_copy(update=changes)
    return run.model_copy(update={"stages": stages})


def _plan_fixed(planner: Planner, run: RunSpec, index: int, seed: int, relax: bool
                ) -> tuple[StagePlan, Evaluated]:
    """The stage on its given (or memory-chosen) degrees under its search policy: the plan
    and the placement it priced."""
    stage = run.stages[index]
    n_gpus = min(planner.spec.num_gpus, run.resources.workers)
    try:
        dims, notes = planner.plan_degrees(run, stage, n_gpus, strict=not relax)
    except PlanError as e:
        if not relax or stage.data_parallel_degree == "auto":
            raise
        stage = stage.model_copy(update={"data_parallel_degree": "auto"})
        dims, notes = planner.plan_degrees(run, stage, n_gpus, strict=False)
        notes = [f"re-planned with fewer rings: {e}"]
    best, more = planner.plan_rings(run, stage, dims)
    policy = StageShape.of(run, stage, dims).checkpointing  # the search's: the stage's, or full
    prediction, alts = _priced(planner, best, StageShape.of(run, stage, dims), seed)
    return StagePlan(name=stage.name, seq_len=stage.seq_len, rope_theta=run.stage_theta(index),
                     dims=dims, rings=_workers(best.rings), activation_checkpointing=policy,
                     bottleneck_links=_bottlenecks(planner, best),
                     prediction=prediction, alternatives=alts,
                     notes=notes + more + kv_replication_note(run.model.num_key_value_heads,
                                                              dims.ulysses)), best


def _priced(planner: Planner, placed: Evaluated, shape: StageShape, seed: int
            ) -> tuple[Prediction, list[Alternative]]:
    """The prediction of the rings of `placed` for `shape` (its policy included), and the
    baselines (Ray's order, a seeded shuffle of the same GPUs) and bound beside it."""
    best = planner.evaluate(placed.rings, shape)
    n, dp = shape.ring * shape.ulysses, shape.dp
    alts = []
    ray = planner.ray_default_order(seed)[: n * dp]
    ev = planner.evaluate([ray[i * n:(i + 1) * n] for i in range(dp)], shape)
    alts.append(Alternative(name="ray-default", ring_hop_seconds=ev.ring.seconds,
                            step_seconds=ev.cost.step_seconds, wall_minutes=ev.cost.wall_minutes))
    shuffled = [v for r in best.rings for v in r]
    random.Random(seed).shuffle(shuffled)
    ev = planner.evaluate([shuffled[i * n:(i + 1) * n] for i in range(dp)], shape)
    alts.append(Alternative(name="random", ring_hop_seconds=ev.ring.seconds,
                            step_seconds=ev.cost.step_seconds, wall_minutes=ev.cost.wall_minutes))
    bound = planner.ring_lower_bound(shape)
    lb = predict_stage(shape, bound, evaluate_flows(planner.router, [], 0), planner.profile,
                       best.a2a)  # the bound is on the ring hop; the all-to-alls as planned
    alts.append(Alternative(name="lower-bound", ring_hop_seconds=bound.seconds,
                            step_seconds=lb.step_seconds, wall_minutes=lb.wall_minutes))
    prediction = _prediction(best, planner.profile)
    if bound.seconds > 0:
        prediction = prediction.model_copy(update={
            "ring_hop_bound_seconds": bound.seconds,
            "ring_hop_gap": best.ring.seconds / bound.seconds})
    return prediction, alts


def plan_checkpointing(planner: Planner, run: RunSpec, index: int, plan: StagePlan,
                       placed: Evaluated, seed: int = 0) -> StagePlan:
    """Every activation checkpointing policy priced on the planned layout (`plan`, whose rings
    `placed` holds): step time and memory per GPU. A stage that sets its policy keeps it; for
    'auto' the fastest policy that fits the GPU wins, one that holds more memory only when it
    is faster by more than TIE. The plan's prediction and baselines are then the chosen
    policy's."""
    stage = run.stages[index]
    profile = planner.profile
    options = []
    for policy in CHECKPOINT_POLICIES:
        cost = planner.evaluate(placed.rings, StageShape.of(run, stage, plan.dims, policy)).cost
        peak = sum(cost.memory.values())
        options.append(CheckpointOption(policy=policy, step_seconds=cost.step_seconds,
                                        peak_gb=peak / GB, fits=peak <= profile.hbm_bytes))
    by = {o.policy: o for o in options}
    searched = by[plan.activation_checkpointing]
    priced = "; ".join(
        f"{o.policy} {o.step_seconds:,.1f} s, {o.peak_gb:.1f} GB"
        + ("" if o.fits else f" (over the {profile.hbm_bytes / GB:.0f} GB)") for o in options)
    if stage.activation_checkpointing != "auto":
        chosen = searched
        note = f"activation checkpointing {chosen.policy}, as the stage sets it"
    else:  # CHECKPOINT_POLICIES lists them by the memory they hold, least first
        chosen = searched
        for o in options:
            if o.fits and o.step_seconds < chosen.step_seconds * (1 - TIE):
                chosen = o
        full = by["full"]
        if chosen is not full:
            why = (f"{KEEPS[chosen.policy]}: {chosen.peak_gb - full.peak_gb:+.1f} GB per GPU, "
                   f"{chosen.step_seconds / full.step_seconds - 1:+.0%} step vs full")
        else:
            faster = [o for o in options if o.step_seconds < full.step_seconds * (1 - TIE)]
            why = ("; ".join(f"{o.policy} would take {o.step_seconds / full.step_seconds - 1:+.0%}"
                             f" step but needs {o.peak_gb:.1f} GB" for o in faster)
                   + f", over the {profile.hbm_bytes / GB:.0f} GB" if faster else
                   f"no other policy is faster by more than {TIE:.1%}")
        how = (f"the degrees and rings were searched under {searched.policy}, the policy then "
               "chosen on them" if chosen is searched else
               f"the degrees were searched under {searched.policy} and the policy chosen on "
               f"them; the rings were then ordered again for {chosen.policy}")
        note = f"activation checkpointing auto: {chosen.policy} ({why}; {how})"
    notes = [f"{note}; per policy on this layout: {priced}"]
    update: dict = {"activation_checkpointing": chosen.policy, "checkpointing_options": options,
                    "notes": [*plan.notes, *notes]}
    if chosen is not searched:
        # The rings were ordered for the searched policy's mix of compute and traffic: order
        # them again for the chosen one (same degrees), so the plan is the search's best for
        # what the trainer runs, and never worse than Ray's order under it.
        stage = stage.model_copy(update={"activation_checkpointing": chosen.policy})
        placed, _ = planner.plan_rings(_with_stage(run, index, activation_checkpointing=
                                                   chosen.policy), stage, plan.dims)
        shape = StageShape.of(run, stage, plan.dims, chosen.policy)
        update["prediction"], update["alternatives"] = _priced(planner, placed, shape, seed)
        update["rings"] = _workers(placed.rings)
        update["bottleneck_links"] = _bottlenecks(planner, placed)
        update["checkpointing_options"] = [
            o.model_copy(update={"step_seconds": update["prediction"].step_seconds})
            if o is chosen else o for o in options]
    return plan.model_copy(update=update)


ATTENTIONS = ("causal", "document")


def plan_attention(planner: Planner, run: RunSpec, index: int, plan: StagePlan) -> StagePlan:
    """Both attention maskings priced on the planned layout and policy, when the run has a
    document-length histogram (data.document_lengths, or the prepared corpus's put there by
    topology.documents.with_corpus_document_lengths): step time, attention compute, exposed
    K/V, the allowed pairs, the busiest rank over the mean and the blocks skipped. The stage's
    own masking (cost.stage_attention) is what the plan predicts; the other is shown beside."""
    shape = StageShape.of(run, run.stages[index], plan.dims, plan.activation_checkpointing)
    if shape.document_lengths is None:
        if shape.attention == "causal":
            return plan
        note = ("attention document without a document-length histogram: priced as causal, an "
                "upper bound; give data.document_lengths or prepare the data")
        return plan.model_copy(update={"notes": [*plan.notes, note]})
    rings = [[gpu_vertex(w.node, w.gpu) for w in ring] for ring in plan.rings]
    options = []
    for attention in ATTENTIONS:
        priced = shape.with_attention(attention)
        cost = planner.evaluate(rings, priced).cost
        work = priced.documents
        options.append(AttentionOption(
            attention=attention, chosen=attention == shape.attention,
            step_seconds=cost.step_seconds, attention_seconds=cost.parts["attention compute"],
            exposed_ring_seconds=cost.parts["exposed ring K/V"],
            work=work.mean if work else 1.0, imbalance=work.imbalance if work else 1.0,
            skipped_blocks=work.skipped if work else 0.0))
    causal, document = options
    note = (f"attention {shape.attention} (the stage's); per masking on this layout: causal "
            f"{causal.step_seconds:,.1f} s, document {document.step_seconds:,.1f} s (allowed "
            f"pairs {document.work:.0%} of causal, busiest rank {document.imbalance:.2f}x the "
            f"mean, {document.skipped_blocks:.0%} of blocks skipped): document masking "
            f"{causal.step_seconds / document.step_seconds:.2f}x the speed of causal")
    return plan.model_copy(update={"attention_options": options,
                                   "notes": [*plan.notes, note]})


def plan_run(spec: ClusterSpec, run: RunSpec, graph: nx.Graph | None = None,
             excluded: list[str] | None = None, relax: bool = False,
             profile: HardwareProfile | None = None, notes: list[str] | None = None,
             search_seconds: float = SEARCH_SECONDS,
             base_rope: dict[str, Any] | None = None) -> Plan:
    """Plan all stages of `run` on the cluster `spec` (optionally on a modified `graph`), with
    the cluster's hardware profile or `profile` (a calibrated one, topology.calibration, whose
    `notes` lead the plan's assumptions); `search_seconds`: the placement search's budget per
    stage layout tried; `base_rope`: the base model's RoPE rule (RunSpec.base_rope), which
    each stage's `rope` is resolved against."""
    planner = Planner(spec, graph, profile, search_seconds=search_seconds)
    stages = with_attention(run, with_rope(run, [plan_stage(planner, run, i, relax=relax)
                                                 for i in range(len(run.stages))], base_rope))
    p = planner.profile
    assumptions = list(notes or [])
    assumptions += [f"{k}: {p.sources.get(k, '')}" for k in p.assumptions]
    assumptions += [
        "weights, gradients and AdamW state in the model's storage dtype (fp32: 16 bytes per "
        "parameter) sharded over each stage's shard group (FSDP2; HSDP across groups), layers "
        "computing in bf16, activations checkpointed per decoder layer as each stage's policy "
        "says (full: its input; attention: also ring attention's output and log-sum-exp, so "
        "the ring runs once forward; none: everything), the loss in chunks: the memory model "
        "describes ray_jobs.train.parallelize and is checked against traces of it "
        "(ringpilot plan --verify-memory); CUDA context and fragmentation are the reserve",
        "ring K/V transfers overlap the attention block compute only; weight all-gathers overlap "
        "the dense compute only; the data-parallel all-reduce is not overlapped",
        "concurrent transfers share each link equally; ECMP spreads perfectly over a spine layer",
        "Ray discovery order is modelled as a seeded shuffle of the nodes",
    ]
    if any(s.attention_options for s in stages):
        assumptions.append(
            "attention document: the allowed pairs of every ring block counted on packed "
            "sequences drawn from the document-length histogram (documents back to back, cut "
            "at random places; lengths uniform inside a bucket) and sharded per document as the "
            "trainer shards them on a ring, the busiest rank setting each phase's pace; a "
            "skipped block's K/V transfer is not hidden; a masked block costs "
            "what its allowed pairs would cost dense (the mask itself is not priced)")
    if any(s.dims.ulysses > 1 for s in stages):
        assumptions.append("Ulysses stages: memory is the model's alone (the tracer does not "
                           "follow their all-to-alls yet); all-to-alls are not overlapped")
    assumptions.append(
        "evaluation: gang members hold the whole model each (only the sequence and its KV cache "
        f"are split); decoding is memory-bound; {ANSWER_TOKENS} tokens decoded per prompt; "
        "gangs on GPUs beside training's, in the cluster's locality order; evaluators load in "
        "bf16 on CUDA when layers compute in bf16 (fp32 on CPU); a stage's evaluation runs on "
        "whole nodes without its training workers, or after the stage when they are too few")
    return Plan(run=run.name, cluster=spec.name, profile=p.name, stages=stages,
                unknown_topology=[u.name for u in spec.unknown_topology],
                excluded=excluded or [], assumptions=assumptions,
                eval=plan_eval(planner, run, stages))


def policy_without_cluster(stage: StageSpec) -> tuple[CheckpointPolicy, list[str]]:
    """The stage's activation checkpointing policy where no memory model can choose: its own,
    or `full` (the one that fits wherever any does) for 'auto'."""
    policy = policy_without_memory_model(stage)
    if stage.activation_checkpointing != "auto":
        return policy, []
    return policy, ["activation checkpointing auto: full without a cluster description (no "
                    "memory model to tell whether keeping more fits)"]


def with_rope(run: RunSpec, stages: list[StagePlan],
              base_rope: dict[str, Any] | None) -> list[StagePlan]:
    """The stage plans with each stage's RoPE (RunSpec.stage_rope against the base model's
    rule): what the trainer will set, whatever the layout."""
    return [s.model_copy(update={"rope": run.stage_rope(i, base_rope)})
            for i, s in enumerate(stages)]


def with_attention(run: RunSpec, stages: list[StagePlan]) -> list[StagePlan]:
    """The stage plans with each stage's attention over packed documents and its RoPE
    positions (stages[].attention, stages[].position_ids), recorded as the RunSpec sets them."""
    return [s.model_copy(update={"attention": stage.attention,
                                 "position_ids": stage.position_ids})
            for s, stage in zip(stages, run.stages)]


def plan_from_workers(workers: dict[str, int], run: RunSpec,
                      base_rope: dict[str, Any] | None = None) -> Plan:
    """A Plan for plain Ray nodes without a cluster description: rings filled node by node (in
    sorted node order), no predictions. 'auto' degrees resolve without a memory model
    (specs.degrees.resolve_degrees): the largest ring the workers allow. `base_rope`: as
    plan_run's."""
    if not workers or any(n <= 0 for n in workers.values()):
        raise PlanError(f"workers {workers}: give at least one node with > 0 workers")
    slots = [(node, i) for node in sorted(workers) for i in range(workers[node])]
    total = len(slots)
    stages = []
    for index, stage in enumerate(run.stages):
        try:
            dims, notes = resolve_degrees(stage, total, f"Ray offers {total} workers")
        except DegreeError as e:
            raise PlanError(f"stage {stage.name!r}: {e}") from None
        if stage.ulysses_degree == "auto":
            notes.append("ulysses auto: 1 (ring attention alone) without a cluster description: "
                         "no cost model to weigh all-to-alls against the ring")
        n, d = dims.sequence, dims.dp  # a "ring" lists ring x ulysses workers
        rings = [[Worker(node=node, gpu=g) for node, g in slots[i * n:(i + 1) * n]]
                 for i in range(d)]
        policy, policy_notes = policy_without_cluster(stage)
        stages.append(StagePlan(name=stage.name, seq_len=stage.seq_len,
                                rope_theta=run.stage_theta(index),
                                dims=dims, rings=rings,
                                activation_checkpointing=policy,
                                notes=notes + policy_notes + kv_replication_note(
                                    run.model.num_key_value_heads, dims.ulysses)
                                + ["planned from Ray nodes: rings filled node by node, no "
                                   "cluster description"]))
    return Plan(run=run.name, cluster=None, profile=None,
                stages=with_attention(run, with_rope(run, stages, base_rope)))
