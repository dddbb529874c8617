"""The trust boundary (specs/trust.py): a checkpoint carrying code is refused by every loader and
its code never runs; a DCP checkpoint others could have written is refused before it unpickles."""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import pickle
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException

from ray_jobs.eval.lm_eval import adapter, ruler
from ray_jobs.eval.lm_eval.__main__ import main as ruler_main
from ray_jobs.eval.model import load_checkpoint as eval_load
from ray_jobs.eval.retrieval import retrieval_scores
from ray_jobs.train import checkpoint as train_ckpt
from ray_jobs.train.model import build_model
from specs import trust
from specs.checkpoint import CheckpointError, checkpoint_dir, dcp_dir, scheduler_file
from specs.run import RunSpec
from specs.trust import TrustError, check_checkpoint_is_data, check_run_dir
from tests.support import eval_fixtures as fixtures
from tests.train.conftest import mini_spec

EVIL_MODULE = "evil_tokenizer"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunSpec:
    return RunSpec.model_validate(mini_spec(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A tiny committed checkpoint, as the trainer writes it: data only."""
    tok = fixtures.build_tokenizer(300)
    model = fixtures.build_tiny_model(len(tok), 256)
    return fixtures.save_checkpoint(model, tok, tmp_path_factory.mktemp("plain") / "step-000001")


def plant_code(checkpoint: Path, marker: Path) -> None:
    """What a hostile checkpoint ships: a tokenizer module that writes `marker` when imported,
    and a tokenizer_config.json whose auto_map makes AutoTokenizer import it."""
    (checkpoint / f"{EVIL_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [f"{EVIL_MODULE}.EvilTokenizer"] * 2}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture
def hostile(plain, tmp_path) -> tuple[Path, Path]:
    """(a copy of `plain` with planted code, the marker that code writes)."""
    path = shutil.copytree(plain, tmp_path / "checkpoints" / "s" / "step-000001")
    marker = tmp_path / "MARKER"
    plant_code(path, marker)
    return path, marker


def test_the_planted_code_really_writes_the_marker(hostile, tmp_path):
    """The fixture is live: importing the shipped module (what AutoTokenizer with
    trust_remote_code=True does) writes the marker, so its absence below means something."""
    path, marker = hostile
    spec = importlib.util.spec_from_file_location("planted", path / f"{EVIL_MODULE}.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert marker.read_text() == "code ran"


def _refused(call, marker: Path, *match: str) -> TrustError:
    with pytest.raises(TrustError) as info:
        call()
    for text in match:
        assert text in str(info.value)
    assert not marker.exists(), "the checkpoint's code ran"
    return info.value


def test_training_refuses_a_checkpoint_with_code(run, hostile):
    path, marker = hostile
    _refused(lambda: build_model(run, 0, path, seed=0, attn_implementation="sdpa"), marker,
             f"{EVIL_MODULE}.py", "never runs code")
    by_model_path = run.model_copy(update={"model": run.model.model_copy(
        update={"path": str(path)})})
    _refused(lambda: build_model(by_model_path, 0, None, seed=0, attn_implementation="sdpa"),
             marker, "a Python file in a checkpoint")


def test_evaluators_refuse_a_checkpoint_with_code(hostile):
    path, marker = hostile
    _refused(lambda: eval_load(path), marker, f"{EVIL_MODULE}.py")
    _refused(lambda: retrieval_scores(path, 64, samples=1), marker, f"{EVIL_MODULE}.py")
    _refused(lambda: adapter.register_backend()(pretrained=str(path)), marker)


def test_ruler_backend_refuses_a_checkpoint_with_code(hostile, capsys):
    path, marker = hostile
    _refused(lambda: ruler.prepare_tasks(path, ["ruler_vt"], [128]), marker, f"{EVIL_MODULE}.py")
    _refused(lambda: ruler.prepare_tasks_cached(path, ["ruler_vt"], [128]), marker)
    _refused(lambda: ruler.run_ruler(path, ["ruler_vt"], [128], path.parent / "out"), marker)
    code = ruler_main(["--checkpoint", str(path), "--tasks", "ruler_vt", "--lengths", "128"])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and f"{EVIL_MODULE}.py" in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_eval_cli_refuses_a_checkpoint_with_code(hostile, capsys):
    from ray_jobs.eval.cli import main as eval_main

    path, marker = hostile
    code = eval_main(["--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "never runs code" in err
    assert not marker.exists()


@pytest.mark.parametrize("file, key", [
    ("tokenizer_config.json", "auto_map"),
    ("config.json", "auto_map"),
    ("config.json", "custom_pipelines"),
    ("generation_config.json", "auto_map"),
    ("preprocessor_config.json", "auto_map"),
])
def test_any_config_naming_code_is_refused_even_without_a_py_file(plain, tmp_path, file, key):
    """auto_map may name code on the Hub (`repo--module.Class`): no local file needed."""
    path = shutil.copytree(plain, tmp_path / "m")
    doc = json.loads((path / file).read_text()) if (path / file).is_file() else {}
    doc[key] = {"AutoConfig": "someone/repo--module.Config"}
    (path / file).write_text(json.dumps(doc))
    err = _refused(lambda: check_checkpoint_is_data(path), tmp_path / "none", file, f"`{key}`")
    assert f"remove `{key}` from {file}" in str(err)


def test_code_nested_anywhere_is_refused(plain, tmp_path):
    path = shutil.copytree(plain, tmp_path / "m")
    (path / "trainer_state" / "deep").mkdir()
    (path / "trainer_state" / "deep" / "helper.pyc").write_bytes(b"\0")
    _refused(lambda: check_checkpoint_is_data(path), tmp_path / "none", "helper.pyc")
    (path / "trainer_state" / "deep" / "helper.pyc").unlink()
    config = json.loads((path / "config.json").read_text())
    config["text_config"] = {"layers": [{"auto_map": {"AutoModel": "x.Y"}}]}
    (path / "config.json").write_text(json.dumps(config))
    err = _refused(lambda: check_checkpoint_is_data(path), tmp_path / "none",
                   "`text_config.layers[0].auto_map`", "remove `auto_map` from config.json")
    config["text_config"] = {"a\nb" * 200: {"custom_pipelines": {}}}  # a hostile key: one line
    (path / "config.json").write_text(json.dumps(config))
    err = _refused(lambda: check_checkpoint_is_data(path), tmp_path / "none", "\\nb.custom_")
    assert "\n" not in str(err) and len(str(err)) < 700


def test_unreadable_configs_are_one_clear_error(plain, tmp_path):
    path = shutil.copytree(plain, tmp_path / "m")
    (path / "config.json").write_text("[" * 20_000 + "]" * 20_000)  # the recursion bomb
    _refused(lambda: check_checkpoint_is_data(path), tmp_path / "none", "config.json",
             "not JSON a loader could read")
    (path / "config.json").write_bytes(b"\xff\xfe binary")
    _refused(lambda: check_checkpoint_is_data(path), tmp_path / "none", "not UTF-8")
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint_is_data(tmp_path / "nowhere")


def test_the_plain_checkpoint_still_loads_everywhere(run, plain):
    assert check_checkpoint_is_data(plain) == plain
    assert check_checkpoint_is_data(plain / "tokenizer.json") == plain  # a file: its folder
    model = build_model(run.model_copy(update={"model": run.model.model_copy(update={
        "path": str(plain), "vocab_size": 300})}), 0, None, seed=0, attn_implementation="sdpa")
    loaded, tokenizer = eval_load(plain)
    assert torch.equal(model.lm_head.weight, loaded.lm_head.weight)
    assert tokenizer.eos_token == "<|eos|>"


def test_lm_eval_only_sees_a_code_free_copy_of_ringpilots_tokenizer(plain, monkeypatch):
    """lm-eval's RULER generators load `tokenizer` from the task metadata with
    AutoTokenizer.from_pretrained(..., trust_remote_code=True): they get a private folder with
    only the tokenizer ringpilot loaded, never the checkpoint's path."""
    from transformers import AutoTokenizer

    seen = {}

    def capture_manager(names, metadata):
        seen["metadata"] = dict(metadata)
        return "manager"

    def inspect_folder(manager, names, tokenizer, lengths, data):
        folder = Path(seen["metadata"]["tokenizer"])
        seen["files"] = sorted(p.name for p in folder.iterdir())
        seen["mode"] = stat.S_IMODE(folder.parent.stat().st_mode)
        theirs = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)  # lm-eval's
        text = "One of the special magic numbers for tidy-lamp is: 4821."
        seen["same_ids"] = theirs(text).input_ids == tokenizer(text).input_ids
        seen["folder"] = folder
        return {}, {}

    monkeypatch.setattr(ruler, "_task_manager", capture_manager)
    monkeypatch.setattr(ruler, "_load_tasks", inspect_folder)
    ruler.prepare_tasks(plain, ["ruler_vt"], [128])
    assert set(seen["metadata"]) == {"max_seq_lengths", "tokenizer"}
    assert str(plain) not in json.dumps(seen["metadata"])
    assert seen["files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert seen["mode"] == 0o700 and seen["same_ids"]
    assert not seen["folder"].exists()  # removed once the data were generated


def test_tokenizer_folder_drops_auto_map_even_if_the_tokenizer_kept_one(plain, tmp_path):
    from ray_jobs.data.tokenizer import load_tokenizer

    tok = load_tokenizer(plain)
    tok.init_kwargs["auto_map"] = {"AutoTokenizer": ["x.Y", "x.Y"]}
    folder = ruler.tokenizer_folder(tok, tmp_path)
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())
    again = ruler.tokenizer_folder(tok, tmp_path)  # lm-eval caches by path: the digest names it
    assert folder.name.rsplit("-", 1)[1] == again.name.rsplit("-", 1)[1] and folder != again


# -- DCP: pickle, guarded by ownership and permissions ---------------------------------------

class _Payload:
    """A pickle that runs code when loaded: what a tampered DCP .metadata can be."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",)


def _trainer_checkpoint(run_dir: Path):
    """(checkpoint path, model, optimizer, scheduler): one DCP save of a tiny model in this
    process, laid out as the trainer lays it out."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = checkpoint_dir(run_dir, "s64", 3)
    model_sd, optim_sd = get_state_dict(model, opt)
    torch.distributed.checkpoint.save({"model": model_sd, "optim": optim_sd},
                                      checkpoint_id=dcp_dir(path))
    scheduler_file(path).parent.mkdir(parents=True)
    torch.save(sched.state_dict(), scheduler_file(path))
    for p in [run_dir, *run_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path, model, opt, sched


@pytest.fixture
def saved(tmp_path):
    return _trainer_checkpoint(tmp_path / "run")


def _fresh():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_an_own_checkpoint_loads(saved):
    path, model, _, _ = saved
    fresh, opt, sched = _fresh()
    train_ckpt.load_checkpoint(path, fresh, opt, sched)
    assert torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize("where", ["run", "checkpoints", "stage", "checkpoint", "dcp",
                                   "dcp/.metadata", "trainer_state/scheduler.pt"])
@pytest.mark.parametrize("bits", [stat.S_IWOTH, stat.S_IWGRP])
def test_a_writable_by_others_run_dir_is_refused_before_dcp_unpickles(saved, tmp_path, where,
                                                                      bits):
    path, _, _, _ = saved
    marker = tmp_path / "MARKER"
    (dcp_dir(path) / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    target = {"run": tmp_path / "run", "checkpoints": path.parent.parent, "stage": path.parent,
              "checkpoint": path}.get(where, path / where)
    target.chmod(stat.S_IMODE(target.stat().st_mode) | bits)
    fresh, opt, sched = _fresh()
    err = _refused(lambda: train_ckpt.load_checkpoint(path, fresh, opt, sched), marker,
                   str(target), "chmod -R go-w")
    assert ("everyone" if bits == stat.S_IWOTH else "its group") in str(err)
    # with the permissions fixed the file is this user's own, and trusted as such: DCP
    # unpickles it, which is why the check above is what stands between a writer and the trainer
    target.chmod(stat.S_IMODE(target.stat().st_mode) & ~bits)
    with pytest.raises(CheckpointException):  # what it unpickled is no DCP Metadata
        train_ckpt.load_checkpoint(path, fresh, opt, sched)
    assert marker.read_text() == "unpickled"


def test_a_checkpoint_owned_by_someone_else_is_refused(saved, monkeypatch):
    path, _, _, _ = saved
    metadata = dcp_dir(path) / ".metadata"
    owner = metadata.stat().st_uid
    if owner == 0:  # the tests run as root, whose files are trusted: hand this one to a user
        os.chown(metadata, 4242, -1)
        owner = 4242
    monkeypatch.setattr(trust.os, "getuid", lambda: owner + 1)  # and we are someone else
    with pytest.raises(TrustError, match=rf"owned by uid {owner}, not by this user "
                                         rf"\(uid {owner + 1}\) or root.*chown -R {owner + 1}"):
        check_run_dir(path)


def test_root_owned_files_are_accepted(saved, tmp_path, monkeypatch):
    """A shard that is a link to a file root owns (and only root can write) is accepted: here
    /etc/passwd stands in for a read-only dataset mounted by the administrator."""
    path, _, _, _ = saved
    assert Path("/etc/passwd").stat().st_uid == 0
    (dcp_dir(path) / "from_root").symlink_to("/etc/passwd")
    me = os.stat(path).st_uid
    if me == 0:  # the tests run as root: make the run someone else's, so root is not "us"
        me = 4242
        for p in [tmp_path / "run", *(tmp_path / "run").rglob("*")]:
            os.chown(p, me, -1, follow_symlinks=False)
    monkeypatch.setattr(trust.os, "getuid", lambda: me)
    assert check_run_dir(path) == path


def test_a_symlinked_shard_is_checked_where_it_points(saved, tmp_path):
    path, _, _, _ = saved
    outside = tmp_path / "elsewhere.distcp"
    shard = next(dcp_dir(path).glob("*.distcp"))
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    check_run_dir(path)
    outside.chmod(0o666)
    with pytest.raises(TrustError, match=r"\.distcp: a file of the checkpoint is writable by its "
                                         "group and everyone"):
        check_run_dir(path)


def test_a_symlinked_dcp_folder_is_walked_into(saved, tmp_path):
    path, _, _, _ = saved
    outside = tmp_path / "shared-dcp"
    shutil.move(dcp_dir(path), outside)
    dcp_dir(path).symlink_to(outside, target_is_directory=True)
    check_run_dir(path)
    (outside / ".metadata").chmod(0o646)
    with pytest.raises(TrustError, match=r"dcp/\.metadata: a file of the checkpoint is writable "
                                         "by everyone"):
        check_run_dir(path)


def test_check_run_dir_of_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_run_dir(tmp_path / "checkpoints" / "s" / "step-000001")


def test_checks_are_fast_on_a_checkpoint_with_many_shards(plain, tmp_path):
    """A 4096-rank checkpoint: both checks walk it in well under a second."""
    path = shutil.copytree(plain, tmp_path / "run" / "checkpoints" / "s" / "step-000001")
    (path / "dcp").mkdir()
    for i in range(4096):
        (path / "dcp" / f"__{i}_0.distcp").write_bytes(b"")
    # CPU seconds of this process, not the wall clock: other processes on the shared cores
    # cannot make it look slow (a CI run beside benchmarks saw 1.14 s against the bound)
    start = time.process_time()
    check_checkpoint_is_data(path)
    check_run_dir(path)
    assert time.process_time() - start < 1.0


def test_a_tree_too_big_to_be_a_checkpoint_is_refused(plain, tmp_path, monkeypatch):
    path = shutil.copytree(plain, tmp_path / "m")
    monkeypatch.setattr(trust, "MAX_ENTRIES", 5)
    _refused(lambda: check_checkpoint_is_data(path), tmp_path / "none", "more than 5 files")


# -- fuzzing: the only outcomes are "data" or one TrustError ---------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["a", "auto_map", "custom_pipelines", "model_type", "x"]) | st.text(
            max_size=6), inner, max_size=4),
    max_leaves=20)


def _names_code(doc) -> bool:
    if isinstance(doc, dict):
        return any(k in trust.CODE_KEYS for k in doc) or any(map(_names_code, doc.values()))
    return isinstance(doc, list) and any(map(_names_code, doc))


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_json, name=st.sampled_from(["config.json", "tokenizer_config.json",
                                        "generation_config.json", "adapter_config.json"]))
def test_fuzz_configs_refused_exactly_when_they_name_code(doc, name):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / name).write_text(json.dumps(doc))
        try:
            check_checkpoint_is_data(d)
            refused = False
        except TrustError as e:
            assert name in str(e) and "\n" not in str(e)
            refused = True
        assert refused == _names_code(doc)


@settings(max_examples=150, deadline=2000)
@given(raw=st.binary(max_size=200))
def test_fuzz_config_bytes_are_data_or_one_trust_error(raw):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_bytes(raw)
        try:
            check_checkpoint_is_data(d)
        except TrustError as e:
            assert "config.json" in str(e)


def test_no_loader_in_ringpilot_trusts_remote_code():
    """Every from_pretrained ringpilot calls says trust_remote_code=False explicitly."""
    import ast

    root = Path(__file__).resolve().parents[1]
    missing = []
    for pkg in ("specs", "topology", "ray_jobs", "operators", "ringpilot"):
        for f in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "from_pretrained"):
                    kw = {k.arg: k.value for k in node.keywords}
                    value = kw.get("trust_remote_code")
                    if not (isinstance(value, ast.Constant) and value.value is False):
                        missing.append(f"{f.relative_to(root)}:{node.lineno}")
    assert not missing, f"from_pretrained without trust_remote_code=False: {missing}"
    assert sys.modules.get("transformers_modules") is None  # no dynamic module was imported


def test_the_train_command_refuses_a_model_path_with_code_before_starting(hostile, tmp_path,
                                                                          capsys):
    import yaml

    from ray_jobs.train.driver import main as train_main

    path, marker = hostile
    spec = mini_spec(tmp_path / "runs", **{"model.path": str(path)})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
    assert train_main(["--run", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot start" in err and f"model.path: {path / 'evil_tokenizer.py'}" in err
    assert "Traceback" not in err and not marker.exists()
    assert not (tmp_path / "runs" / spec["name"]).exists()  # a refused run leaves nothing
