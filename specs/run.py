"""RunSpec: the one document that describes a staged long-context training run.

The same YAML is the `--run` file of `python -m ray_jobs.train` and the `spec` of a Kubernetes
`StagedTraining` object, so every field here is reference documentation (its `description`).
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specs.degrees import (
    MAX_BATCH,
    MAX_GPUS,
    MAX_SEQ_LEN,
    MAX_STEPS,
    AttentionMasking,
    CheckpointPolicy,
    DegreeError,
    ParallelDims,
    PositionIds,
    degree_options,
    divisors,
    shard_problem,
    ulysses_of,
    ulysses_problems,
    zigzag_problem,
)
from specs.eval_tasks import KAMRADT_TASK, EvalTask

Auto = Literal["auto"]


class _Spec(BaseModel):
    # allow_inf_nan=False: an `inf` or `nan` is refused as "should be a finite number", never
    # carried into a division or a loop bound.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Ceilings of the model's shape: far above every Llama-family model (Llama-3 405B has 126 layers,
# 128 heads, width 16,384, MLP 53,248, vocabulary 128,256), finite so that the parameter count and
# the divisor searches stay small numbers.
MAX_HEADS = 1 << 14
MAX_LAYERS = 1 << 14
MAX_HIDDEN = 1 << 20
MAX_VOCAB = 1 << 24
MAX_THETA = 1e18  # RoPE base: Llama-3 uses 5e5, its 1M-token stage 3.6e9 (kustomize writes
# whole numbers past int64 as 1e+19, which YAML 1.1 readers take for text: kept below)
MAX_PATH = 4096   # characters of a path (Linux PATH_MAX)
MAX_TEXT = 1 << 16  # characters of a free-text field (a needle, a question)
MAX_LIST = 1 << 12  # entries of a list of files, tasks, lengths or depths


def rope_theta_for(seq_len: int, theta0: float, pretrain_seq_len: int) -> float:
    """RoPE base for a context of `seq_len` tokens by the RoPE scaling-law rule.

    theta(T) = theta0 ** (ln(T / 2 pi) / ln(T0 / 2 pi)): the base whose longest wavelength covers
    T tokens as theta0's covered T0. For Llama-3 (theta0 = 500,000, T0 = 8,192) it gives
    283,461,213 at 262,144 tokens and 3,580,165,449 at 1,048,576, as in the published configs.

    >>> round(rope_theta_for(262_144, 500_000.0, 8_192))
    283461213
    """
    if seq_len <= pretrain_seq_len:
        return theta0
    exponent = math.log(seq_len / (2 * math.pi)) / math.log(pretrain_seq_len / (2 * math.pi))
    return theta0**exponent


RopeMethod = Literal["theta", "linear", "dynamic", "yarn", "llama3", "longrope"]
# transformers' rope_type of each method ("theta" is plain RoPE with a new base)
ROPE_TYPES: dict[str, str] = {"theta": "default", "linear": "linear", "dynamic": "dynamic",
                              "yarn": "yarn", "llama3": "llama3", "longrope": "longrope"}
METHOD_OF_TYPE = {t: m for m, t in ROPE_TYPES.items()}
MAX_ROPE_FACTOR = 1 << 16  # 64K x a context: far beyond any extension


class RopeSpec(_Spec):
    """How a stage extends RoPE: a method and its parameters ('auto' ones from the stage's length
    and the model's pretraining length). Each becomes transformers' `rope_parameters` for the
    stage's model, written into every checkpoint's config.json, so every later reader (next
    stage, evaluators, lm-eval, exports, vLLM) computes the same positions."""

    method: RopeMethod = Field(
        "theta", description="'theta': plain RoPE with a larger base (the scaling-law rule); "
        "'linear': position interpolation (positions divided by factor); 'dynamic': dynamic NTK "
        "(the base grows with the sequence's length; in training, fixed at the stage's seq_len); "
        "'yarn': YaRN (NTK-by-parts and an attention temperature); 'llama3': Llama 3.1's "
        "frequency rule; 'longrope': LongRoPE's per-dimension factors (give short_factor and "
        "long_factor: they come from a search, never 'auto').")
    theta: Annotated[float, Field(gt=0, le=MAX_THETA)] | Auto = Field(
        "auto", description="RoPE base. 'theta' method: 'auto' is the scaling-law rule from "
        "model.rope_theta and pretrain_seq_len; the other methods scale this base, 'auto' being "
        "the base model's. At most 1e18.")
    factor: Annotated[float, Field(ge=1, le=MAX_ROPE_FACTOR)] | Auto = Field(
        "auto", description="Context extension factor (linear, dynamic, yarn, llama3, longrope). "
        "'auto': seq_len / original_max_position_embeddings, at least 1; for 'dynamic', 1 "
        "(transformers grows its base by (factor x length / original - factor + 1) ** (d / "
        "(d - 2)): factor 1 makes that the length's own ratio).")
    original_max_position_embeddings: Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)] | Auto = Field(
        "auto", description="The context the frequencies were pretrained for. 'auto': "
        "model.pretrain_seq_len.")
    beta_fast: float | None = Field(None, gt=0, le=1e4, description="YaRN: rotations above which "
                                    "a dimension is not interpolated; null: transformers' 32.")
    beta_slow: float | None = Field(None, gt=0, le=1e4, description="YaRN: rotations below which "
                                    "a dimension is fully interpolated; null: transformers' 1.")
    attention_factor: float | None = Field(
        None, gt=0, le=100, description="YaRN and LongRoPE: the scale of cos/sin (attention "
        "temperature); null: the paper's rule (YaRN: 0.1 ln(factor) + 1).")
    low_freq_factor: float = Field(1.0, gt=0, le=1e4, description="llama3: wavelengths above "
                                   "original / low_freq_factor are divided by factor (Llama 3.1: "
                                   "1).")
    high_freq_factor: float = Field(4.0, gt=0, le=1e4, description="llama3: wavelengths below "
                                    "original / high_freq_factor are kept (Llama 3.1: 4).")
    short_factor: list[Annotated[float, Field(gt=0, le=MAX_ROPE_FACTOR)]] | None = Field(
        None, max_length=MAX_HEADS, description="longrope: per-frequency factors (head_dim / 2 of "
        "them) within the original context.")
    long_factor: list[Annotated[float, Field(gt=0, le=MAX_ROPE_FACTOR)]] | None = Field(
        None, max_length=MAX_HEADS, description="longrope: per-frequency factors beyond it.")

    @model_validator(mode="after")
    def _method_fields(self) -> RopeSpec:
        given = self.model_fields_set
        allowed = {"method", "theta"} | {
            "theta": set(), "linear": {"factor", "original_max_position_embeddings"},
            "dynamic": {"factor", "original_max_position_embeddings"},
            "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                     "attention_factor"},
            "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor",
                       "high_freq_factor"},
            "longrope": {"factor", "original_max_position_embeddings", "attention_factor",
                         "short_factor", "long_factor"}}[self.method]
        if extra := sorted(given - allowed):
            raise ValueError(f"rope method {self.method!r} takes no {', '.join(extra)}; remove "
                             f"it, or choose the method it belongs to")
        if self.method == "yarn" and (self.beta_fast or 32) <= (self.beta_slow or 1):
            raise ValueError(f"rope.beta_fast ({self.beta_fast or 32}) must exceed rope.beta_slow "
                             f"({self.beta_slow or 1}); YaRN interpolates between the two")
        if self.method == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope.high_freq_factor ({self.high_freq_factor}) must exceed "
                             f"rope.low_freq_factor ({self.low_freq_factor}); Llama 3.1 uses 4 "
                             "and 1")
        if self.method == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise ValueError("rope method 'longrope' needs short_factor and long_factor (head_dim "
                             "/ 2 numbers each, from a LongRoPE search or the checkpoint's "
                             "config.json); there is no 'auto' for them")
        return self


def rope_parameters(rope: RopeSpec, *, seq_len: int, theta0: float, pretrain_seq_len: int,
                    head_dim: int) -> dict[str, Any]:
    """transformers' `rope_parameters` of a stage's RopeSpec, 'auto' values resolved."""
    original = (pretrain_seq_len if rope.original_max_position_embeddings == "auto"
                else rope.original_max_position_embeddings)
    if rope.method == "theta":
        theta = (rope_theta_for(seq_len, theta0, original) if rope.theta == "auto"
                 else float(rope.theta))
        return {"rope_type": "default", "rope_theta": theta}
    theta = theta0 if rope.theta == "auto" else float(rope.theta)
    if rope.factor != "auto":
        factor = float(rope.factor)
    else:
        factor = 1.0 if rope.method == "dynamic" else max(1.0, seq_len / original)
    params: dict[str, Any] = {"rope_type": ROPE_TYPES[rope.method], "rope_theta": theta,
                              "factor": factor}
    if rope.method in ("yarn", "llama3", "longrope"):
        params["original_max_position_embeddings"] = original
    if rope.method == "yarn":
        params.update({k: v for k, v in (("beta_fast", rope.beta_fast),
                                         ("beta_slow", rope.beta_slow),
                                         ("attention_factor", rope.attention_factor))
                       if v is not None})
    elif rope.method == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    elif rope.method == "longrope":
        for name in ("short_factor", "long_factor"):
            values = getattr(rope, name)
            if len(values) != head_dim // 2:
                raise ValueError(f"rope.{name} has {len(values)} numbers; the model's head_dim "
                                 f"{head_dim} needs {head_dim // 2}, one per frequency")
            params[name] = list(values)
        if rope.attention_factor is not None:
            params["attention_factor"] = rope.attention_factor
    return params


def describe_rope(params: dict[str, Any]) -> str:
    """A stage's RoPE in a few characters, for tables: 'theta 283,461,213', 'yarn x8'."""
    kind = params.get("rope_type", "default")
    if kind == "default":
        return f"theta {params['rope_theta']:,.0f}"
    return f"{METHOD_OF_TYPE.get(kind, kind)} x{params.get('factor', 1):g}"


def describe_attention(attention: str, position_ids: str) -> str:
    """A stage's attention over packed documents in a few words, for tables and logs:
    'causal', 'document', 'document, positions per document'."""
    if position_ids == "per_document":
        return f"{attention}, positions per document"
    return attention


# The architectures ring attention, the exact-RoPE patch, parallelize() and the memory model
# cover: causal LMs whose attention goes through transformers' attention interface and whose
# positions are RoPE (ray_jobs/ring_attention/families.py maps each to its transformers classes).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
Architecture = Literal["llama", "mistral", "qwen2", "qwen3"]
FAMILY_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


class ModelSpec(_Spec):
    """The model to extend: its architecture (always), and where its weights come from."""

    path: str | None = Field(
        None, max_length=MAX_PATH,
        description="Local directory of a Hugging Face checkpoint (config.json, weights, "
        "tokenizer) of one of the architectures below; its config.json's model_type must be "
        "`architecture`. Null: build a randomly initialised model from the fields below (the "
        "tiny default). Never fetched from a hub.",
    )
    architecture: Architecture = Field(
        "llama", description="The model family, as transformers' model_type: 'llama' (Llama 2 "
        "and 3.x), 'mistral', 'qwen2' (Qwen2 and Qwen2.5), 'qwen3'. Other families are refused: "
        "ring attention needs attention that goes through transformers' attention interface and "
        "RoPE positions.",
    )
    vocab_size: int = Field(gt=0, le=MAX_VOCAB, description="Vocabulary size "
                            "(config.json vocab_size); at most 2**24: Llama-3's is 128,256.")
    hidden_size: int = Field(gt=0, le=MAX_HIDDEN, description="Model width "
                             "(config.json hidden_size); at most 2**20: Llama-3 405B's is 16,384.")
    intermediate_size: int = Field(gt=0, le=MAX_HIDDEN * 4, description="MLP width "
                                   "(config.json intermediate_size); at most 2**22 (4 x the width "
                                   "ceiling).")
    num_hidden_layers: int = Field(gt=0, le=MAX_LAYERS, description="Decoder layers; at most "
                                   "2**14: no Llama-family model has more than 126.")
    num_attention_heads: int = Field(gt=0, le=MAX_HEADS, description="Query heads; at most 2**14: "
                                     "no Llama-family model has more than 128.")
    num_key_value_heads: int = Field(
        gt=0, le=MAX_HEADS, description="Key/value heads (grouped-query attention); divides "
        "num_attention_heads; at most 2**14, as the query heads."
    )
    head_dim: int | None = Field(
        None, gt=0, le=MAX_HIDDEN, description="Width of one attention head (config.json "
        "head_dim). Null: hidden_size / num_attention_heads (then filled in). Qwen3 sets it "
        "(Qwen3-0.6B: 128 with hidden 1024 and 16 heads).",
    )
    attention_bias: bool | None = Field(
        None, description="Biases on the attention projections (config.json attention_bias): "
        "on q/k/v for qwen2 (transformers hard-codes them: must be true), on q/k/v/o for llama "
        "and qwen3 when true; mistral has none (must be false). Null: the architecture's own "
        "(true for qwen2, false for the others; then filled in).",
    )
    tie_word_embeddings: bool = Field(
        False, description="lm_head shares the input embedding's weight (config.json "
        "tie_word_embeddings; small Qwen models do): one vocab x hidden matrix instead of two.",
    )
    sliding_window: int | None = Field(
        None, gt=0, le=MAX_SEQ_LEN, description="Sliding-window attention width (config.json "
        "sliding_window; mistral, and qwen2/qwen3 with use_sliding_window). Ring attention has "
        "no sliding window, so it must be null or at least the longest stage's seq_len (then "
        "it masks nothing). llama has none (must be null).",
    )
    rope_theta: float = Field(gt=0, le=MAX_THETA, description="RoPE base of the model before "
                              "extension (theta0); at most 1e18 (Llama-3 uses 500,000).")
    pretrain_seq_len: int = Field(
        gt=0, le=MAX_SEQ_LEN, description="Context length the model was pretrained at (T0 of the "
        "theta rule); at most 2**24, the sequence ceiling."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Storage dtype of the weights: FSDP2's sharded master copy, their "
        "gradients and AdamW's state (16 bytes per parameter in float32, sharded). Layers compute "
        "in training.mixed_precision (bf16 on GPUs by default). bfloat16 here halves that memory "
        "but drops every update smaller than 1/256 of its weight: at lr 2e-5 most weights stop "
        "moving."
    )

    @model_validator(mode="after")
    def _heads(self) -> ModelSpec:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}); pick a divisor, e.g. "
                f"{_largest_divisor_at_most(self.num_attention_heads, self.num_key_value_heads)}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) so every head has the same width, or give "
                    "head_dim"
                )
            # frozen: filled once here, so every reader sees the width the model is built with
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        bias = self.attention_bias
        if self.architecture == "qwen2" and bias is False:
            raise ValueError("attention_bias is false, but transformers' qwen2 always has q/k/v "
                             "biases; set attention_bias: true (or null)")
        if self.architecture == "mistral" and bias:
            raise ValueError("attention_bias is true, but transformers' mistral has no attention "
                             "biases; set attention_bias: false (or null)")
        if bias is None:
            object.__setattr__(self, "attention_bias", self.architecture == "qwen2")
        if self.architecture == "llama" and self.sliding_window is not None:
            raise ValueError(f"sliding_window is {self.sliding_window}, but llama has no sliding "
                             "window; set sliding_window: null")
        return self

    @property
    def qkv_bias(self) -> bool:
        """q, k and v projections carry biases."""
        return bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        """The output projection carries a bias too (llama and qwen3 with attention_bias; qwen2
        puts biases on q/k/v only)."""
        return bool(self.attention_bias) and self.architecture != "qwen2"

    @property
    def qk_norm(self) -> bool:
        """RMSNorm of each head's q and k before RoPE (qwen3): 2 x head_dim weights a layer."""
        return self.architecture == "qwen3"

    @property
    def num_parameters(self) -> int:
        """Parameters of the model the fields describe (the sum over ray_jobs' per-weight list
        topology.cost.parameter_shapes; tests check it against each family's built model)."""
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attention = 2 * h * q + 2 * h * kv  # q, o ; k, v
        attention += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        norms = 2 * h
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * h
        return self.num_hidden_layers * (attention + mlp + norms) + embeddings + h


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(divisors(n, at_most=k))


Degree = Annotated[int, Field(gt=0, le=MAX_GPUS)] | Auto


class StageSpec(_Spec):
    """One stage of the curriculum; stage k+1 starts from stage k's final checkpoint."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40,
                      description="Stage name (lowercase letters, digits, '-'), e.g. '65k'.")
    seq_len: int = Field(gt=0, le=MAX_SEQ_LEN, description="Tokens per training sequence; at most "
                         "2**24 (16M), 16 times the 1M-token contexts this tool targets.")
    steps: int = Field(gt=0, le=MAX_STEPS, description="Optimizer steps in this stage; at most "
                       "2**30.")
    batch_size: int = Field(
        1, gt=0, le=MAX_BATCH,
        description="Sequences per micro-step across all data-parallel replicas (global); a "
        "multiple of data_parallel_degree; at most 2**20.",
    )
    grad_accum_steps: int = Field(1, gt=0, le=1 << 16, description="Micro-steps per optimizer "
                                  "step; at most 2**16.")
    lr: float = Field(gt=0, lt=1, description="Peak learning rate (AdamW); after the warm-up it "
                      "decays along a cosine to a tenth of the peak at the stage's last step.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warm-up steps; at most "
                              "2**30, as steps.")
    ring_degree: Degree = Field(
        "auto", description="GPUs (workers) per ring: the sequence is split over them. 'auto': "
        "with resources.cluster, the smallest ring that fits memory; without, the largest ring "
        "the workers allow (seq_len must split into 2 x ring_degree chunks).",
    )
    data_parallel_degree: Degree = Field(
        "auto", description="Rings trained side by side as data-parallel replicas. 'auto': as "
        "many as the workers and batch_size allow. A stage runs on ring_degree x "
        "data_parallel_degree workers, at most resources.workers; the rest stay idle.",
    )
    shard_degree: Degree = Field(
        "auto", description="GPUs (workers) that shard the weights, gradients and optimizer state "
        "(FSDP2): ring_degree times a divisor of data_parallel_degree; shard groups are "
        "replicated (HSDP) when there are several. 'auto': each ring is one shard group.",
    )
    ulysses_degree: Degree = Field(
        1, description="GPUs per ring position that split the attention heads among them "
        "(DeepSpeed-Ulysses all-to-all, inside a fast domain); the ring runs across these groups, "
        "so a sequence is split over ring_degree x ulysses_degree GPUs. It must divide the query "
        "heads, and divide the key/value heads or be a multiple of them (each is then "
        "replicated). 1: ring attention alone. 'auto': with resources.cluster the planner splits "
        "each sequence's GPUs (ring_degree of them, as if ring-only) between Ulysses and the "
        "ring, taking the split with the fastest predicted step; without a cluster, 1.",
    )
    rope_theta: Annotated[float, Field(gt=0, le=MAX_THETA)] | Auto = Field(
        "auto", description="RoPE base for this stage. 'auto': the RoPE scaling-law rule from the "
        "model's rope_theta and pretrain_seq_len. At most 1e18.",
    )
    rope: RopeSpec | None = Field(
        None, description="How this stage extends RoPE (method and parameters). Null: the base "
        "model's own rule when its config.json has one other than plain RoPE (a Llama 3.1 "
        "checkpoint keeps its 'llama3' rule, unchanged), else the 'theta' method with "
        "stages[].rope_theta. A block here replaces the base model's rule, and the plan says so.")
    activation_checkpointing: CheckpointPolicy | Auto = Field(
        "auto", description="What backward recomputes of each decoder layer: 'full' (keep only "
        "its input, recompute the layer, ring attention included: its K/V travel the ring again), "
        "'attention' (recompute all but ring attention, whose output and log-sum-exp are kept: "
        "the ring runs once each way), 'none' (keep everything). 'auto': the planner's choice, "
        "the fastest policy whose memory fits the GPU with its reserve (plan.json and the report "
        "give each policy's time and memory); 'full' when planned without a cluster.",
    )
    attention: AttentionMasking = Field(
        "causal", description="What a token of a packed training sequence attends to. "
        "'causal': every earlier token of the sequence, whichever document it came from (as "
        "pretraining packed them; the default, so existing runs train as before). 'document': "
        "only the earlier tokens of its own document, nothing across documents (the boundaries "
        "come from the data: data.prepared's document starts, an EOS in data.documents; a "
        "synthetic retrieval sample is one document). Ring blocks no query may see are skipped; "
        "blocks that mix documents run only their documents' pairs (on GPUs in torch's "
        "variable-length flash op). docs/training.md, 'Packed documents'.")
    position_ids: PositionIds = Field(
        "continuous", description="RoPE positions of a packed sequence. 'continuous': 0 .. "
        "seq_len - 1 along the sequence (the default). 'per_document': from 0 again at each "
        "document's first token, so every document is positioned as if it stood alone; needs "
        "attention: document.")

    @model_validator(mode="after")
    def _positions_need_documents(self) -> StageSpec:
        if self.position_ids == "per_document" and self.attention != "document":
            raise ValueError(
                "position_ids per_document needs attention: document: with causal attention a "
                "token also sees the earlier documents, whose keys would then sit at negative "
                "RoPE distances (positions restarted), which no model was trained on; set "
                "attention: document, or position_ids: continuous")
        return self

    @model_validator(mode="after")
    def _one_rope(self) -> StageSpec:
        if self.rope is not None and self.rope_theta != "auto":
            raise ValueError("give the stage's RoPE once: rope_theta is the 'theta' method's "
                             "base; with a rope block, set rope.theta there and remove "
                             "rope_theta")
        return self

    @model_validator(mode="after")
    def _divisibility(self) -> StageSpec:
        ring, dp, shard = self.ring_degree, self.data_parallel_degree, self.shard_degree
        uly = self.ulysses_degree if isinstance(self.ulysses_degree, int) else 1
        if isinstance(shard, int) and isinstance(ring, int) and (
                problem := shard_problem(shard, ring, uly)):
            raise ValueError(problem)
        if isinstance(shard, int) and isinstance(ring, int) and isinstance(dp, int):
            ParallelDims.of(ring, dp, shard, uly)  # its ValueError names the numbers and a fix
        if isinstance(ring, int) and (problem := zigzag_problem(self.seq_len, ring, uly)):
            raise ValueError(problem)
        if (
            isinstance(self.data_parallel_degree, int)
            and self.batch_size % self.data_parallel_degree
        ):
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of data_parallel_degree "
                f"({self.data_parallel_degree}); use batch_size "
                f"{_round_up(self.batch_size, self.data_parallel_degree)}"
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum_steps


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class TrainingSpec(_Spec):
    """How each step is computed: precision, the loss in chunks, clipping (what each stage
    recomputes is its own: stages[].activation_checkpointing)."""

    mixed_precision: Literal["auto", "bf16", "none"] = Field(
        "auto", description="Compute dtype of the layers: 'bf16' (weights gathered in bf16, "
        "gradients reduced in fp32), 'none' (model.dtype throughout). 'auto': bf16 on GPUs, none "
        "on CPUs.")
    loss_chunk_tokens: int = Field(
        1024, gt=0, le=MAX_SEQ_LEN, description="Tokens whose logits exist at once in the loss "
        "(forward and backward): the fp32 (tokens x vocab) logits are never held whole. At "
        "Llama-3's 128K vocabulary, 1024 tokens take about 1.8 GB with their bf16 copy and "
        "gradient. At most 2**24, the sequence ceiling.")
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Global gradient-norm clipping "
                             "threshold; at most 1e6.")

    @model_validator(mode="before")
    @classmethod
    def _checkpointing_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "activation_checkpointing" in data:
            raise ValueError(
                "training.activation_checkpointing moved to each stage: remove it here and set "
                "stages[].activation_checkpointing to 'full' (was true), 'none' (was false), "
                "'attention' or 'auto' (the default: the planner's choice)")
        return data


class ResourcesSpec(_Spec):
    """What the training may use."""

    device: Literal["cpu", "gpu"] = Field("gpu", description="Train on GPUs (NCCL) or CPUs (gloo).")
    workers: int = Field(gt=0, le=MAX_GPUS, description="Training workers available: GPUs, or CPU "
                         "processes; at most 2**17 (131,072), above the largest GPU clusters.")
    cpus_per_worker: int = Field(1, gt=0, le=1024, description="CPU cores reserved for each "
                                 "worker; at most 1024, more than any one server has.")
    cluster: str | None = Field(
        None, max_length=MAX_PATH, description="ClusterSpec YAML describing the cluster's network "
        "(relative to this file). Null: plan from the nodes Ray reports.",
    )


class TokenizerSpec(_Spec):
    """Where the tokenizer comes from."""

    path: str | None = Field(
        None, max_length=MAX_PATH, description="Local tokenizer (a tokenizer.json or a directory "
        "holding one). Null: use model.path's tokenizer, or train a byte-level BPE locally on the "
        "data.",
    )
    vocab_size: int = Field(
        512, ge=64, le=MAX_VOCAB, description="Vocabulary of a locally trained tokenizer; must "
        "not exceed model.vocab_size (at most 2**24).",
    )


class DataMix(_Spec):
    """Relative weights of the sample sources (normalised; at least one positive)."""

    documents: float = Field(0.0, ge=0, le=1e6, description="Packed long documents: sequences of "
                             "data.prepared (or, for small corpora, of data.documents). Each "
                             "weight is finite, at most 1e6.")
    passkey: float = Field(0.5, ge=0, le=1e6, description="Passkey retrieval over filler text.")
    kv_retrieval: float = Field(0.5, ge=0, le=1e6, description="Key-value retrieval over filler "
                                "text.")

    @model_validator(mode="after")
    def _some(self) -> DataMix:
        if self.documents + self.passkey + self.kv_retrieval <= 0:
            raise ValueError("all weights are 0; give at least one source a positive weight")
        return self


class SourceSpec(_Spec):
    """One input of the preparation job: local files of one format and kind."""

    name: str = Field(pattern=r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?$", max_length=40,
                      description="Source name (lowercase letters, digits, '-', '_'): reports and "
                      "the manifest count documents by it.")
    paths: list[Annotated[str, Field(max_length=MAX_PATH)]] = Field(
        min_length=1, max_length=MAX_LIST, description="Local files or globs (relative to the run "
        "file), at most 4096. A `datasets` directory saved with save_to_disk is given as the "
        "directory.")
    format: Literal["auto", "jsonl", "txt", "parquet", "hf_dataset"] = Field(
        "auto", description="File format. 'auto': by extension (.jsonl/.json, .txt, .parquet; a "
        "directory is an HF `datasets` save_to_disk directory). A .txt file is one document; a "
        "jsonl line, parquet row or dataset row is one document.")
    kind: Literal["text", "chat"] = Field(
        "text", description="'text': every token is trained on. 'chat': `messages` (a list of "
        "{role, content}) rendered with the tokenizer's chat template (or, when it has none, the "
        "plain template 'role: content' one message a line); labels only on the assistant's "
        "tokens.")
    field: str = Field("text", min_length=1, max_length=256, description="Column or JSON key "
                       "holding the text (kind text) or the messages (kind chat: usually "
                       "'messages').")
    weight: float = Field(1.0, ge=0, le=1e4, description="Copies of each document in the packed "
                          "stream: 2 doubles the source, 0.5 keeps half its documents (chosen by "
                          "content hash, reproducibly); at most 1e4.")


class LengthBucket(_Spec):
    """Long-document upsampling: documents of at least `min_tokens` tokens get `factor` copies."""

    min_tokens: int = Field(ge=0, le=1 << 40, description="Lower bound of the bucket (tokens, EOS "
                            "excluded); at most 2**40.")
    factor: float = Field(ge=0, le=1e4, description="Copies of each document in the bucket "
                          "(multiplies the source's weight); the bucket with the largest "
                          "min_tokens that a document reaches applies. At most 1e4.")


class PreparedSpec(_Spec):
    """Tokenized, filtered and packed training documents, made once by `python -m
    ray_jobs.prepare --run RUN.yaml` (a Ray Data job; the trainer runs it first when `path`
    holds no prepared data)."""

    path: str = Field(max_length=MAX_PATH, description="Directory of the prepared data (relative "
                      "to the run file): token shards (.npy, uint32), document starts and "
                      "manifest.json.")
    sources: list[SourceSpec] = Field(min_length=1, max_length=1024, description="Inputs, in "
                                      "order; at most 1024.")
    min_tokens: int = Field(1, ge=1, le=1 << 40, description="Drop documents shorter than this "
                            "(tokens); at most 2**40.")
    max_tokens: int | None = Field(None, gt=0, le=1 << 40, description="Drop documents longer "
                                   "than this (tokens); null: no limit; at most 2**40.")
    dedup: bool = Field(True, description="Drop documents whose content (text or messages) "
                        "repeats an earlier one (sha256 of the content), before weighting.")
    upsample: list[LengthBucket] = Field(
        default_factory=list, max_length=64, description="Long-document upsampling by length "
        "bucket, e.g. [{min_tokens: 32768, factor: 3}]. At most 64 buckets.")
    shard_tokens: int = Field(1 << 24, ge=1024, le=1 << 32, description="Tokens per shard file "
                              "(the last one holds the rest); at most 2**32 (16 GiB of uint32).")

    @model_validator(mode="after")
    def _consistent(self) -> PreparedSpec:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: names must be unique, got {dup} twice; rename one")
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) is below min_tokens "
                             f"({self.min_tokens}); raise max_tokens or lower min_tokens")
        bounds = [b.min_tokens for b in self.upsample]
        if len(set(bounds)) != len(bounds):
            raise ValueError(f"upsample: min_tokens must differ between buckets, got {bounds}")
        return self


MAX_DOCUMENT_TOKENS = 1 << 40  # tokens of one document (as LengthBucket's bounds)
MAX_LENGTH_BUCKETS = 64  # buckets of a document-length histogram: powers of two up to 2**40 fit


class DocumentLengthBucket(_Spec):
    """One bucket of a document-length histogram: the documents longer than the previous bucket's
    max_tokens (0 before the first) and at most this one's, and their share of the tokens."""

    max_tokens: int = Field(gt=0, le=MAX_DOCUMENT_TOKENS, description="Upper bound of the bucket "
                            "(tokens of a document in the packed stream, its EOS included); at "
                            "most 2**40.")
    share: float = Field(ge=0, le=1e6, description="Share of the packed stream's tokens in "
                         "documents of this bucket (not of the documents: long documents hold "
                         "most tokens); normalised over the buckets, so fractions or percentages "
                         "both work. Finite, at most 1e6.")


class DataSpec(_Spec):
    """Training samples: a deterministic function of (seed, stage, step)."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the sample order and the "
                      "synthetic tasks; at most 2**32 - 1 (numpy's seed range).")
    documents: list[Annotated[str, Field(max_length=MAX_PATH)]] = Field(
        default_factory=list, max_length=MAX_LIST, description="Small corpora: local text files "
        "or globs (relative to this file) that every worker reads and tokenizes whole. Use "
        "data.prepared for anything larger. At most 4096 entries.",
    )
    prepared: PreparedSpec | None = Field(
        None, description="Prepared (tokenized, packed) documents, read by memory map: the source "
        "of mix.documents for real corpora. Null: data.documents.")
    mix: DataMix = Field(default_factory=DataMix, description="Sample sources and their weights.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer source.")
    document_lengths: list[DocumentLengthBucket] = Field(
        default_factory=list, max_length=MAX_LENGTH_BUCKETS, description="Histogram of the "
        "packed documents' lengths, for planning before the data exists: buckets by increasing "
        "max_tokens, each with its share of the stream's TOKENS; a document's length is taken as "
        "uniform between the previous bound and its bucket's. `ringpilot plan` prices attention "
        "`document` (causal inside each document) with it. When data.prepared's manifest exists "
        "the planner uses the corpus's own histogram instead (the prepare job writes it). Empty: "
        "no histogram. At most 64 buckets.")

    @field_validator("document_lengths")
    @classmethod
    def _histogram(cls, buckets: list[DocumentLengthBucket]) -> list[DocumentLengthBucket]:
        bounds = [b.max_tokens for b in buckets]
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"max_tokens must increase from bucket to bucket, got {bounds}; list "
                             "the buckets shortest first, each bound once")
        if buckets and not any(b.share > 0 for b in buckets):
            raise ValueError("every share is 0; give the buckets that hold documents a positive "
                             "share of the tokens (or drop document_lengths)")
        return buckets

    @model_validator(mode="after")
    def _documents_given(self) -> DataSpec:
        if self.documents and self.prepared is not None:
            raise ValueError("documents and prepared are both given; list the files as a source "
                             "of data.prepared and drop data.documents")
        if self.mix.documents > 0 and not self.documents and self.prepared is None:
            raise ValueError(
                f"mix.documents is {self.mix.documents} but neither documents nor prepared is "
                "given; add data.prepared (or text files under data.documents) or set "
                "mix.documents: 0"
            )
        return self


# Names ringpilot's own tasks had before they were told apart from RULER's.
_RENAMED_TASKS = {t: f"{t}_lite" for t in ("niah", "niah_single", "niah_multikey",
                                           "niah_multivalue", "niah_multiquery", "vt", "cwe",
                                           "fwe")}

# lm-evaluation-harness's 13 RULER tasks, as lm-eval spells them.
RulerTask = Literal[
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
    "niah_multikey_3", "niah_multiquery", "niah_multivalue", "ruler_vt", "ruler_cwe", "ruler_fwe",
    "ruler_qa_squad", "ruler_qa_hotpot",
]
RULER_TASK_NAMES: tuple[str, ...] = typing.get_args(RulerTask)
# Those lm-eval generates from the tokenizer alone (the others download essays or QA sets).
RULER_OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt",
                       "ruler_cwe", "ruler_fwe")


class RulerSpec(_Spec):
    """RULER itself: lm-evaluation-harness's RULER tasks with ringpilot as the model backend
    (ray_jobs.eval.lm_eval; needs the `eval` extra), scored by RULER's metrics."""

    tasks: list[RulerTask] = Field(
        default_factory=lambda: list(RULER_OFFLINE_TASKS), min_length=1,
        description="lm-eval task names. The default: the six that need no download (essay "
        "haystacks and QA sets come from the Hugging Face hub and the web); with eval.data_dir, "
        "all 13.",
    )
    min_length: int = Field(1024, gt=0, le=MAX_SEQ_LEN, description="Shortest context run: "
                            "RULER's prompts and answer budgets (30-128 tokens) need room; at "
                            "most 2**24.")
    samples: int = Field(4, gt=0, le=1 << 16, description="Samples per task and length; at most "
                         "2**16.")
    chat_template: bool = Field(False, description="Render prompts with the tokenizer's chat "
                                "template (the checkpoint must have one).")
    final_only: bool = Field(True, description="Run only on each stage's final checkpoint "
                             "(lm-eval generates 500 samples per task and length first).")
    offline: bool = Field(True, description="Set HF_HUB_OFFLINE=1 in the evaluation actors, so "
                          "tasks that need a download fail at once with the reason instead of "
                          "retrying for ~25 s each.")


BabilongTask = Literal[tuple(f"babilong_qa{i}" for i in range(1, 21))]  # lm-eval's 20 tasks


class BabilongSpec(_Spec):
    """BABILong through lm-eval's tasks (ringpilot backend), at the BABILong config each
    evaluated length holds (0k, 1k, ... 128k; k = 1,024 tokens)."""

    tasks: list[BabilongTask] = Field(
        default_factory=lambda: [f"babilong_qa{i}" for i in range(1, 6)], min_length=1,
        description="lm-eval task names. The default: qa1-qa5, the ones BABILong has at every "
        "length (qa6-qa20 have 0k only).")
    samples: int = Field(4, gt=0, le=1 << 16, description="Samples per task and length; at most "
                         "2**16.")
    final_only: bool = Field(True, description="Run only on each stage's final checkpoint.")


class KamradtSpec(_Spec):
    """Greg Kamradt's needle-in-a-haystack test (task niah_kamradt): his needle in an
    essay-style haystack of your own local text files, his depth grid, inserted at a sentence
    break, scored by the key phrases the answer contains."""

    haystack: list[Annotated[str, Field(max_length=MAX_PATH)]] = Field(
        min_length=1, max_length=MAX_LIST, description="Local text files or globs (relative to "
                                "the run file), joined and repeated to each length. At most 4096 "
                                "entries.")
    needle: str = Field("The best thing to do in San Francisco is eat a sandwich and sit in "
                        "Dolores Park on a sunny day.", min_length=1, max_length=MAX_TEXT,
                        description="The needle.")
    question: str = Field("What is the best thing to do in San Francisco?", min_length=1,
                          max_length=MAX_TEXT, description="The question about it.")
    key_phrases: list[Annotated[str, Field(max_length=MAX_TEXT)]] = Field(
        default_factory=lambda: ["eat a sandwich", "Dolores Park"], min_length=1,
        max_length=256, description="Phrases a right answer contains; the score is the share "
                                   "found. At most 256.")
    depth_intervals: int = Field(11, ge=2, le=1001, description="Depths from 0 to 100 %, evenly "
                                 "spaced (his grid); at most 1001 (steps of 0.1 %).")


class EvalSpec(_Spec):
    """Evaluation of every committed checkpoint, by actors beside the training."""

    enabled: bool = Field(True, description="Evaluate checkpoints as they land.")
    tasks: list[EvalTask] = Field(
        default_factory=lambda: ["niah_lite", "niah_single_lite", "niah_multikey_lite", "vt_lite"],
        min_length=1, max_length=64, description="ringpilot's own tasks: the passkey test in the "
        "training text, and a NIAH grid and tasks in the style of RULER's (`_lite`: not RULER's "
        "generators nor its numbers; RULER itself runs through `ruler`).",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _renamed(cls, tasks):
        if not isinstance(tasks, list):
            return tasks  # not a list: the type check says so, naming the field
        old = [t for t in tasks if isinstance(t, str) and t in _RENAMED_TASKS]
        if old:
            raise ValueError(
                "renamed: " + ", ".join(f"{t} -> {_RENAMED_TASKS[t]}" for t in old) + ". These "
                "are ringpilot's own RULER-style tasks, not RULER's; write the new names, and "
                "for RULER itself set eval.ruler (lm-eval's tasks)")
        if isinstance(tasks, list) and KAMRADT_TASK in tasks:
            raise ValueError(f"{KAMRADT_TASK} is not listed here: it runs when eval.kamradt "
                             "gives its haystack (local text files); drop it from eval.tasks")
        return tasks
    context_lengths: list[Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)]] = Field(
        default_factory=list, max_length=256, description="Context lengths to test (at most 256, "
        "each at most 2**24); empty: each stage's seq_len and the shorter ones before it.",
    )
    depths: list[Annotated[float, Field(ge=0, le=100)]] = Field(
        default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0],
        min_length=1, max_length=1001, description="Needle depths in percent of the context (at "
        "most 1001).",
    )
    samples: int = Field(4, gt=0, le=1 << 16, description="Samples per (task, length, depth) "
                         "cell; at most 2**16.")
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="Seed of the evaluation prompts; at "
                      "most 2**32 - 1.")
    cpus: float = Field(1.0, gt=0, le=1024, description="CPUs per evaluation actor; at most 1024.")
    gpus: float = Field(0.0, ge=0, le=64, description="GPUs per evaluation actor (spare ones, "
                        "never the training workers'); at most 64.")
    max_retries: int = Field(2, ge=0, le=1000, description="Retries of a crashed evaluation actor "
                             "(or gang: a gang is retried as a whole); at most 1000.")
    max_tokens_per_evaluator: int = Field(
        32_768, gt=0, le=MAX_SEQ_LEN, description="Longest context one evaluator holds on its "
        "device (weights, KV cache, prefill activations); longer contexts run on an evaluation "
        "gang. 32,768 fits an 8B Llama on a 48 GB L40S with room to spare. At most 2**24.",
    )
    gang_size: int = Field(
        0, ge=0, le=MAX_GPUS, description="Members of the evaluation gang that runs contexts "
        "longer than max_tokens_per_evaluator with ring-attention prefill and sequence-parallel "
        "decoding (each member takes eval.cpus and eval.gpus, never the training workers'). 0: "
        "the fewest members that each hold at most max_tokens_per_evaluator tokens of the longest "
        "context. At most 2**17, the GPU ceiling.",
    )
    gang_place_timeout_s: float = Field(
        120.0, gt=0, le=7 * 86400, description="How long a gang waits for its resources before "
        "the long contexts are reported as not run (a gang larger than the cluster fails at "
        "once). At most a week.",
    )
    kamradt: KamradtSpec | None = Field(
        None, description="Also run Kamradt's needle-in-a-haystack test on your own haystack "
        "files; null: not run.",
    )
    ruler: RulerSpec | None = Field(
        None, description="Also run RULER through lm-eval (per length, as RULER publishes), at "
        "each evaluated length from ruler.min_length that one evaluator holds; null: not run.",
    )
    babilong: BabilongSpec | None = Field(
        None, description="Also run BABILong through lm-eval at each evaluated length; null: "
        "not run.",
    )
    data_dir: str | None = Field(
        None, max_length=MAX_PATH, description="A local folder with what RULER's essay and QA "
        "tasks and BABILong would download (`ringpilot eval fetch-data DIR` builds it on a "
        "machine with internet), readable where the evaluation actors run; checked before "
        "evaluating. With it, ruler.tasks defaults to all 13. null: those tasks need the network "
        "and are listed as not run offline.",
    )

    @model_validator(mode="before")
    @classmethod
    def _all_ruler_tasks_with_data(cls, data):
        if isinstance(data, dict) and data.get("data_dir") is not None and \
                isinstance(data.get("ruler"), dict) and "tasks" not in data["ruler"]:
            data = {**data, "ruler": {**data["ruler"], "tasks": list(RULER_TASK_NAMES)}}
        return data


class StorageSpec(_Spec):
    """Where checkpoints, the run ledger and reports go."""

    path: str = Field(max_length=MAX_PATH, description="Run directory root (a local or shared "
                      "filesystem path).")
    checkpoint_every: int = Field(
        50, gt=0, le=MAX_STEPS, description="Optimizer steps between checkpoints (each stage's "
        "last step always checkpoints); at most 2**30.",
    )
    keep_last: int = Field(2, gt=0, le=1 << 16, description="Committed checkpoints kept per "
                           "stage; at most 2**16.")


class FailureSpec(_Spec):
    """How failures are handled."""

    max_failures: int = Field(3, ge=0, le=1000, description="Worker-group restarts per stage (Ray "
                              "Train FailureConfig.max_failures); at most 1000.")
    stage_retries: int = Field(2, ge=0, le=1000, description="Resubmissions of a failed stage by "
                               "the Kubernetes operator; at most 1000.")
    report_every: int = Field(
        10, gt=0, le=MAX_STEPS, description="Optimizer steps between progress records (loss, "
        "tokens/s, ETA) that the driver prints. Only checkpoints are reported to Ray Train: each "
        "report waits for its controller's poll of the workers (~2 s). At most 2**30.",
    )
    hang_timeout_s: float = Field(
        300.0, ge=1.0, le=86_400.0, description="Seconds a worker may go without progress (a "
        "step begun, a checkpoint saved, a loading phase done) while the others wait for it, "
        "before the driver reports the hang naming that rank, its node and GPU. Once the ranks "
        "have taken their first step, the driver then ends the stopped rank's process, so Ray "
        "Train restarts the group (max_failures) as for a dead worker. Above the longest "
        "checkpoint save; below NCCL's own collective timeout (10 min by default), which ends "
        "a hang no single rank can be blamed for and dumps its flight recorder. 1 s to 1 day.",
    )
    preflight: bool = Field(
        False, description="Before training, the driver runs `ringpilot preflight` on the stages "
        "it trains (needs resources.cluster, or the driver's --cluster): every planned ring hop "
        "and collective timed on the planned workers, slow links named by tomography, the "
        "layout's attention checked against unsharded attention. A finding stops the run "
        "before its first step (exit 1); the report is in RUN_DIR/preflight/.",
    )


class MlflowSinkSpec(_Spec):
    """MLflow: one parent run per training run, one nested run per stage."""

    tracking_uri: str = Field(
        min_length=1, max_length=MAX_PATH, pattern=r"^(https?|file|databricks)://|^[^:]+$",
        description="Tracking server (http://host:5000) or local file store (file:///abs/dir, or "
        "a plain path relative to the run directory, e.g. mlruns).")
    experiment: str = Field("ringpilot", min_length=1, max_length=200,
                            description="Experiment the runs go to (made if missing).")


class WandbSinkSpec(_Spec):
    """Weights & Biases: one run per training run; offline files unless mode is online."""

    project: str = Field("ringpilot", min_length=1, max_length=128,
                         description="W&B project.")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under RUN_DIR/wandb (`wandb sync` uploads them "
        "later, no account needed to train); online: needs WANDB_API_KEY.")


class RingHealthSpec(_Spec):
    """When the driver reports a slow ring hop (docs/observability.md, "Ring health")."""

    window_steps: int = Field(20, ge=1, le=10_000, description="Steps of each hop's rolling "
                              "window; at most 10,000.")
    slow_steps: int = Field(10, ge=1, le=10_000, description="A hop is reported once it was "
                            "slow in at least this many steps of its window (one stall is not "
                            "a slow link); again only after a whole window without a slow "
                            "step. At most window_steps.")
    slow_factor: float = Field(3.0, gt=1.0, le=1000.0, description="A step is slow for a hop "
                               "when the hop's K/V wait exceeds this many times the median "
                               "wait of the other hops of its ring and (with a cluster plan) "
                               "the plan's predicted exposed K/V time. Above 1, at most 1000.")

    @model_validator(mode="after")
    def _steps_fit_window(self) -> RingHealthSpec:
        if self.slow_steps > self.window_steps:
            raise ValueError(f"slow_steps ({self.slow_steps}) exceeds window_steps "
                             f"({self.window_steps}); lower slow_steps or widen the window")
        return self


class ObservabilitySpec(_Spec):
    """Where per-step training metrics and evaluation scores go besides the run directory's own
    progress files (docs/observability.md). A sink that fails is reported once and dropped;
    training never waits for one."""

    tensorboard: bool = Field(True, description="TensorBoard event files under "
                              "RUN_DIR/tensorboard, one run per stage on one step axis.")
    mlflow: MlflowSinkSpec | None = Field(None, description="MLflow tracking (off when absent).")
    wandb: WandbSinkSpec | None = Field(None, description="Weights & Biases (off when absent).")
    prometheus: bool = Field(False, description="Gauges through Ray's metrics API "
                             "(ray_ringpilot_*), served by each Ray node's metrics exporter.")
    ring_health: RingHealthSpec = Field(default_factory=RingHealthSpec,
                                        description="Slow ring hop reports: the window and "
                                        "thresholds.")


class RunSpec(_Spec):
    """A staged context-extension run."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=50,
                      description="Run name (lowercase letters, digits, '-'): names the run "
                      "directory and Kubernetes objects.")
    model: ModelSpec = Field(description="The model to extend.")
    stages: list[StageSpec] = Field(min_length=1, max_length=64, description="The curriculum, in "
                                    "order; at most 64 stages (real curricula have 3-6).")
    resources: ResourcesSpec = Field(description="Workers and the cluster description.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Checkpoint evaluation.")
    storage: StorageSpec = Field(description="Checkpoints, ledger and reports.")
    failure: FailureSpec = Field(default_factory=FailureSpec, description="Failure handling.")
    training: TrainingSpec = Field(default_factory=TrainingSpec,
                                   description="Precision, loss chunks and clipping.")
    observability: ObservabilitySpec = Field(
        default_factory=ObservabilitySpec,
        description="Metric sinks: TensorBoard, MLflow, W&B, Prometheus.")

    @model_validator(mode="after")
    def _cross_field(self) -> RunSpec:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"stages: names must be unique, got {dup} twice; rename one")
        lengths = [s.seq_len for s in self.stages]
        if lengths != sorted(lengths):
            raise ValueError(
                f"stages: seq_len must not decrease from one stage to the next, got {lengths}; "
                "order the stages by length"
            )
        workers = self.resources.workers
        m = self.model
        if m.sliding_window is not None and m.sliding_window < lengths[-1]:
            raise ValueError(
                f"model.sliding_window ({m.sliding_window}) is shorter than the longest stage "
                f"({lengths[-1]} tokens): ring attention has no sliding window and would attend "
                "past it; set model.sliding_window to null (Mistral v0.2 on) or train at most "
                f"{m.sliding_window} tokens")
        for i, stage in enumerate(self.stages):
            problems = ulysses_problems(m.num_attention_heads, m.num_key_value_heads,
                                        ulysses_of(stage))
            if problems:
                raise ValueError(f"stages[{i}] ({stage.name}): {problems[0]}")
            try:  # the layouts the stage allows on the workers; the planner picks among them
                degree_options(stage, workers, f"resources.workers is {workers}",
                               grow="raise resources.workers")
            except DegreeError as e:
                raise ValueError(f"stages[{i}] ({stage.name}): {e}") from None
            try:  # the scaling rule raises theta0 to a power that can leave the floats
                theta = self.stage_theta(i)
            except OverflowError:
                theta = math.inf
            except ValueError as e:  # a rope block that does not fit the model
                raise ValueError(f"stages[{i}] ({stage.name}): {e}") from None
            if not theta <= MAX_THETA:
                raise ValueError(
                    f"stages[{i}] ({stage.name}): rope_theta 'auto' gives a RoPE base above "
                    f"{MAX_THETA:g} for seq_len {stage.seq_len} from model.rope_theta "
                    f"{m.rope_theta:g} at pretrain_seq_len {m.pretrain_seq_len}; set "
                    "stages[].rope_theta explicitly or give the real pretrain_seq_len")
        if self.data.tokenizer.path is None and self.model.path is None:
            if self.data.tokenizer.vocab_size > self.model.vocab_size:
                raise ValueError(
                    f"data.tokenizer.vocab_size ({self.data.tokenizer.vocab_size}) exceeds "
                    f"model.vocab_size ({self.model.vocab_size}); lower the tokenizer's or raise "
                    "the model's"
                )
        return self

    @property
    def compute_dtype(self) -> Literal["float32", "bfloat16"]:
        """The dtype layers compute in: bf16 under mixed precision, else the weights' own."""
        precision = self.training.mixed_precision
        if precision == "bf16" or (precision == "auto" and self.resources.device == "gpu"):
            return "bfloat16"
        return self.model.dtype

    @property
    def run_dir(self) -> Path:
        """`<storage.path>/<name>`: the ledger, plan, checkpoints and evaluations of this run."""
        return Path(self.storage.path).expanduser().absolute() / self.name

    def base_rope(self, spec_dir: Path | None = None) -> dict[str, Any] | None:
        """The base model's RoPE rule: model.path's config.json (relative to `spec_dir`, the
        spec's directory), or None for a model built from this spec (plain RoPE with
        model.rope_theta)."""
        from specs.checkpoint import config_rope

        if self.model.path is None:
            return None
        path = Path(self.model.path).expanduser()
        return config_rope(path if path.is_absolute() or spec_dir is None else spec_dir / path)

    def stage_rope(self, index: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """transformers' `rope_parameters` for stage `index`. `base`: the base model's own (its
        config.json's, when model.path has one; None: plain RoPE with model.rope_theta). A stage
        without a rope block keeps a base rule other than plain RoPE unchanged; otherwise its
        method (the 'theta' rule with stages[].rope_theta by default) is resolved against the
        base's theta, model.pretrain_seq_len and the stage's length."""
        stage = self.stages[index]
        if stage.rope is None and base and base.get("rope_type", "default") != "default":
            return dict(base)
        rope = stage.rope or RopeSpec(theta=stage.rope_theta)
        theta0 = float(base["rope_theta"]) if base and base.get("rope_theta") else \
            self.model.rope_theta
        return rope_parameters(rope, seq_len=stage.seq_len, theta0=theta0,
                               pretrain_seq_len=self.model.pretrain_seq_len,
                               head_dim=self.model.head_dim)

    def stage_rope_words(self, index: int, base: dict[str, Any] | None = None) -> str:
        """The stage's RoPE for people, and whether it keeps or replaces the base model's rule:
        'llama3 x8 (the base model's, kept)', 'theta 283,461,213 (replaces the base's llama3)'."""
        words = describe_rope(self.stage_rope(index, base))
        kind = (base or {}).get("rope_type", "default")
        if kind == "default":
            return words
        if self.stages[index].rope is None:
            return f"{words} (the base model's, kept)"
        return f"{words} (replaces the base model's {METHOD_OF_TYPE.get(kind, kind)})"

    def stage_theta(self, index: int, base: dict[str, Any] | None = None) -> float:
        """RoPE base of stage `index` (the base a scaling method scales, for the others)."""
        return float(self.stage_rope(index, base)["rope_theta"])

    def summary(self) -> str:
        m = self.model
        lines = [
            f"run {self.name}: {FAMILY_NAMES[m.architecture]} "
            f"{m.num_parameters / 1e6:,.1f}M params "
            f"({m.num_hidden_layers} layers, hidden {m.hidden_size}, "
            f"{m.num_attention_heads}/{m.num_key_value_heads} heads, {m.dtype}), "
            f"{self.resources.workers} {self.resources.device} workers",
            f"{'stage':<10}{'seq_len':>10}{'steps':>7}{'tokens/step':>13}{'ring x dp':>11}"
            f"{'rope':>20}{'lr':>9}",
        ]
        for i, s in enumerate(self.stages):
            u = s.ulysses_degree
            ring = f"{s.ring_degree}" + ("" if u == 1 else f"u{u}" if u != "auto" else "u?")
            lines.append(
                f"{s.name:<10}{s.seq_len:>10,}{s.steps:>7}{s.tokens_per_step:>13,}"
                f"{f'{ring} x {s.data_parallel_degree}':>11}"
                f"{describe_rope(self.stage_rope(i)):>20}{s.lr:>9.1e}"
            )
        hybrid = next((s for s in self.stages if ulysses_of(s) > 1), None)
        if hybrid is not None:
            r, u = hybrid.ring_degree, hybrid.ulysses_degree
            lines.append(f"ring {r}u{u}: a ring of {r} positions, each a Ulysses group of {u} "
                         "GPUs splitting the heads")
        auto = next((s for s in self.stages if s.ulysses_degree == "auto"), None)
        if auto is not None:
            lines.append(f"ring {auto.ring_degree}u?: ulysses_degree auto; on a cluster "
                         "description the planner splits a ring's GPUs between Ulysses and "
                         "the ring")
        masked = [s for s in self.stages
                  if (s.attention, s.position_ids) != ("causal", "continuous")]
        if masked:  # only then: the default (causal) needs no line
            words = "; ".join(f"{s.name} {describe_attention(s.attention, s.position_ids)}"
                              for s in masked)
            rest = " (the other stages: causal)" if len(masked) < len(self.stages) else ""
            lines.append(f"attention over packed documents: {words}{rest}")
        lines.append(f"storage {self.storage.path}; eval {'on' if self.eval.enabled else 'off'} "
                     f"({', '.join(self.eval.tasks)})")
        return "\n".join(lines)

