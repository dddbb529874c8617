"""The preparation job (ray_jobs.data.prepare) and the trainer's reads of its output by address.

Most tests use the in-process engine (the same per-file function Ray Data runs in its tasks);
test_ray_data_matches_in_process runs it on Ray Data and compares byte for byte. The references
here tokenize document by document with the tokenizer, independently of the job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ray_jobs.data.prepare import check_prepared, prepare
from ray_jobs.data.prepared import MANIFEST, FeistelPermutation, PreparedCorpus, PrepareError
from ray_jobs.data.samples import IGNORE, SampleStream, document_samples
from ray_jobs.data.tokenizer import build_tokenizer
from ray_jobs.ring_attention.ulysses import sequence_position_ids, sequence_shard
from specs.run import RunSpec
from tests.data.corpus import (
    conversations,
    documents,
    write_chat,
    write_jsonl,
    write_parquet,
    write_saved_dataset,
    write_txt,
)
from tests.train.conftest import mini_spec


def make_run(tmp: Path, sources: list[dict], mix: float = 1.0, **prepared) -> RunSpec:
    spec = mini_spec(tmp / "runs", **{"data.mix": {"documents": mix, "passkey": 1 - mix,
                                                   "kv_retrieval": 0}})
    spec["data"]["prepared"] = {"path": str(tmp / "prepared"), "sources": sources,
                                "dedup": False, "shard_tokens": 1024, **prepared}
    return RunSpec.model_validate(spec)


def stream_of(out: Path) -> tuple[np.ndarray, np.ndarray | None]:
    m = json.loads((out / MANIFEST).read_text())
    toks = np.concatenate([np.load(out / s["file"]) for s in m["shards"]])
    masks = (np.concatenate([np.load(out / s["mask"]) for s in m["shards"]])
             if m["has_mask"] else None)
    assert all(len(np.load(out / s["file"])) == s["tokens"] for s in m["shards"])
    return toks, masks


def quiet(_line: str) -> None:
    pass


@pytest.fixture
def corpus(tmp_path) -> dict:
    texts = {"jsonl": documents(1, 40), "parquet": documents(2, 25), "txt": documents(3, 6),
             "ds": documents(4, 12)}
    convs = conversations(5, 8)
    write_jsonl(tmp_path / "in" / "a.jsonl", texts["jsonl"][:20])
    write_jsonl(tmp_path / "in" / "b.jsonl", texts["jsonl"][20:], field="body")
    write_parquet(tmp_path / "in" / "c.parquet", texts["parquet"])
    write_txt(tmp_path / "in" / "txt", texts["txt"])
    write_saved_dataset(tmp_path / "in" / "saved", texts["ds"])
    write_chat(tmp_path / "in" / "chat.jsonl", convs)
    sources = [
        {"name": "web", "paths": ["in/a.jsonl", "in/c.parquet"]},
        {"name": "body", "paths": ["in/b.jsonl"], "field": "body"},
        {"name": "books", "paths": ["in/txt/*.txt"]},
        {"name": "saved", "paths": ["in/saved"]},
        {"name": "chat", "paths": ["in/chat.jsonl"], "kind": "chat", "field": "messages"},
    ]
    in_order = texts["jsonl"][:20] + texts["parquet"] + texts["jsonl"][20:] + texts["txt"] \
        + texts["ds"]
    return {"sources": sources, "texts": in_order, "convs": convs}


def test_stream_matches_reference_tokenization(tmp_path, corpus):
    """Every format, in input order: the stream is the documents' own tokens, each followed by
    EOS; the document starts are where they begin; chat labels cover exactly the assistant's
    messages (the plain template, the tokenizer here having none)."""
    run = make_run(tmp_path, corpus["sources"])
    manifest = prepare(run, tmp_path, run.run_dir, engine="local", log=quiet)
    tok = build_tokenizer(run, run.run_dir)
    eos = tok.eos_token_id
    ref, starts = [], []
    for text in corpus["texts"]:
        starts.append(len(ref))
        ref += tok(text, add_special_tokens=False)["input_ids"] + [eos]
    text_end = len(ref)
    assistant_texts = []
    for conv in corpus["convs"]:
        starts.append(len(ref))
        rendered = "".join(f"{m['role']}: {m['content']}\n" for m in conv)
        ref += tok(rendered, add_special_tokens=False)["input_ids"] + [eos]
        assistant_texts.append("".join(f" {m['content']}\n" for m in conv
                                       if m["role"] == "assistant"))
    toks, masks = stream_of(tmp_path / "prepared")
    assert toks.dtype == np.uint32 and toks.tolist() == ref
    assert manifest["total_tokens"] == len(ref) and len(manifest["shards"]) > 3
    assert np.load(tmp_path / "prepared" / "doc_starts.npy").tolist() == starts
    assert masks[:text_end].all()
    chat_starts = starts[len(corpus["texts"]):] + [len(ref)]
    for conv_text, lo, hi in zip(assistant_texts, chat_starts, chat_starts[1:]):
        trained = [t for t, m in zip(toks[lo:hi - 1], masks[lo:hi - 1]) if m]
        assert tok.decode(trained) == conv_text
    sources = {s["name"]: s for s in manifest["sources"]}
    assert sources["books"]["documents"] == 6 and sources["chat"]["documents"] == 8
    assert manifest["stages"]["s64"] == {"seq_len": 64, "sequences": len(ref) // 65}


@pytest.mark.ray
def test_ray_data_matches_in_process(tmp_path, corpus, local_ray):
    """Ray Data's parallel tasks give the same bytes as the in-process loop."""
    run = make_run(tmp_path, corpus["sources"], dedup=True)
    ray_manifest = prepare(run, tmp_path, run.run_dir, engine="ray", log=quiet)
    ray_tokens = stream_of(tmp_path / "prepared")
    prepare(run, tmp_path, run.run_dir, engine="local", force=True, log=quiet)
    local_tokens = stream_of(tmp_path / "prepared")
    assert ray_tokens[0].tolist() == local_tokens[0].tolist()
    assert ray_tokens[1].tolist() == local_tokens[1].tolist()
    assert [s["sha256"] for s in ray_manifest["shards"]] == [
        s["sha256"] for s in json.loads((tmp_path / "prepared" / MANIFEST).read_text())["shards"]]
    # bad input found inside a Ray Data task: the same one-line error, the old data kept
    with open(tmp_path / "in" / "b.jsonl", "a") as f:
        f.write('{"id": 99}\n')
    with pytest.raises(PrepareError, match=r"in/b\.jsonl:21: no 'body' field"):
        prepare(run, tmp_path, run.run_dir, engine="ray", log=quiet)
    assert stream_of(tmp_path / "prepared")[0].tolist() == local_tokens[0].tolist()
    assert not list(tmp_path.glob(".prepared*"))


def test_filters_dedup_weights_and_upsampling(tmp_path):
    texts = documents(7, 60, lo=2, hi=120)
    texts[10] = texts[3]  # two exact duplicates of doc 3
    texts[20] = texts[3]
    write_jsonl(tmp_path / "in" / "a.jsonl", texts[:30])
    write_jsonl(tmp_path / "in" / "b.jsonl", texts[30:])
    run = make_run(tmp_path, [{"name": "a", "paths": ["in/a.jsonl"], "weight": 1.0},
                              {"name": "b", "paths": ["in/b.jsonl"], "weight": 0.5}],
                   min_tokens=20, max_tokens=250, dedup=True,
                   upsample=[{"min_tokens": 100, "factor": 2.0},
                             {"min_tokens": 180, "factor": 3.0}])
    manifest = prepare(run, tmp_path, run.run_dir, engine="local", log=quiet)
    tok = build_tokenizer(run, run.run_dir)
    toks, _ = stream_of(tmp_path / "prepared")
    starts = np.load(tmp_path / "prepared" / "doc_starts.npy").tolist() + [len(toks)]
    seen = {}
    for lo, hi in zip(starts, starts[1:]):
        assert toks[hi - 1] == tok.eos_token_id
        key = tuple(toks[lo:hi - 1].tolist())
        seen[key] = seen.get(key, 0) + 1
    expected_a, kept_b, dropped_b = {}, 0, 0
    for i, text in enumerate(texts):
        ids = tuple(tok(text, add_special_tokens=False)["input_ids"])
        n = len(ids)
        if n < 20 or n > 250 or (i in (10, 20)):
            assert ids not in seen or i in (10, 20)
            continue
        bucket = 3.0 if n >= 180 else 2.0 if n >= 100 else 1.0
        if i < 30:  # weight 1: exactly the bucket's copies
            expected_a[ids] = int(bucket)
        else:  # weight 0.5: bucket 1 -> 0 or 1 copy; 2 -> 1; 3 -> 1 or 2
            got = seen.get(ids, 0)
            assert int(0.5 * bucket) <= got <= int(0.5 * bucket) + (bucket % 2 == 1)
            kept_b, dropped_b = kept_b + (got > 0), dropped_b + (got == 0)
    assert {k: seen[k] for k in expected_a} == expected_a
    assert any(v == 3 for v in expected_a.values()) and any(v == 2 for v in expected_a.values())
    assert kept_b > 0 and dropped_b > 0  # half-weight documents: some in, some out
    stats = {s["name"]: s for s in manifest["sources"]}
    assert stats["a"]["duplicates"] == 2
    assert stats["a"]["too_short"] + stats["b"]["too_short"] > 0
    assert stats["a"]["too_long"] + stats["b"]["too_long"] > 0
    # copies of a document are spread over passes, not adjacent in the stream
    for lo, hi, nxt in zip(starts, starts[1:], starts[2:]):
        assert toks[lo:hi].tolist() != toks[hi:nxt].tolist()


def test_rerun_is_idempotent_and_changes_are_named(tmp_path):
    write_jsonl(tmp_path / "in" / "a.jsonl", documents(1, 30))
    write_jsonl(tmp_path / "in" / "b.jsonl", documents(2, 30))
    run = make_run(tmp_path, [{"name": "web", "paths": ["in/*.jsonl"]}])
    first = prepare(run, tmp_path, run.run_dir, engine="local", log=quiet)
    shard = tmp_path / "prepared" / first["shards"][0]["file"]
    mtime = shard.stat().st_mtime_ns
    lines = []
    second = prepare(run, tmp_path, run.run_dir, engine="local", log=lines.append)
    assert second["key"] == first["key"] and "up to date" in lines[0]
    assert shard.stat().st_mtime_ns == mtime  # nothing rewritten
    os.utime(tmp_path / "in" / "a.jsonl")  # touched, same content: still up to date
    assert check_prepared(run, tmp_path, run.run_dir, log=quiet)["key"] == first["key"]

    write_jsonl(tmp_path / "in" / "b.jsonl", documents(3, 30))
    with pytest.raises(PrepareError, match=r"input changed: .*b\.jsonl.*rerun `python -m "
                       r"ray_jobs.prepare"):
        check_prepared(run, tmp_path, run.run_dir, log=quiet)
    other = make_run(tmp_path, [{"name": "web", "paths": ["in/*.jsonl"]}], min_tokens=5)
    with pytest.raises(PrepareError, match=r"setting 'min_tokens' changed \(1 -> 5\)"):
        check_prepared(other, tmp_path, run.run_dir, log=quiet)
    # another tokenizer: the one trained for a different vocabulary
    spec = run.model_dump(mode="json")
    spec["data"]["tokenizer"]["vocab_size"] = 300
    spec["name"] = "other"
    retok = RunSpec.model_validate(spec)
    with pytest.raises(PrepareError, match="the tokenizer changed"):
        check_prepared(retok, tmp_path, retok.run_dir, log=quiet)
    lines = []
    third = prepare(run, tmp_path, run.run_dir, engine="local", log=lines.append)
    assert "stale: input changed" in lines[0] and third["key"] != first["key"]
    assert not list(tmp_path.glob(".prepared*"))  # no temporary or old directories left


def test_trainer_reads_sequences_by_address(tmp_path, corpus):
    """A document sample is packed sequence perm(k) of its stage, the same whichever worker
    asks, in whichever batch split, and no sequence serves two samples of a stage."""
    run = make_run(tmp_path, corpus["sources"][:1], mix=0.7)
    run = run.model_copy(update={"stages": [run.stages[0].model_copy(
        update={"steps": 20, "batch_size": 4, "grad_accum_steps": 2})]})
    prepare(run, tmp_path, run.run_dir, engine="local", log=quiet)
    tok = build_tokenizer(run, run.run_dir)
    toks, _ = stream_of(tmp_path / "prepared")
    a, b = (SampleStream(run, 0, tok, spec_dir=tmp_path) for _ in range(2))  # b: after a resume
    used = []
    for step in range(20):
        for micro in range(2):
            whole = a.batch(step, micro, range(4))
            halves = [b.batch(step, micro, range(0, 2)), b.batch(step, micro, range(2, 4))]
            assert whole[0].tolist() == halves[0][0].tolist() + halves[1][0].tolist()
            assert whole[1].tolist() == halves[0][1].tolist() + halves[1][1].tolist()
            for i in range(4):
                s = a.sample(step, micro, i)
                if s.kind != "documents":
                    continue
                j = a.document_sequence(step, micro, i)
                used.append(j)
                assert s.input_ids.tolist() == toks[j * 65:j * 65 + 64].tolist()
                assert s.labels.tolist() == toks[j * 65 + 1:(j + 1) * 65].tolist()
    assert len(used) == document_samples(run, 0)[-1] > 40
    assert len(set(used)) == len(used)  # no sequence twice in the stage
    # a rank's shard read directly (prepared documents: only its positions) is its shard of the
    # whole batch, for rings and Ulysses groups of several sizes
    for ring, uly in ((1, 1), (2, 1), (4, 1), (2, 2), (1, 4)):
        for r in range(ring):
            for u in range(uly):
                pos = sequence_position_ids(64, r, ring, u, uly)
                for step in (0, 7):
                    whole = a.batch(step, 1, range(4))
                    part = b.batch(step, 1, range(4), pos)
                    for t, w in zip(part[:2], whole[:2]):
                        assert t.tolist() == sequence_shard(w, 1, r, ring, u, uly).tolist()


def test_chat_labels_only_assistant_tokens(tmp_path):
    write_chat(tmp_path / "chat.jsonl", conversations(9, 40))
    run = make_run(tmp_path, [{"name": "chat", "paths": ["chat.jsonl"], "kind": "chat",
                               "field": "messages"}])
    prepare(run, tmp_path, run.run_dir, engine="local", log=quiet)
    corpus = PreparedCorpus(tmp_path / "prepared")
    stream = SampleStream(run, 0, build_tokenizer(run, run.run_dir), spec_dir=tmp_path)
    s = stream.sample(0, 0, 0)
    j = stream.document_sequence(0, 0, 0)
    window = corpus.window(64, j)
    assert s.labels.tolist() == [t if m else IGNORE for t, m in
                                 zip(window.tokens[1:].tolist(), window.mask[1:])]
    assert 0 < (s.labels == IGNORE).sum() < 64
    pos = sequence_position_ids(64, 1, 2, 0, 1)  # a zigzag shard read alone keeps its labels
    part, whole = stream.batch(0, 0, range(2), pos), stream.batch(0, 0, range(2))
    assert part[1].tolist() == sequence_shard(whole[1], 1, 1, 2, 0, 1).tolist()


def test_feistel_is_a_permutation():
    for n in (1, 2, 3, 17, 1000, 4097):
        p = FeistelPermutation(n, 0, "x")
        assert sorted(p(i) for i in range(n)) == list(range(n))
    a, b = FeistelPermutation(1000, 0, "s1"), FeistelPermutation(1000, 0, "s2")
    assert [a(i) for i in range(20)] != [b(i) for i in range(20)]
    assert [a(i) for i in range(20)] != list(range(20))


@pytest.mark.parametrize("setup, source, message", [
    (lambda d: None, {"paths": ["in/*.jsonl"]},
     r"sources\[0\] \(web\): 'in/\*\.jsonl' matches no file"),
    (lambda d: (d / "in").mkdir() or (d / "in" / "e.jsonl").write_text(""),
     {"paths": ["in/e.jsonl"]}, r"in/e\.jsonl: is empty \(source web\)"),
    (lambda d: (d / "in").mkdir() or (d / "in" / "x.jsonl").write_bytes(
        b'{"text": "fine"}\n{"text": "caf\xe9"}\n'),
     {"paths": ["in/x.jsonl"]}, r"in/x\.jsonl:2: not UTF-8"),
    (lambda d: (d / "in").mkdir() or (d / "in" / "t.txt").write_bytes(b"ok\nok\n\xff\xfe"),
     {"paths": ["in/t.txt"]}, r"in/t\.txt:3: not UTF-8"),
    (lambda d: write_jsonl(d / "in" / "f.jsonl", ["a", "b", "c"], field="content"),
     {"paths": ["in/f.jsonl"]}, r"in/f\.jsonl:1: no 'text' field \(has \['content', 'id'\]\)"),
    (lambda d: (d / "in").mkdir() or (d / "in" / "j.jsonl").write_text('{"text": "a"}\n{oops\n'),
     {"paths": ["in/j.jsonl"]}, r"in/j\.jsonl:2: not valid JSON"),
    (lambda d: (d / "in").mkdir() or (d / "in" / "c.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "hi"}\n'),
     {"paths": ["in/c.jsonl"], "kind": "chat", "field": "messages"},
     r"in/c\.jsonl:2: 'messages' must be a non-empty list"),
    (lambda d: write_parquet(d / "in" / "p.parquet", ["a"], field="body"),
     {"paths": ["in/p.parquet"]}, r"in/p\.parquet: no column 'text' \(columns: \['body', 'n'\]"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, setup, source, message):
    setup(tmp_path)
    run = make_run(tmp_path, [{"name": "web", **source}])
    with pytest.raises(PrepareError, match=message):
        prepare(run, tmp_path, run.run_dir, engine="local", log=quiet)
    assert not (tmp_path / "prepared").exists() and not list(tmp_path.glob(".prepared*"))


def test_corpus_too_small_for_a_stage(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", documents(1, 3, lo=20, hi=30))
    run = make_run(tmp_path, [{"name": "web", "paths": ["a.jsonl"]}])
    prepare(run, tmp_path, run.run_dir, engine="local", log=quiet)
    total = json.loads((tmp_path / "prepared" / MANIFEST).read_text())["total_tokens"]
    with pytest.raises(PrepareError, match=rf"stage s64 needs 12 document sequences of 65 tokens "
                       rf"\(780 tokens\) but .* holds {total} tokens \({total // 65} sequences\)"):
        check_prepared(run, tmp_path, run.run_dir, log=quiet)


def test_chat_uses_the_tokenizers_template(tmp_path):
    """A tokenizer folder with chat_template.jinja: conversations are rendered with it and the
    trained-on tokens are exactly the assistant turns (content and end marker)."""
    convs = conversations(11, 12)
    write_chat(tmp_path / "chat.jsonl", convs)
    base = make_run(tmp_path, [{"name": "chat", "paths": ["chat.jsonl"], "kind": "chat",
                                "field": "messages"}])
    build_tokenizer(base, base.run_dir)
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(
        (base.run_dir / "tokenizer" / "tokenizer.json").read_bytes())
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}[end]"
        "{% endfor %}{% if add_generation_prompt %}[assistant]\n{% endif %}")
    spec = base.model_dump(mode="json")
    spec["data"]["tokenizer"]["path"] = str(folder)
    run = RunSpec.model_validate(spec)
    prepare(run, tmp_path, run.run_dir, engine="local", log=quiet)
    tok = build_tokenizer(run, run.run_dir)
    toks, masks = stream_of(tmp_path / "prepared")
    starts = np.load(tmp_path / "prepared" / "doc_starts.npy").tolist() + [len(toks)]
    for conv, lo, hi in zip(convs, starts, starts[1:]):
        assert tok.decode(toks[lo:hi - 1]) == "<s>" + "".join(
            f"[{m['role']}]\n{m['content']}[end]" for m in conv)
        trained = [t for t, m in zip(toks[lo:hi - 1], masks[lo:hi - 1]) if m]
        assert tok.decode(trained) == "".join(f"{m['content']}[end]" for m in conv
                                              if m["role"] == "assistant")


def test_small_corpus_documents_and_synthetic_samples_shard_alike(tmp_path):
    """data.documents (every worker tokenizes the files) and the synthetic tasks: a rank's
    positions give its shard of the whole batch, as for prepared documents."""
    (tmp_path / "d.txt").write_text(" ".join(documents(1, 30)))
    spec = mini_spec(tmp_path / "runs", **{"data.mix": {"documents": 0.5, "passkey": 0.5,
                                                        "kv_retrieval": 0}})
    spec["data"]["documents"] = [str(tmp_path / "d.txt")]
    run = RunSpec.model_validate(spec)
    tok = build_tokenizer(run, run.run_dir)
    stream = SampleStream(run, 0, tok, [(tmp_path / "d.txt").read_text()])
    kinds = {stream.sample(s, 0, i).kind for s in range(6) for i in range(2)}
    assert kinds == {"documents", "passkey"}
    for step in range(6):
        whole = stream.batch(step, 0, range(2))
        for r in range(2):
            part = stream.batch(step, 0, range(2), sequence_position_ids(64, r, 2, 0, 1))
            assert part[0].tolist() == sequence_shard(whole[0], 1, r, 2, 0, 1).tolist()
            assert part[1].tolist() == sequence_shard(whole[1], 1, r, 2, 0, 1).tolist()


def test_the_saved_dataset_index_is_the_one_datasets_writes():
    """prepare reads save_to_disk folders without importing datasets: its file name for the
    folder's index must be the one datasets itself uses."""
    import datasets.config

    from ray_jobs.data.inputs import SAVED_DATASET_INDEX

    assert SAVED_DATASET_INDEX == datasets.config.DATASET_STATE_JSON_FILENAME
