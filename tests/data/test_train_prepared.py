"""Training from prepared shards on a local Ray cluster: the driver's preflight prepares the
missing data (a Ray Data job) before any worker starts, the workers read it by address, and a
changed input afterwards is refused before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ray_jobs.data.prepared import MANIFEST
from ray_jobs.data.samples import SampleStream
from ray_jobs.data.tokenizer import build_tokenizer
from ray_jobs.train.driver import main
from specs.checkpoint import final_checkpoint, read_state
from specs.ledger import Ledger
from specs.loading import load_model
from specs.plan import Plan
from specs.run import RunSpec
from tests.data.corpus import documents, write_jsonl
from tests.train.conftest import mini_spec, write_spec

pytestmark = pytest.mark.ray
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_train_from_prepared_shards(tmp_path, local_ray, capsys):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", documents(1, 40))
    write_jsonl(tmp_path / "corpus" / "b.jsonl", documents(2, 40))
    spec = mini_spec(tmp_path / "runs", **{"data.mix": {"documents": 0.75, "passkey": 0.25,
                                                        "kv_retrieval": 0}})
    spec["stages"] = spec["stages"][:1]
    spec["stages"][0]["steps"] = 3
    spec["storage"]["checkpoint_every"] = 3
    spec["data"]["prepared"] = {"path": "prepared", "shard_tokens": 2048,
                                "sources": [{"name": "web", "paths": ["corpus/*.jsonl"]}]}
    path = write_spec(tmp_path / "run.yaml", spec)
    assert main(["--run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "data.prepared: nothing prepared at" in out and "prepare: stage" not in out
    manifest = json.loads((tmp_path / "prepared" / MANIFEST).read_text())
    assert manifest["stages"]["s64"]["sequences"] > 6
    run_dir = tmp_path / "runs" / "mini"
    assert Ledger(run_dir).read().stages["s64"].state == "done"
    # the workers trained on the samples the addresses name, document ones among them
    run = load_model(path, RunSpec)
    stream = SampleStream(run, 0, build_tokenizer(run, run_dir), spec_dir=tmp_path)
    records = [json.loads(x) for x in (run_dir / "metrics" / "s64.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in records] == [
        [f"0:s64:{step}:0:{i}" for i in range(2)] for step in range(3)]
    kinds = [stream.sample(step, 0, i).kind for step in range(3) for i in range(2)]
    assert "documents" in kinds

    write_jsonl(tmp_path / "corpus" / "b.jsonl", documents(3, 40))
    assert main(["--run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot start" in err and "input changed:" in err and "Traceback" not in err


def test_chat_and_web_corpus_trains_through_document_masking(tmp_path, local_ray, capsys):
    """configs/tiny-prepared.yaml's chat + web corpus on local Ray, its long stage under
    attention: document with per-document positions (a short causal stage first): the loss
    falls, and plan.json and the checkpoints' state say which stage trained how."""
    spec = yaml.safe_load((CONFIGS / "tiny-prepared.yaml").read_text())
    spec["name"] = "docmask"
    short, long = spec["stages"][:2]
    spec["stages"] = [{**short, "steps": 4, "batch_size": 4, "warmup_steps": 0},
                      {**long, "steps": 10, "batch_size": 2, "lr": 2e-3,
                       "attention": "document", "position_ids": "per_document"}]
    prepared = spec["data"]["prepared"]
    prepared["path"] = str(tmp_path / "prepared")
    for source in prepared["sources"]:
        source["paths"] = [str(CONFIGS / p) for p in source["paths"]]
    spec["data"]["mix"] = {"documents": 0.75, "passkey": 0.25}
    spec["eval"] = {"enabled": False}
    spec["storage"] = {"path": str(tmp_path / "runs"), "checkpoint_every": 10, "keep_last": 1}
    spec["failure"]["report_every"] = 5
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["--run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[s256] seq_len 256, rope theta 10,000, attention document, positions per " \
           "document; starting" in out
    assert "[s64] seq_len 64, rope theta 10,000; starting" in out

    run_dir = tmp_path / "runs" / "docmask"
    plan = Plan.model_validate_json((run_dir / "plan.json").read_text())
    assert [(s.name, s.attention, s.position_ids) for s in plan.stages] == [
        ("s64", "causal", "continuous"), ("s256", "document", "per_document")]
    ledger = Ledger(run_dir)
    states = {name: read_state(final_checkpoint(ledger, name)) for name in ("s64", "s256")}
    assert (states["s64"].attention, states["s64"].position_ids) == ("causal", "continuous")
    assert (states["s256"].attention, states["s256"].position_ids) == ("document",
                                                                       "per_document")
    assert states["s256"].attention_kernel.startswith("torch-cpu-flash")
    losses = states["s256"].losses
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    # rows of several documents were trained on (the masking had something to mask)
    run = load_model(path, RunSpec)
    stream = SampleStream(run, 1, build_tokenizer(run, run_dir), spec_dir=tmp_path)
    assert max(len(stream.document_starts(step, 0, i)) for step in range(10)
               for i in range(2)) > 1
