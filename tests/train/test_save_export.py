"""Saving at scale (issue 33): every checkpoint is DCP shards and small files, the stage's final
one also a Hugging Face export written by every rank; evaluators read either, a resume only DCP,
and the trainer's save never gathers the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from ray_jobs.eval.model import load_checkpoint
from ray_jobs.ring_attention.rope import apply_exact_rope
from ray_jobs.train import checkpoint as ckpt
from ray_jobs.train.checkpoint import EXPORT_SHARDS_DIR, export_file_index
from specs.checkpoint import CheckpointError, check_checkpoint, export_files, has_export
from tests.support.eval_fixtures import build_tokenizer
from tests.support.worlds import run_world
from tests.train import lifecycle_worlds as lw

pytestmark = pytest.mark.multiprocess

FILE_BYTES = 40_000  # the tiny model's 170 kB in several files (the default is 5 GB)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(301).save_pretrained(path)
    return path


def _saved(tmp_path_factory, tokenizer_dir, layout, tied):
    run_dir = tmp_path_factory.mktemp("run")
    got = run_world(2, lw.save_intermediate_and_final, str(run_dir), str(tokenizer_dir), *layout,
                    tied, FILE_BYTES, timeout_s=180)
    return {step: {"path": Path(got[0][step]["path"]),
                   "state": {k: torch.from_numpy(v) for k, v in got[0][step]["state"].items()}}
            for step in (1, 2)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dir):
    """Two checkpoints of a tiny Llama saved by plain FSDP over 2 ranks: step 1, step 2 final."""
    return _saved(tmp_path_factory, tokenizer_dir, (1, 2, 2), tied=False)


@pytest.fixture(scope="module")
def saved_tied(tmp_path_factory, tokenizer_dir):
    """The same with tied embeddings, saved by a ring of 2 sharded over it."""
    return _saved(tmp_path_factory, tokenizer_dir, (2, 1, 2), tied=True)


def _assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str):
    assert sorted(got) == sorted(want), what
    for name, value in want.items():
        assert got[name].dtype == value.dtype, f"{what}: {name} is {got[name].dtype}"
        assert torch.equal(got[name], value), f"{what}: {name} differs"


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _reference(state: dict[str, torch.Tensor], path: Path):
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(path)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    apply_exact_rope(model)  # the RoPE the trainer and every evaluator compute with
    return model.eval()


def test_an_intermediate_checkpoint_has_no_export_and_loads_in_an_evaluator_bitwise(saved):
    path, want = saved[1]["path"], saved[1]["state"]
    assert not list(path.rglob("*.safetensors")) and not has_export(path)
    assert {"config.json", "tokenizer.json", "dcp", "trainer_state", "COMMITTED"} <= {
        p.name for p in path.iterdir()}
    assert check_checkpoint(path) == path
    model, tok = load_checkpoint(path, "cpu", "float32")
    _assert_bitwise(_weights(model), want, "from DCP")
    # RoPE's buffer rebuilt (to_empty left it garbage): the logits are the unsharded model's
    ids = torch.tensor([tok("VAR A = 12.", add_special_tokens=False).input_ids])
    with torch.no_grad():
        got_logits = model(input_ids=ids).logits
        want_logits = _reference(want, path)(input_ids=ids).logits
    assert torch.equal(got_logits, want_logits)


def test_an_evaluator_on_cuda_of_a_bf16_run_reads_the_shards_in_bf16(saved, monkeypatch):
    import topology.eval_plan

    # load_arguments asks eval_dtype; make this CPU machine answer as CUDA would for a bf16 run
    monkeypatch.setattr(topology.eval_plan, "eval_dtype", lambda compute, device: compute)
    model, _ = load_checkpoint(saved[1]["path"], "cpu", "bfloat16")
    want = {k: v.to(torch.bfloat16) for k, v in saved[1]["state"].items()}
    _assert_bitwise(_weights(model), want, "from DCP in bf16")  # DCP's copy_ rounds as .to does
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_the_final_checkpoint_holds_the_export_in_several_files_with_an_index(saved):
    path, want = saved[2]["path"], saved[2]["state"]
    files = export_files(path)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                                       for i in range(1, len(files) + 1)]
    assert len(files) >= 3
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(want)
    assert set(index["weight_map"].values()) == {f.name for f in files}
    sizes = {k: v.numel() * 4 for k, v in want.items()}
    for f in files:  # at most FILE_BYTES of tensors each, unless one tensor is larger
        held = [k for k, name in index["weight_map"].items() if name == f.name]
        assert sum(sizes[k] for k in held) <= FILE_BYTES or len(held) == 1, f.name
    assert not (path / EXPORT_SHARDS_DIR).exists()  # the ranks' pieces are gone
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    hf = LlamaForCausalLM.from_pretrained(path, trust_remote_code=False)
    _assert_bitwise(_weights(hf), want, "from_pretrained")
    model, _ = load_checkpoint(path, "cpu", "float32")  # the evaluator takes the export
    _assert_bitwise(_weights(model), want, "evaluator on the export")


def test_the_export_fills_another_layout_bitwise_through_load_hf_weights(saved):
    # saved by plain FSDP over 2 ranks; read by a ring of 2 sharded over it, and by HSDP
    for layout in ((2, 1, 2), (1, 2, 1)):
        got = run_world(2, lw.load_export_sharded, *layout, str(saved[2]["path"]),
                        timeout_s=120)
        _assert_bitwise({k: torch.from_numpy(v) for k, v in got[0].items()},
                        saved[2]["state"], f"load_hf_weights into {layout}")


def test_tied_embeddings_are_exported_once_and_read_back_tied(saved_tied):
    path, want = saved_tied[2]["path"], saved_tied[2]["state"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # as save_pretrained stores them
    hf = LlamaForCausalLM.from_pretrained(path, trust_remote_code=False)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    _assert_bitwise(_weights(hf), want, "tied from_pretrained")
    got = run_world(1, lw.load_export_sharded, 1, 1, 1, str(path), timeout_s=120)[0]
    _assert_bitwise({k: torch.from_numpy(v) for k, v in got.items()}, want, "tied HF load")
    model, _ = load_checkpoint(saved_tied[1]["path"], "cpu", "float32")  # and from DCP
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_bitwise(_weights(model), saved_tied[1]["state"], "tied from DCP")


def test_a_resume_reads_only_the_dcp_shards_never_the_export(saved, tmp_path):
    run = tmp_path / "run" / "checkpoints" / "s"
    copy = Path(shutil.copytree(saved[2]["path"], run / saved[2]["path"].name))
    for f in export_files(copy):  # an export that cannot be read: a resume must not need it
        f.write_bytes(b"not a safetensors file")
    got = run_world(2, lw.resume_weights, 2, 1, 2, str(copy), False, timeout_s=120)
    _assert_bitwise({k: torch.from_numpy(v) for k, v in got[0].items()}, saved[2]["state"],
                    "resumed")


def test_the_trainers_save_never_gathers_the_full_state():
    source = Path(ckpt.__file__).read_text()
    assert "full_state_dict" not in source and "save_pretrained(staged, state_dict" not in source


def test_a_trainer_checkpoint_without_weights_is_one_clear_error(saved, tmp_path):
    copy = Path(shutil.copytree(saved[1]["path"], tmp_path / "step-000001"))
    shutil.rmtree(copy / "dcp")
    with pytest.raises(CheckpointError, match=r"has no weights: neither \*\.safetensors .* nor "
                                              r"dcp/ .*evaluate another committed checkpoint"):
        check_checkpoint(copy)
    with pytest.raises(CheckpointError, match="has no weights"):
        load_checkpoint(copy)  # the evaluator checks before it builds anything


def test_shards_that_do_not_fit_the_config_are_one_clear_error(saved, tmp_path):
    copy = Path(shutil.copytree(saved[1]["path"], tmp_path / "step-000001"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"step-000001: its dcp/ shards do not fill the "
                                              r"model its config.json describes \(.*\); evaluate"):
        load_checkpoint(copy)


@settings(max_examples=150, deadline=1000)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=30), st.integers(1, 120))
def test_export_files_group_tensors_in_order_up_to_the_cap(sizes, cap):
    state = {f"t{i}": torch.empty(n, device="meta") for i, n in enumerate(sizes)}
    index = export_file_index(state, cap)
    numbers = list(index.values())
    assert list(index) == list(state) and numbers[0] == 1
    assert all(b - a in (0, 1) for a, b in zip(numbers, numbers[1:]))  # in order, none skipped
    for n in set(numbers):
        held = [sizes[i] * 4 for i, k in enumerate(index) if index[k] == n]
        assert sum(held) <= cap or len(held) == 1
    # and no two neighbouring files could have been one
    totals = [sum(sizes[i] * 4 for i, k in enumerate(index) if index[k] == n)
              for n in sorted(set(numbers))]
    firsts = [next(sizes[i] * 4 for i, k in enumerate(index) if index[k] == n)
              for n in sorted(set(numbers))]
    assert all(t + f > cap for t, f in zip(totals, firsts[1:]))
