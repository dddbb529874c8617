"""RunSpec: the shipped configs validate, and every cross-field rule says field, value and fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from specs.loading import SpecError, load_model, validate_data
from specs.run import RunSpec, rope_theta_for

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def run_with(**changes) -> dict:
    """The tiny run with dotted-path changes, e.g. run_with(**{"stages.0.seq_len": 250})."""
    data = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def errors_of(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_data(data, RunSpec, source="run.yaml")
    return info.value.lines


@pytest.mark.parametrize("name", ["tiny.yaml", "llama3-8b-1m.yaml", "qwen2.5-7b-1m.yaml",
                                  "mistral-7b-1m.yaml"])
def test_shipped_configs_validate(name):
    run = load_model(ROOT / "configs" / name, RunSpec)
    assert run.summary().startswith(f"run {run.name}:")


def test_llama3_8b_recipe_matches_the_published_card():
    run = load_model(ROOT / "configs" / "llama3-8b-1m.yaml", RunSpec)
    assert [s.seq_len for s in run.stages] == [65536, 262144, 524288, 1048576]
    assert [s.tokens_per_step * s.steps for s in run.stages] == [
        62_914_560, 100_663_296, 419_430_400, 838_860_800]
    assert [s.ring_degree * s.data_parallel_degree for s in run.stages] == [8, 32, 512, 512]
    assert 8.0e9 < run.model.num_parameters < 8.1e9  # Llama-3 8B: 8.03B parameters


def test_other_families_count_their_published_parameters():
    """The Hub's model pages: Qwen2.5-7B 7.62B parameters (q/k/v biases counted), Mistral-7B
    v0.3 7.25B."""
    qwen = load_model(ROOT / "configs" / "qwen2.5-7b-1m.yaml", RunSpec).model
    mistral = load_model(ROOT / "configs" / "mistral-7b-1m.yaml", RunSpec).model
    assert 7.61e9 < qwen.num_parameters < 7.62e9
    assert 7.24e9 < mistral.num_parameters < 7.25e9


def test_rope_theta_rule_reproduces_published_llama3_configs():
    assert round(rope_theta_for(262_144, 500_000.0, 8_192)) == 283_461_213
    assert round(rope_theta_for(1_048_576, 500_000.0, 8_192)) == 3_580_165_449
    assert rope_theta_for(4_096, 500_000.0, 8_192) == 500_000.0  # never lowered


@pytest.mark.parametrize("changes, head_dim, bias", [
    ({}, 16, False),  # hidden 128 / 8 heads
    ({"model.architecture": "qwen2"}, 16, True),  # transformers' Qwen2 has q/k/v biases
    ({"model.architecture": "qwen3", "model.head_dim": 32}, 32, False),
    ({"model.architecture": "mistral", "model.sliding_window": 4096}, 16, False),
])
def test_family_facts_are_filled_in_from_the_architecture(changes, head_dim, bias):
    run = RunSpec.model_validate(run_with(**changes))
    assert (run.model.head_dim, run.model.attention_bias) == (head_dim, bias)
    again = RunSpec.model_validate(run.model_dump(mode="json"))  # a dump validates as itself
    assert again == run


def test_tied_embeddings_count_one_matrix():
    untied = RunSpec.model_validate(run_with()).model
    tied = RunSpec.model_validate(run_with(**{"model.tie_word_embeddings": True})).model
    assert untied.num_parameters - tied.num_parameters == untied.vocab_size * untied.hidden_size


def test_auto_theta_grows_per_stage_and_explicit_theta_is_kept():
    run = RunSpec.model_validate(run_with(**{"stages.3.rope_theta": 123.0}))
    thetas = [run.stage_theta(i) for i in range(4)]
    # 64 and 256 tokens are within the model's pretraining length (256): theta stays.
    assert thetas[:2] == [10_000.0, 10_000.0] and thetas[2] > thetas[1] and thetas[3] == 123.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"stages.0.seq_len": 250}, r"stages\[0\]: seq_len \(250\) must be divisible by 2 x "
         r"ring_degree \(4\) for zigzag sharding; use 252 or another ring_degree"),
        ({"stages.0.batch_size": 3, "stages.0.data_parallel_degree": 2, "resources.workers": 4},
         r"stages\[0\]: batch_size \(3\) must be a multiple of data_parallel_degree \(2\); use "
         r"batch_size 4"),
        ({"stages.1.data_parallel_degree": 2},
         r"<top>: stages\[1\] \(s256\): ring_degree x data_parallel_degree = 2 x 2 = 4 workers, "
         r"but resources.workers is 2; lower the degrees or raise resources.workers"),
        ({"stages.1.name": "s64"}, r"stages: names must be unique, got \['s64'\] twice"),
        ({"stages.1.seq_len": 32}, r"seq_len must not decrease .* got \[64, 32, 1024, 4096\]; "
         r"order the stages by length"),
        ({"model.num_key_value_heads": 3}, r"model: num_attention_heads \(8\) must be a multiple "
         r"of num_key_value_heads \(3\); pick a divisor, e.g. 2"),
        ({"model.hidden_size": 66}, r"model: hidden_size \(66\) must be divisible by "
         r"num_attention_heads \(8\)"),
        ({"data.tokenizer": {"vocab_size": 1024}}, r"data.tokenizer.vocab_size \(1024\) exceeds "
         r"model.vocab_size \(512\)"),
        ({"data.mix": {"documents": 1.0, "passkey": 0, "kv_retrieval": 0}},
         r"data: mix.documents is 1.0 but neither documents nor prepared is given; add "
         r"data.prepared \(or text files under data.documents\) or set mix.documents: 0"),
        ({"data.mix": {"documents": 0, "passkey": 0, "kv_retrieval": 0}},
         r"data.mix: all weights are 0; give at least one source a positive weight"),
        ({"stages.0.shard_degree": 3}, r"stages\[0\]: shard_degree \(3\) must be a multiple of "
         r"ring_degree \(2\): a ring's GPUs shard the model together"),
        ({"stages.0.shard_degree": 4}, r"stages\[0\]: shard_degree \(4\) must be ring_degree "
         r"\(2\) times a divisor of data_parallel_degree \(1\); use one of \[2\]"),
        ({"training": {"loss_chunk_tokens": 0}}, r"training.loss_chunk_tokens: Input should be "
         r"greater than 0"),
        ({"model.architecture": "gpt2"}, r"model.architecture: Input should be 'llama', "
         r"'mistral', 'qwen2' or 'qwen3'"),
        ({"model.architecture": "qwen2", "model.attention_bias": False},
         r"model: attention_bias is false, but transformers' qwen2 always has q/k/v biases; set "
         r"attention_bias: true \(or null\)"),
        ({"model.architecture": "mistral", "model.attention_bias": True},
         r"model: attention_bias is true, but transformers' mistral has no attention biases"),
        ({"model.sliding_window": 4096}, r"model: sliding_window is 4096, but llama has no "
         r"sliding window; set sliding_window: null"),
        ({"model.architecture": "mistral", "model.sliding_window": 1024},
         r"model.sliding_window \(1024\) is shorter than the longest stage \(4096 tokens\): "
         r"ring attention has no sliding window .*; set model.sliding_window to null"),
        ({"model.hidden_size": 66, "model.architecture": "qwen3"}, r"model: hidden_size \(66\) "
         r"must be divisible by num_attention_heads \(8\) .*, or give head_dim"),
    ],
)
def test_cross_field_rules_name_field_value_and_fix(changes, message):
    lines = errors_of(run_with(**changes))
    assert any(__import__("re").search(message, line) for line in lines), lines


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"stages.0.seqlen": 256}, r"^stages\[0\]\.seqlen: unknown field \(got 256; did you mean "
         r"'seq_len'\?\)$"),
        ({"modle": {}}, r"^modle: unknown field \(got \{\}; did you mean 'model'\?\)$"),
        ({"stages.0.steps": "many"}, r"^stages\[0\]\.steps: Input should be a valid integer.* "
         r"\(got 'many'; Optimizer steps in this stage; at most 2\*\*30\.\)$"),
        ({"stages.0.ring_degree": "x"}, r"^stages\[0\]\.ring_degree: should be a valid integer.* "
         r"or 'auto' \(got 'x'\)$"),
        ({"stages.0.ring_degree": 0}, r"^stages\[0\]\.ring_degree: should be greater than 0 or "
         r"'auto' \(got 0\)$"),
        ({"resources.device": "tpu"}, r"^resources\.device: Input should be 'cpu' or 'gpu' "
         r"\(got 'tpu'; Train on GPUs \(NCCL\) or CPUs \(gloo\)\.\)$"),
        ({"name": "Tiny_Run"}, r"^name: not an allowed value \(got 'Tiny_Run'; Run name "
         r"\(lowercase letters, digits, '-'\)"),
        ({"eval.tasks": ["niah_lite", "needle"]}, r"^eval\.tasks\[1\]: Input should be 'passkey'.*"
         r"\(got 'needle'"),
        ({"eval.depths": [50, 120]}, r"^eval\.depths\[1\]: Input should be less than or equal "
         r"to 100 \(got 120"),
        ({"observability": {"ring_health": {"window_steps": 5, "slow_steps": 8}}},
         r"^observability\.ring_health: slow_steps \(8\) exceeds window_steps \(5\); lower "
         r"slow_steps or widen the window"),
        ({"failure.hang_timeout_s": 0}, r"^failure\.hang_timeout_s: Input should be greater "
         r"than or equal to 1"),
    ],
)
def test_field_errors_are_one_line_each(changes, message):
    lines = errors_of(run_with(**changes))
    assert len(lines) == 1, lines
    assert __import__("re").search(message, lines[0]), lines[0]


def test_missing_fields_say_what_to_add():
    data = run_with()
    del data["storage"]
    del data["model"]["pretrain_seq_len"]
    assert sorted(errors_of(data)) == [
        "model.pretrain_seq_len: required field is missing (add it: Context length the model "
        "was pretrained at (T0 of the theta rule); at most 2**24, the sequence ceiling.)",
        "storage: required field is missing (add it: Checkpoints, ledger and reports.)",
    ]


def test_every_problem_is_reported_at_once():
    data = run_with(**{"stages.0.steps": 0, "stages.1.lr": 2.0, "resources.workers": -1})
    assert len(errors_of(data)) == 3


def test_ulysses_degree_splits_each_ring_position():
    """Ulysses 2 x ring 2 on 4 workers; plan.json's stage carries the degree and lists each
    ring's 4 workers, one ring position's Ulysses group after the other."""
    from topology.run_plan import plan_from_workers

    data = run_with(**{"resources.workers": 4, "stages.0.ulysses_degree": 2})
    run = validate_data(data, RunSpec, source="run.yaml")
    stage = plan_from_workers({"n0": 4}, run).stage(run.stages[0].name)
    assert (stage.dims.ring, stage.dims.ulysses, stage.dims.dp) == (2, 2, 1)
    assert stage.dims.sequence == 4 and stage.dims.shard == 4
    assert [len(r) for r in stage.rings] == [4]
    assert any("ulysses 2" in note for note in stage.notes)


@pytest.mark.parametrize("changes,message", [
    ({"stages.0.ulysses_degree": 3, "stages.0.seq_len": 96}, "stages[0] (s64): ulysses_degree "
     "(3) must divide the 8 query heads; use one of [1, 2, 4, 8]"),
    ({"stages.0.ulysses_degree": 3}, "stages[0]: seq_len (64) must be divisible by 2 x "
     "ring_degree x ulysses_degree (12) for zigzag sharding and the Ulysses split; use 72"),
    ({"stages.0.ulysses_degree": 2}, "stages[0] (s64): ring_degree x data_parallel_degree x "
     "ulysses_degree = 2 x 1 x 2 = 4 workers, but resources.workers is 2"),
])
def test_ulysses_degrees_that_cannot_work_are_refused(changes, message):
    assert any(message in line for line in errors_of(run_with(**changes))), errors_of(
        run_with(**changes))


def test_auto_ulysses_validates_and_counts_as_one_until_planned():
    data = run_with(**{"stages.0.ulysses_degree": "auto"})
    run = validate_data(data, RunSpec, source="run.yaml")
    assert run.stages[0].ulysses_degree == "auto"
    assert "2u? x 1" in run.summary() and "ulysses_degree auto" in run.summary()


def test_a_ulysses_degree_above_the_kv_heads_says_they_are_replicated():
    from topology.run_plan import plan_from_workers

    data = run_with(**{"resources.workers": 16, "stages.0.ulysses_degree": 8})
    run = validate_data(data, RunSpec, source="run.yaml")
    stage = plan_from_workers({"n0": 16}, run).stage(run.stages[0].name)
    assert ("ulysses 8 exceeds the 4 key/value heads: each is replicated 2 times"
            in " ".join(stage.notes))


def test_ringpilot_tasks_old_names_are_refused_with_the_new_ones():
    from specs.run import EvalSpec

    with pytest.raises(ValueError, match=r"renamed: niah -> niah_lite, vt -> vt_lite\. These "
                       "are ringpilot's own RULER-style tasks, not RULER's"):
        EvalSpec(tasks=["passkey", "niah", "vt"])
    assert EvalSpec(tasks=["passkey", "niah_lite"]).tasks == ["passkey", "niah_lite"]


def test_every_task_name_is_accepted_and_kamradt_is_pointed_to_its_section():
    from specs.eval_tasks import SPEC_TASKS
    from specs.run import EvalSpec

    assert EvalSpec(tasks=list(SPEC_TASKS)).tasks == list(SPEC_TASKS)
    with pytest.raises(ValueError, match=r"niah_kamradt is not listed here: it runs when "
                       r"eval\.kamradt gives its haystack"):
        EvalSpec(tasks=["passkey", "niah_kamradt"])


def test_observability_defaults_to_tensorboard_only_and_bad_sinks_name_the_field():
    obs = RunSpec.model_validate(TINY).observability
    assert (obs.tensorboard, obs.mlflow, obs.wandb, obs.prometheus) == (True, None, None, False)
    [line] = errors_of(run_with(observability={"mlflow": {"tracking_uri": "sqlite:///m.db"}}))
    assert line.startswith("observability.mlflow.tracking_uri: ") and "file:///" in line
    [line] = errors_of(run_with(observability={"wandb": {"mode": "cloud"}}))
    assert line.startswith("observability.wandb.mode: ") and "'offline' or 'online'" in line
    [line] = errors_of(run_with(observability={"grafana": True}))
    assert "observability.grafana" in line


def test_stages_default_to_causal_attention_and_continuous_positions():
    """Existing runs keep their meaning: no stage of a shipped config masks documents."""
    for name in ("tiny.yaml", "tiny-prepared.yaml", "llama3-8b-1m.yaml"):
        run = load_model(ROOT / "configs" / name, RunSpec)
        assert {(s.attention, s.position_ids) for s in run.stages} == {("causal", "continuous")}
        assert "packed documents" not in run.summary()


def test_document_attention_is_a_stage_choice_shown_in_the_summary():
    run = RunSpec.model_validate(run_with(**{
        "stages.1.attention": "document", "stages.2.attention": "document",
        "stages.2.position_ids": "per_document"}))
    assert [(s.attention, s.position_ids) for s in run.stages] == [
        ("causal", "continuous"), ("document", "continuous"), ("document", "per_document"),
        ("causal", "continuous")]
    assert ("attention over packed documents: s256 document; s1k document, positions per "
            "document (the other stages: causal)") in run.summary()


@pytest.mark.parametrize("changes, message", [
    ({"stages.1.position_ids": "per_document"},
     r"^stages\[1\]: position_ids per_document needs attention: document: with causal "
     r"attention a token also sees the earlier documents, .*; set attention: document, or "
     r"position_ids: continuous"),
    ({"stages.0.attention": "varlen"},
     r"^stages\[0\]\.attention: Input should be 'causal' or 'document' \(got 'varlen'"),
    ({"stages.0.position_ids": "reset"},
     r"^stages\[0\]\.position_ids: Input should be 'continuous' or 'per_document' \(got "
     r"'reset'"),
])
def test_attention_choices_that_cannot_work_are_one_clear_error(changes, message):
    lines = errors_of(run_with(**changes))
    assert len(lines) == 1, lines
    assert __import__("re").search(message, lines[0]), lines[0]
