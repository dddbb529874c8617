"""The evaluation section of a plan: which contexts run on one evaluator and which on a gang, in
what ring order, and what evaluating a checkpoint's whole grid costs (cost model, no trace).

Per context length L of the grid (eval.context_lengths, or every stage's seq_len):
- gang size P: 1 up to eval.max_tokens_per_evaluator, else one gang for all the longer
  contexts of a checkpoint: eval.gang_size, or the fewest members that each hold at most
  max_tokens_per_evaluator tokens of the longest (here: the final stage's whole grid);
- ring: P GPUs in the cluster's locality order (a gang of at most a node's GPUs stays inside one
  node; neighbours share a PCIe switch), the ring's hop priced by the same router as training;
- prefill: dense 2 N' L / P FLOPs (N' without the embedding) at the dense rate, causal attention
  forward 2 L^2 (heads x head_dim) x layers / P at the attention rate, and the ring's P - 1 K/V
  hops per layer where they outlast the block they hide behind (as in training's forward);
- decoding, per token: every member reads all the weights once (replicated) and its KV shard
  (memory-bound at HBM bandwidth), and each layer waits for one small all-gather (P - 1 hop
  latencies);
- prompts per checkpoint: tasks x (depths for NIAH tasks) x samples, each prefilled once and
  decoding `ANSWER_TOKENS` tokens.

Dtype: evaluators load checkpoints in `eval_dtype` (bf16 on CUDA when the run computes in bf16,
fp32 on CPU); ray_jobs.eval.model loads with the same function, so these numbers are what runs.

GPUs, per stage (`plan_eval_stages`): evaluating one checkpoint holds eval.gpus for its
evaluator plus eval.gpus per gang member while its long contexts run. When whole nodes without
any of the stage's training workers hold that many, the plan reserves them (named) and the
evaluation runs beside training there; otherwise evaluation waits for the stage boundary and
runs on the GPUs the stage frees. `check_eval_capacity` refuses a plan whose reservation
overlaps training or overflows the cluster.
"""

from __future__ import annotations

import math

from specs.eval_tasks import DEPTH_TASKS
from specs.plan import EvalLengthPlan, EvalPlan, EvalStagePlan, StagePlan, Worker
from specs.run import RunSpec
from topology.cost import evaluate_flows, ring_flows
from topology.graph import split_gpu_vertex
from topology.planner import PlanError, Planner

ANSWER_TOKENS = 32  # generated per prompt in the estimate (RULER allows 30-128)


BESIDE, BOUNDARY = "beside training", "at the stage boundary"


def eval_dtype(compute_dtype: str, device_type: str) -> str:
    """The dtype an evaluator loads a checkpoint in: the run's compute dtype on CUDA (bf16 for
    a mixed-precision run: half the weights and KV cache of fp32, and what the gang's ring
    attention runs on CUDA), float32 on CPU (bf16 matmuls there are slow and imprecise)."""
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    return "bfloat16" if compute_dtype == "bfloat16" and device_type == "cuda" else "float32"


def plan_device_type(run: RunSpec) -> str:
    """The torch device type the run's evaluators get: CUDA when it trains on GPUs and gives
    evaluators GPUs (eval.gpus), else CPU."""
    return "cuda" if run.resources.device == "gpu" and run.eval.gpus > 0 else "cpu"


def eval_lengths(run: RunSpec) -> list[int]:
    """Every context the run's checkpoints are evaluated at (up to the longest stage)."""
    return sorted(set(run.eval.context_lengths or [s.seq_len for s in run.stages]))


def gang_size_for(longest: int, tokens_per_member: int, configured: int = 0) -> int:
    """Members of the gang that evaluates a checkpoint's contexts longer than one evaluator
    holds: `configured` (eval.gang_size) when set, else the fewest that each hold at most
    `tokens_per_member` tokens of the longest context. One gang runs all of them (the rule of
    ray_jobs.eval.pipeline.evaluate_request)."""
    if tokens_per_member <= 0:
        raise ValueError(f"tokens_per_member must be positive, got {tokens_per_member}")
    return configured or max(1, math.ceil(longest / tokens_per_member))


def kv_bytes_per_token(run: RunSpec) -> float:
    m = run.model
    return 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * _elem(run)


def tokens_per_device(run: RunSpec, device_bytes: float, reserve_bytes: float) -> int:
    """Context tokens one evaluator device holds: its memory less the reserve and the weights
    (replicated in every member, compute dtype), over the KV cache per token plus the prefill's
    live activations per token (one decoder layer at a time: its input and residual, q/k/v,
    attention output, the MLP's gate, up and product; logits of the last position only)."""
    m, eb = run.model, _elem(run)
    weights = m.num_parameters * eb
    work = (4 * m.hidden_size + 3 * m.intermediate_size
            + (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim) * eb
    free = device_bytes - reserve_bytes - weights
    return max(0, int(free // (kv_bytes_per_token(run) + work)))


def _elem(run: RunSpec) -> int:
    """Bytes per weight and KV element as the evaluator loads them (`eval_dtype`)."""
    return 2 if eval_dtype(run.compute_dtype, plan_device_type(run)) == "bfloat16" else 4


def stage_eval_lengths(run: RunSpec, index: int) -> list[int]:
    """The contexts a checkpoint of stage `index` is evaluated at: eval.context_lengths, or that
    stage's seq_len and the shorter stages' (ray_jobs.eval.runner.plan_lengths)."""
    if run.eval.context_lengths:
        return sorted(set(run.eval.context_lengths))
    return sorted({s.seq_len for s in run.stages[: index + 1]})


def checkpoint_gpus(run: RunSpec, index: int) -> float:
    """GPUs evaluating one checkpoint of stage `index` holds at its peak: the evaluator's
    eval.gpus, plus eval.gpus per member of the gang its longer contexts start beside it."""
    e = run.eval
    long = [n for n in stage_eval_lengths(run, index) if n > e.max_tokens_per_evaluator]
    members = gang_size_for(max(long), e.max_tokens_per_evaluator, e.gang_size) if long else 0
    return e.gpus * (1 + members)


def gpus_per_node(planner: Planner) -> dict[str, int]:
    """GPUs per node, nodes in the cluster's locality order (closest first, so the nodes
    reserved for a gang are neighbours)."""
    per_node: dict[str, int] = {}
    for vertex in planner.locality_order():
        node, _ = split_gpu_vertex(vertex)
        per_node[node] = per_node.get(node, 0) + 1
    return per_node


def plan_eval_stages(planner: Planner, run: RunSpec, stages: list[StagePlan]
                     ) -> list[EvalStagePlan]:
    """Per stage, where its checkpoints are evaluated (see the module docstring): on named
    nodes that hold none of the stage's training workers, or after the stage."""
    per_node = gpus_per_node(planner)
    total = sum(per_node.values())
    rows = []
    for index, stage in enumerate(stages):
        need, short = checkpoint_gpus(run, index), ""
        if need > total:  # its gang cannot start here (GangUnplaceable): the evaluator alone runs
            short = (f"; a gang for its longer contexts ({need:g} GPUs with the evaluator) does "
                     f"not fit the cluster's {total}, so they are not evaluated here")
            need = run.eval.gpus
        training = {w.node for w in stage.workers}
        nodes, held = [], 0
        for node, count in per_node.items():
            if held >= need:
                break
            if node not in training:
                nodes.append(node)
                held += count
        world = len(stage.workers)
        if need == 0:
            rows.append(EvalStagePlan(stage=stage.name, gpus=0, when=BESIDE, nodes=[],
                                      note="evaluation on CPUs (eval.gpus is 0)"))
        elif held >= need:
            rows.append(EvalStagePlan(
                stage=stage.name, gpus=need, when=BESIDE, nodes=nodes,
                note=f"{need:g} GPUs on {len(nodes)} node(s) training does not use "
                     f"({world} of the {total} GPUs train){short}"))
        else:
            free = sum(c for n, c in per_node.items() if n not in training)
            rows.append(EvalStagePlan(
                stage=stage.name, gpus=need, when=BOUNDARY, nodes=[],
                note=f"training uses {world} of the {total} GPUs and nodes without training "
                     f"workers hold {free}, fewer than the {need:g} one checkpoint's evaluation "
                     "needs: its checkpoints are evaluated after the stage, on the GPUs it frees, "
                     f"before the next stage starts{short}"))
    return rows


def check_eval_capacity(stages: list[StagePlan], evals: list[EvalStagePlan],
                        gpus_per_node: dict[str, int]) -> None:
    """PlanError unless each stage's evaluation fits beside its training: reserved nodes hold no
    training worker and have the GPUs, and training plus evaluation fit the cluster."""
    total = sum(gpus_per_node.values())
    for stage, ev in zip(stages, evals, strict=True):
        world = len(stage.workers)
        if ev.when != BESIDE or ev.gpus == 0:
            if ev.gpus > total:
                raise PlanError(f"eval ({stage.name}): one checkpoint's evaluation needs "
                                f"{ev.gpus:g} GPUs and the cluster has {total}; lower "
                                "eval.gang_size or raise eval.max_tokens_per_evaluator")
            continue
        shared = sorted({w.node for w in stage.workers} & set(ev.nodes))
        if shared:
            raise PlanError(f"eval ({stage.name}): evaluation nodes {shared} also hold training "
                            "workers of the stage; evaluate at the stage boundary instead")
        unknown = [n for n in ev.nodes if n not in gpus_per_node]
        if unknown:
            raise PlanError(f"eval ({stage.name}): evaluation nodes {unknown} are not in the "
                            "cluster")
        held = sum(gpus_per_node[n] for n in ev.nodes)
        if held < ev.gpus or world + ev.gpus > total:
            raise PlanError(f"eval ({stage.name}): training's {world} GPUs plus evaluation's "
                            f"{ev.gpus:g} on {held} reserved do not fit the cluster's {total}; "
                            "evaluate at the stage boundary (lower the stage's degrees to "
                            "evaluate beside it)")


def plan_eval(planner: Planner, run: RunSpec, stages: list[StagePlan] | None = None
              ) -> EvalPlan:
    """The evaluation section of the plan (see the module docstring); with the training
    `stages`, where each stage's checkpoints are evaluated, checked (check_eval_capacity)."""
    plan = _plan_lengths(planner, run)
    if not stages or not run.eval.enabled or not plan.lengths:
        return plan  # nothing is evaluated on GPUs, so nothing is reserved
    evals = plan_eval_stages(planner, run, stages)
    check_eval_capacity(stages, evals, gpus_per_node(planner))
    return plan.model_copy(update={"stages": evals})


def _plan_lengths(planner: Planner, run: RunSpec) -> EvalPlan:
    p, m, e = planner.profile, run.model, run.eval
    capacity = tokens_per_device(run, p.hbm_bytes, p.memory_reserve_bytes)
    order = planner.locality_order()
    dense_rate = p.peak_bf16_flops * p.mfu_dense
    attn_rate = p.peak_bf16_flops * p.mfu_attention
    dense_params = m.num_parameters - 2 * m.vocab_size * m.hidden_size
    prompts = sum(len(e.depths) if t in DEPTH_TASKS else 1 for t in e.tasks) * e.samples
    if e.kamradt is not None:  # Kamradt's test on its own depth grid
        prompts += e.kamradt.depth_intervals * e.samples
    notes: list[str] = []
    if capacity == 0:
        notes.append(f"the model's weights ({m.num_parameters * _elem(run) / 1e9:.0f} GB) do not "
                     f"fit one {p.gpu_model}: gang members hold the whole model, so this run's "
                     "checkpoints need weight-sharded (tensor-parallel) evaluation, which "
                     "ringpilot does not build; no length is evaluable")
        return EvalPlan(tokens_per_device=0, dtype=eval_dtype(run.compute_dtype,
                                                              plan_device_type(run)),
                        max_tokens_per_evaluator=e.max_tokens_per_evaluator,
                        gpus_per_member=e.gpus, answer_tokens=ANSWER_TOKENS, lengths=[],
                        checkpoint_hours=0.0, notes=notes)
    if e.max_tokens_per_evaluator > capacity:
        notes.append(f"eval.max_tokens_per_evaluator {e.max_tokens_per_evaluator:,} is more than "
                     f"one {p.gpu_model} holds for this model ({capacity:,} tokens): lower it")
    rows = []
    lengths = eval_lengths(run)
    gang = gang_size_for(lengths[-1], e.max_tokens_per_evaluator, e.gang_size)
    for length in lengths:
        size = 1 if length <= e.max_tokens_per_evaluator else gang
        if size > len(order):
            notes.append(f"{length:,} tokens need a gang of {size} and the cluster has "
                         f"{len(order)} GPUs: not evaluable here")
            continue
        ring = order[:size]
        per = math.ceil(length / size)
        block = 2 * per * m.num_key_value_heads * m.head_dim * _elem(run)
        hop = evaluate_flows(planner.router, ring_flows([ring]), block)
        dense = 2 * dense_params * length / size / dense_rate
        attn_layer = 2 * length ** 2 * m.num_attention_heads * m.head_dim / size / attn_rate
        step = attn_layer / max(size, 1)  # one ring step's block (zigzag: equal shares)
        hops = (size - 1) * max(0.0, hop.seconds - step) if size > 1 else 0.0
        prefill = dense + m.num_hidden_layers * (attn_layer + hops)
        hbm = p.hbm_bandwidth_gb_s * 1e9
        decode = ((m.num_parameters * _elem(run) + per * kv_bytes_per_token(run)) / hbm
                  + m.num_hidden_layers * (size - 1) * hop.latency_s)
        seconds = prompts * (prefill + ANSWER_TOKENS * decode)
        rows.append(EvalLengthPlan(
            length=length, gang_size=size,
            engine="one evaluator" if size == 1 else f"evaluation gang of {size}",
            ring=[Worker(node=n, gpu=g) for n, g in map(split_gpu_vertex, ring)],
            tokens_per_member=per, prefill_seconds=prefill, decode_ms_per_token=decode * 1e3,
            prompts=prompts, checkpoint_hours=seconds / 3600))
    return EvalPlan(tokens_per_device=capacity,
                    dtype=eval_dtype(run.compute_dtype, plan_device_type(run)),
                    max_tokens_per_evaluator=e.max_tokens_per_evaluator,
                    gpus_per_member=e.gpus,
                    answer_tokens=ANSWER_TOKENS, lengths=rows,
                    checkpoint_hours=sum(r.checkpoint_hours for r in rows), notes=notes)


def eval_gpus_beside(plan: EvalPlan | None, stages: list[str]) -> float:
    """GPUs Ray must have beyond training's for `stages` (the driver's capacity check): the
    most any of them evaluates beside training; a stage evaluated at its boundary uses the GPUs
    its training frees, so it adds none."""
    if plan is None:
        return 0.0
    return max((s.gpus for s in plan.stages if s.stage in stages and s.when == BESIDE),
               default=0.0)

