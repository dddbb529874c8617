"""The checkpoint format: names parse back, the trainer state round-trips, bad folders fail."""

from __future__ import annotations

import json
import math

import pytest

from specs.checkpoint import (
    STATE_DIR,
    CheckpointError,
    CheckpointPlace,
    TrainerState,
    check_checkpoint,
    checkpoint_dir,
    eval_dir,
    final_checkpoint,
    is_trainer_checkpoint,
    locate,
    parse_checkpoint_name,
    parse_staging_name,
    read_state,
    staging_dir,
    write_state,
)
from specs.ledger import Ledger, mark_committed


def _written(path, **state) -> None:
    (path / STATE_DIR).mkdir(parents=True)
    write_state(path, TrainerState(**state))


def test_a_checkpoint_path_locates_back_to_its_run_stage_and_step(tmp_path):
    path = checkpoint_dir(tmp_path / "run", "s1k", 60)
    assert path == tmp_path / "run/checkpoints/s1k/step-000060"
    assert locate(path) == CheckpointPlace(tmp_path / "run", "s1k", 60)
    assert eval_dir(*locate(path)) == tmp_path / "run/eval/s1k/step-000060"
    assert locate(checkpoint_dir("r", "s", 1_234_567)).step == 1_234_567
    assert locate(tmp_path / "my-llama") is None
    assert locate(tmp_path / "elsewhere/s1k/step-000060") is None  # not under checkpoints/
    assert parse_checkpoint_name("step-12") is None and parse_checkpoint_name("step-x") is None
    staged = staging_dir(path, 3)
    assert staged.parent == path.parent
    assert parse_staging_name(staged.name) == ("step-000060", 3)
    assert parse_staging_name("step-000060") is None


def test_trainer_state_round_trips_even_a_diverged_loss(tmp_path):
    state = TrainerState(stage="s64", stage_index=0, step=3, losses=[2.5, math.inf, math.nan],
                         parts_seconds={"optimizer": 0.5}, ring_degree=2)
    _written(tmp_path, **state.model_dump())
    back = read_state(tmp_path)
    assert back.losses[:2] == [2.5, math.inf] and math.isnan(back.losses[2])
    assert back.model_dump(exclude={"losses"}) == state.model_dump(exclude={"losses"})
    assert is_trainer_checkpoint(tmp_path) and not is_trainer_checkpoint(tmp_path / "x")


def test_a_bad_trainer_state_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"state.json does not exist: .* is not a "
                       "checkpoint the trainer wrote"):
        read_state(tmp_path)
    (tmp_path / STATE_DIR).mkdir()
    state = tmp_path / STATE_DIR / "state.json"
    state.write_text('{"stage": "s", "stage_index": 0, "step": 1, "learning_rate": 3}')
    with pytest.raises(CheckpointError, match=r"not a trainer state: learning_rate: Extra "
                       "inputs are not permitted; it is written by the trainer"):
        read_state(tmp_path)
    state.write_text('{"stage": "s", "stage_index": 0, "step": -1}')
    with pytest.raises(CheckpointError, match=r"step: Input should be greater than or equal"):
        read_state(tmp_path)
    state.write_text('{"stage": "s", "step"')
    with pytest.raises(CheckpointError, match=r"cannot read the trainer state .*damaged"):
        read_state(tmp_path)


def test_final_checkpoint_is_the_ledgers_final_one_still_committed(tmp_path):
    ledger = Ledger(tmp_path, "r")
    assert final_checkpoint(ledger, "s64") is None
    for step, final in ((2, False), (4, True)):
        path = checkpoint_dir(tmp_path, "s64", step)
        path.mkdir(parents=True)
        mark_committed(path)
        ledger.commit_checkpoint("s64", step, path, final=final)
    assert final_checkpoint(ledger, "s64") == checkpoint_dir(tmp_path, "s64", 4)
    (checkpoint_dir(tmp_path, "s64", 4) / "COMMITTED").unlink()
    assert final_checkpoint(ledger, "s64") is None  # step 2 is not final


def test_evaluable_folders_are_committed_checkpoints_or_plain_hf_models(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (plain / f).write_text(json.dumps({}))
    assert check_checkpoint(plain) == plain
    ours = checkpoint_dir(tmp_path, "s", 1)
    ours.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json"):
        (ours / f).write_text(json.dumps({}))
    (ours / "dcp").mkdir()  # its weights (an intermediate checkpoint has no export)
    _written(ours, stage="s", stage_index=0, step=1)
    with pytest.raises(CheckpointError, match="is incomplete: it has trainer_state/ but no "
                       "COMMITTED marker"):
        check_checkpoint(ours)
    mark_committed(ours)
    assert check_checkpoint(ours) == ours
    (ours / "config.json").unlink()
    with pytest.raises(CheckpointError, match="lacks config.json; it must be a Hugging Face"):
        check_checkpoint(ours)


def test_trainer_state_records_the_attention_and_old_states_read_causal(tmp_path):
    """state.json says what a stage trained with; one written before the choice existed
    (no attention key) reads causal and continuous, as it trained."""
    _written(tmp_path / "new", stage="s1k", stage_index=2, step=5, attention="document",
             position_ids="per_document")
    back = read_state(tmp_path / "new")
    assert (back.attention, back.position_ids) == ("document", "per_document")
    doc = json.loads((tmp_path / "new" / STATE_DIR / "state.json").read_text())
    assert (doc["attention"], doc["position_ids"]) == ("document", "per_document")
    (tmp_path / "old" / STATE_DIR).mkdir(parents=True)
    (tmp_path / "old" / STATE_DIR / "state.json").write_text(
        '{"stage": "s64", "stage_index": 0, "step": 3}')
    old = read_state(tmp_path / "old")
    assert (old.attention, old.position_ids) == ("causal", "continuous")
