"""Training from prepared shards on a local Ray cluster: the driver's preflight prepares the
missing data (a Ray Data job) before any worker starts, the workers read it by address, and a
changed input afterwards is refused before any worker starts."""

from __future__ import annotations

import json

import pytest

from ray_jobs.data.prepared import MANIFEST
from ray_jobs.data.samples import SampleStream
from ray_jobs.data.tokenizer import build_tokenizer
from ray_jobs.train.driver import main
from specs.ledger import Ledger
from specs.loading import load_model
from specs.run import RunSpec
from tests.data.corpus import documents, write_jsonl
from tests.train.conftest import mini_spec, write_spec

pytestmark = pytest.mark.ray


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
