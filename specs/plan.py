"""Plan: what the planner decided per stage (rings, order, predictions): plan.json."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from specs.degrees import (
    MAX_GPUS,
    MAX_SEQ_LEN,
    AttentionMasking,
    CheckpointPolicy,
    ParallelDims,
    PositionIds,
)

DEGREE_KEYS = ("ring_degree", "dp_degree", "shard_degree", "ulysses_degree")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Worker(_Spec):
    """A training worker: one GPU (or CPU process) on one node."""

    node: str = Field(description="Node name (ClusterSpec node, Kubernetes node or Ray node id).")
    gpu: int = Field(ge=0, lt=MAX_GPUS, description="Local GPU index on the node (CUDA order), "
                     "or worker index on the node for CPU workers; below 2**17, the GPU ceiling.")


class LinkLoad(_Spec):
    """A directed link and how the plan loads it."""

    link: str = Field(description="'A -> B' (graph vertices).")
    flows: int = Field(description="Concurrent ring transfers crossing it.")
    bandwidth_gb_s: float = Field(description="Link bandwidth per direction, GB/s.")
    share_gb_s: float = Field(description="Bandwidth each transfer gets (fair share), GB/s.")


class Prediction(_Spec):
    """Predicted cost of one optimizer step of a stage on the cost model."""

    step_seconds: float = Field(description="One optimizer step.")
    tokens_per_second: float = Field(description="Training tokens per second, whole cluster.")
    wall_minutes: float = Field(description="All steps of the stage.")
    parts_seconds: dict[str, float] = Field(description="Step time by part (sums to "
                                            "step_seconds).")
    ring_hop_seconds: float = Field(description="Slowest K/V block transfer between ring "
                                    "neighbours, under contention.")
    ring_hop_gb_s: float = Field(description="Bandwidth of that transfer.")
    ring_hop_bound_seconds: float | None = Field(None, description="Lower bound no placement "
                                                 "beats for that transfer (the planner's "
                                                 "ring_lower_bound); null for rings of one GPU.")
    ring_hop_gap: float | None = Field(None, description="ring_hop_seconds over the bound: 1.0 "
                                       "at the bound; null for rings of one GPU.")
    ring_headroom: float | None = Field(description="Attention block compute / slowest hop "
                                        "time (worst phase): above 1 the K/V exchange is "
                                        "hidden and the ring's links could be this many times "
                                        "slower before it shows; below 1 it is exposed. Null "
                                        "for rings of one GPU.")
    dp_hop_seconds: float = Field(description="Slowest data-parallel all-reduce hop (for one "
                                  "K/V block's bytes, for comparison).")
    mfu: float = Field(description="Model FLOPs utilisation implied (6N + attention FLOPs / "
                       "peak).")
    model_flops_per_step: float = Field(description="Model FLOPs of one optimizer step (6N per "
                                        "token plus causal attention, no recompute).")
    memory_gb: dict[str, float] = Field(description="Memory per GPU by part, GB.")
    lifecycle_gb: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Peak memory of each phase of the stage's life "
        "(load, resume, step, save, export): GB per GPU ('device', reserve included) and per "
        "rank's host process ('host'); empty in plans made before it was modelled.")


class Alternative(_Spec):
    """Another ordering evaluated on the same cost model, for comparison."""

    name: str = Field(description="'ray-default', 'random' or 'lower-bound'.")
    ring_hop_seconds: float = Field(description="Slowest ring hop under contention.")
    step_seconds: float = Field(description="Optimizer step.")
    wall_minutes: float = Field(description="All steps of the stage.")


class CheckpointOption(_Spec):
    """One activation checkpointing policy priced on a stage's planned layout."""

    policy: CheckpointPolicy = Field(description="'full', 'attention' or 'none'.")
    step_seconds: float = Field(description="Predicted optimizer step under this policy (the "
                                "same rings and degrees).")
    peak_gb: float = Field(description="Predicted memory per GPU at the step's peak, reserve "
                           "included, GB.")
    fits: bool = Field(description="Whether peak_gb fits the GPU's memory.")


class AttentionOption(_Spec):
    """One attention masking priced on a stage's planned layout and checkpointing policy."""

    attention: AttentionMasking = Field(
        description="'causal': every earlier token of the packed sequence; 'document': only "
        "the earlier tokens of the token's own document.")
    chosen: bool = Field(description="Whether the stage trains with it: the stage's prediction "
                         "is this option's.")
    step_seconds: float = Field(description="Predicted optimizer step (same rings, degrees and "
                                "policy).")
    attention_seconds: float = Field(description="Attention compute per optimizer step: the "
                                     "busiest ring rank's under 'document'.")
    exposed_ring_seconds: float = Field(description="Ring K/V transfer time per optimizer step "
                                        "not hidden behind attention compute.")
    work: float = Field(description="Allowed (query, key) pairs over the causal ones: 1 for "
                        "'causal', the sum over documents of len (len + 1) / 2 over "
                        "seq_len (seq_len + 1) / 2 for 'document' (sampled mean).")
    imbalance: float = Field(description="The busiest ring rank's work over the mean rank's (1 "
                             "for 'causal', which zigzag balances).")
    skipped_blocks: float = Field(description="Share of ring blocks in which no query sees any "
                                  "key: skipped, their K/V still passed on (0 for 'causal').")


class StagePlan(_Spec):
    """Placement and prediction for one stage."""

    name: str = Field(description="Stage name from the RunSpec.")
    seq_len: int = Field(gt=0, le=MAX_SEQ_LEN, description="Tokens per sequence (at most 2**24).")
    rope_theta: float = Field(description="RoPE base for the stage.")
    dims: ParallelDims = Field(description="The stage's parallel layout. plan.json spells it "
                               "ring_degree (GPUs per ring), dp_degree (data-parallel rings), "
                               "shard_degree (GPUs sharding the model state, FSDP2; null: a "
                               "sequence's GPUs) and ulysses_degree (GPUs per ring position "
                               "splitting the heads; each ring lists ring_degree x "
                               "ulysses_degree workers, one ring position's Ulysses group "
                               "after another).")
    rings: list[list[Worker]] = Field(description="Per ring, its workers in ring order (rank 0 "
                                      "first; each sends K/V to the next, the last to the first).")
    bottleneck_links: list[LinkLoad] = Field(default_factory=list, description="Most contended "
                                             "links, worst first.")
    prediction: Prediction | None = Field(None, description="Cost-model prediction (null when "
                                          "planned without a cluster description).")
    alternatives: list[Alternative] = Field(default_factory=list, description="Baselines and "
                                            "bound on the same cost model.")
    activation_checkpointing: CheckpointPolicy = Field(
        "full", description="The activation checkpointing policy the trainer applies (the "
        "stage's, or the planner's choice for 'auto').")
    checkpointing_options: list[CheckpointOption] = Field(
        default_factory=list, description="Every policy priced on the planned layout, in "
        "specs.degrees.CHECKPOINT_POLICIES order: what 'auto' chose from (empty when planned "
        "without a cluster description).")
    attention_options: list[AttentionOption] = Field(
        default_factory=list, description="'causal' and 'document' attention priced on the "
        "planned layout (empty without a document-length histogram, data.document_lengths or "
        "the prepared corpus's, or without a cluster description).")
    notes: list[str] = Field(default_factory=list, description="Choices made and why.")
    attention: AttentionMasking = Field(
        "causal", description="What a token attends to, as the RunSpec's stages[].attention: "
        "'causal' (across the packed documents) or 'document' (its own document only). Plans "
        "made before the choice existed read 'causal', what they trained with.")
    position_ids: PositionIds = Field(
        "continuous", description="RoPE positions, as the RunSpec's stages[].position_ids: "
        "'continuous' or 'per_document' (from 0 at each document).")
    rope: dict[str, Any] = Field(default_factory=dict, description="transformers' "
                                 "rope_parameters of the stage as its RunSpec resolves them (a "
                                 "base model with its own rule, e.g. Llama 3.1's llama3, keeps "
                                 "it in stages without a rope block: the trainer's state and "
                                 "summary show it).")

    @model_validator(mode="before")
    @classmethod
    def _dims_from_degrees(cls, data: Any) -> Any:
        """plan.json keeps the user-facing degree keys (older plans load unchanged)."""
        if not isinstance(data, dict) or "dims" in data:
            return data
        data = dict(data)
        degrees = {k: data.pop(k) for k in DEGREE_KEYS if k in data}
        missing = [k for k in ("ring_degree", "dp_degree") if k not in degrees]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing: a stage plan gives ring_degree and "
                             "dp_degree (shard_degree and ulysses_degree are optional)")
        data["dims"] = ParallelDims.from_degree_keys(degrees)
        return data

    @model_serializer(mode="wrap")
    def _degrees_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in handler(self).items():
            out.update(self.dims.degree_keys() if key == "dims" else {key: value})
        return out

    @cached_property
    def _positions(self) -> dict[tuple[str, int], tuple[int, int]]:
        return {(w.node, w.gpu): (i, k) for i, ring in enumerate(self.rings)
                for k, w in enumerate(ring)}

    def ring_position(self, node: str, local_gpu: int) -> tuple[int, int]:
        """(ring index, rank in the ring) of the worker on `node` using GPU `local_gpu`."""
        try:
            return self._positions[(node, local_gpu)]
        except KeyError:
            nodes = sorted({w.node for r in self.rings for w in r})
            raise KeyError(f"stage {self.name!r}: no worker (node={node!r}, gpu={local_gpu}) in "
                           f"the plan; planned nodes: {nodes[:6]}{'...' if len(nodes) > 6 else ''}"
                           ) from None

    @property
    def workers(self) -> list[Worker]:
        return [w for r in self.rings for w in r]


class EvalLengthPlan(_Spec):
    """How one context length of the evaluation grid runs, and its predicted cost."""

    length: int = Field(description="Context length in tokens.")
    gang_size: int = Field(ge=1, description="Evaluators that split it (1: one evaluator).")
    engine: str = Field(description="'one evaluator' or 'evaluation gang of P'.")
    ring: list[Worker] = Field(default_factory=list, description="The gang's GPUs in ring "
                               "order (the cluster's locality order; one GPU for one evaluator).")
    tokens_per_member: int = Field(description="Context tokens (and KV cache) per member.")
    prefill_seconds: float = Field(description="Prefill of one prompt (cost model).")
    decode_ms_per_token: float = Field(description="One decoded token (cost model).")
    prompts: int = Field(description="Prompts per checkpoint at this length.")
    checkpoint_hours: float = Field(description="All prompts of this length for one "
                                    "checkpoint, on one gang (cost model).")


class EvalStagePlan(_Spec):
    """Where and when the checkpoints of one stage are evaluated (topology.eval_plan)."""

    stage: str = Field(description="Stage name.")
    gpus: float = Field(ge=0, description="GPUs one checkpoint's evaluation holds at its peak: "
                        "the evaluator plus its gang's members (eval.gpus each).")
    when: Literal["beside training", "at the stage boundary"] = Field(
        description="'beside training': on `nodes` while the stage trains; 'at the stage "
                    "boundary': after the stage, on the GPUs it frees, before the next starts.")
    nodes: list[str] = Field(default_factory=list, description="Nodes reserved for evaluation "
                             "(none holds a training worker of the stage); empty at the "
                             "boundary.")
    note: str = Field("", description="Why.")


class EvalPlan(_Spec):
    """The evaluation gangs of a run (topology.eval_plan): sizes, rings, predicted cost."""

    tokens_per_device: int = Field(description="Context tokens one evaluator GPU holds for "
                                   "this model (memory model: weights, KV cache, prefill "
                                   "activations, reserve).")
    dtype: Literal["bfloat16", "float32"] = Field(
        "float32", description="What evaluators load the checkpoints in (eval_dtype); the "
        "memory and decoding numbers use its element size.")
    max_tokens_per_evaluator: int = Field(description="eval.max_tokens_per_evaluator.")
    gpus_per_member: float = Field(description="GPUs each evaluator or gang member takes "
                                   "(eval.gpus; never the training workers').")
    answer_tokens: int = Field(description="Tokens decoded per prompt in the estimate.")
    lengths: list[EvalLengthPlan] = Field(description="Per context length, shortest first.")
    checkpoint_hours: float = Field(description="One checkpoint's whole grid on one evaluator "
                                    "or gang at a time (cost model).")
    stages: list[EvalStagePlan] = Field(default_factory=list, description="Per training stage, "
                                        "where its checkpoints are evaluated and the GPUs held.")
    notes: list[str] = Field(default_factory=list, description="Problems and choices.")

    def stage(self, name: str) -> EvalStagePlan | None:
        return next((s for s in self.stages if s.stage == name), None)


class Plan(_Spec):
    """The planner's decisions for every stage of a run."""

    run: str = Field(description="RunSpec name.")
    cluster: str | None = Field(description="ClusterSpec name (null: planned from Ray's nodes).")
    profile: str | None = Field(description="Hardware profile of the predictions.")
    stages: list[StagePlan] = Field(description="One per RunSpec stage, in order.")
    unknown_topology: list[str] = Field(default_factory=list, description="Nodes left out "
                                        "because their network position is unknown.")
    excluded: list[str] = Field(default_factory=list, description="Nodes removed (what-if), "
                                "and what `ringpilot plan --exclude` left out: nodes, GPUs, "
                                "devices, links.")
    assumptions: list[str] = Field(default_factory=list, description="Cost-model assumptions "
                                   "behind the predictions.")
    eval: EvalPlan | None = Field(None, description="Evaluation gangs and their predicted "
                                  "cost (null without a cluster description).")

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in the plan; stages: {[s.name for s in self.stages]}")

    def ring_position(self, stage: str, node: str, local_gpu: int) -> tuple[int, int]:
        return self.stage(stage).ring_position(node, local_gpu)
