"""Tokenize, filter and pack the training documents once (`python -m ray_jobs.prepare`).

Submitted like training:
    ray job submit --address http://HEAD:8265 --working-dir . \\
        -- python -m ray_jobs.prepare --run RUN.yaml
and run by the trainer's driver before any worker starts when data.prepared.path holds nothing.

How: the input files are listed and hashed in the driver; Ray Data reads and tokenizes them in
parallel, one task per file (`map_batches` over the file list with the run's Hugging Face fast
tokenizer, batched; per-file tasks keep every document's (file, line) for error messages and
give a fixed order), and hands the documents back in input order (`preserve_order`). The driver
then filters (min/max tokens, duplicates by content hash), weights (per source and per length
bucket) and appends them, each followed by EOS, to one token stream written as uint32 shards
(ray_jobs/data/prepared.py describes the layout). Extra copies of upsampled documents go in later
passes over the stream, so copies of one document do not land in one sequence. Everything is
written to a temporary directory, the manifest last, then renamed into place: a failed or
interrupted run leaves the previous prepared data (or none), never half of it.

Rerunning with the same inputs (file contents, tokenizer, settings) does nothing; a change is
named and the data prepared again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from glob import glob
from pathlib import Path

import numpy as np

from ray_jobs.data.prepared import (
    FORMAT_VERSION,
    MANIFEST,
    PrepareError,
    read_manifest,
    resolve,
    sha256_file,
    sha256_tree,
    stage_sequences,
    stat_key,
)
from specs.run import PreparedSpec, RunSpec

DOCS_PER_BATCH = 256
# The chat rendering used when the tokenizer has no chat template (documented in the RunSpec).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".parquet": "parquet"}
# The index a `datasets` save_to_disk folder lists its Arrow files in (datasets.config.
# DATASET_STATE_JSON_FILENAME): read without importing datasets, which the core does not need.
SAVED_DATASET_INDEX = "state.json"


# ---------------------------------------------------------------------------------------------
# Inputs: files, their hashes, the tokenizer and the settings that decide the output.


def list_files(spec: PreparedSpec, spec_dir: Path | None) -> list[dict]:
    """The input files in order: one dict per file (source index, path, format)."""
    files = []
    for si, src in enumerate(spec.sources):
        for pattern in src.paths:
            full = resolve(pattern, spec_dir)
            matches = sorted(glob(str(full)))
            if not matches:
                raise PrepareError(f"data.prepared.sources[{si}] ({src.name}): {pattern!r} "
                                   f"matches no file (looked for {full}); fix the path or glob")
            for m in matches:
                path = Path(m)
                fmt = src.format
                if fmt == "auto":
                    fmt = "hf_dataset" if path.is_dir() else EXTENSIONS.get(path.suffix.lower())
                if fmt is None:
                    raise PrepareError(f"{path}: unknown extension {path.suffix!r} (source "
                                       f"{src.name}); use .jsonl, .txt, .parquet or set "
                                       f"data.prepared.sources[{si}].format")
                if fmt == "hf_dataset" and not (path / SAVED_DATASET_INDEX).is_file():
                    raise PrepareError(f"{path}: not a `datasets` save_to_disk directory (no "
                                       f"{SAVED_DATASET_INDEX}); give files, or the saved "
                                       "dataset's folder")
                if fmt != "hf_dataset" and (not path.is_file() or path.stat().st_size == 0):
                    what = "is empty" if path.is_file() else "is not a file"
                    raise PrepareError(f"{path}: {what} (source {src.name}); remove it or fix "
                                       "the glob")
                files.append({"source": si, "path": str(path.resolve()), "format": fmt,
                              "kind": src.kind, "field": src.field})
    return files


def tokenizer_files(run: RunSpec, run_dir: Path, spec_dir: Path | None) -> tuple[Path, str | None]:
    """The run's tokenizer.json (trained into the run directory first if it has none) and the
    chat template found beside it (chat_template.jinja or tokenizer_config.json), if any."""
    from ray_jobs.data.tokenizer import build_tokenizer, resolve_tokenizer_source

    build_tokenizer(run, run_dir, spec_dir)
    source = resolve_tokenizer_source(run, spec_dir) or run_dir / "tokenizer" / "tokenizer.json"
    template = None
    jinja, config = source.parent / "chat_template.jinja", source.parent / "tokenizer_config.json"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    elif config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        template = value if isinstance(value, str) else None
    return source, template


def settings_of(run: RunSpec) -> dict:
    """What, beside the inputs and the tokenizer, decides the prepared bytes."""
    spec = run.data.prepared
    return {"format_version": FORMAT_VERSION, "seed": run.data.seed,
            **spec.model_dump(mode="json", exclude={"path"})}


def fingerprint(files: list[dict], tokenizer: Path, template: str | None, run: RunSpec,
                previous: dict | None) -> dict:
    """Inputs of the preparation with content hashes; a file whose (size, mtime, count) is as
    in `previous` keeps its recorded hash instead of being read again."""
    known = {f["path"]: f for f in (previous or {}).get("inputs", {}).get("files", [])}
    out = []
    for f in files:
        path = Path(f["path"])
        stat = stat_key(path)
        old = known.get(f["path"])
        digest = old["sha256"] if old and old.get("stat") == stat else sha256_tree(path)
        out.append({"source": f["source"], "path": f["path"], "format": f["format"],
                    "bytes": stat[0], "stat": stat, "sha256": digest})
    tok_hash = hashlib.sha256(tokenizer.read_bytes() + b"\0" + (template or "").encode())
    return {"tokenizer": tok_hash.hexdigest(), "tokenizer_path": str(tokenizer),
            "settings": settings_of(run), "files": out}


def input_key(inputs: dict) -> str:
    core = {"tokenizer": inputs["tokenizer"], "settings": inputs["settings"],
            "files": [(f["source"], f["path"], f["sha256"]) for f in inputs["files"]]}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two fingerprints, in words."""
    out = []
    if old.get("tokenizer") != new["tokenizer"]:
        out.append(f"the tokenizer changed ({new['tokenizer_path']})")
    old_settings = old.get("settings", {})
    for k in sorted(set(old_settings) | set(new["settings"])):
        if old_settings.get(k) != new["settings"].get(k):
            out.append(f"data.prepared setting {k!r} changed ({old_settings.get(k)!r} -> "
                       f"{new['settings'].get(k)!r})" if k not in ("seed", "format_version")
                       else f"{k} changed")
    before = {f["path"]: f["sha256"] for f in old.get("files", [])}
    after = {f["path"]: f["sha256"] for f in new["files"]}
    for p in sorted(set(after) - set(before)):
        out.append(f"new input {p}")
    for p in sorted(set(before) - set(after)):
        out.append(f"input gone: {p}")
    for p in sorted(set(before) & set(after)):
        if before[p] != after[p]:
            out.append(f"input changed: {p}")
    return out


# ---------------------------------------------------------------------------------------------
# Reading and tokenizing one file (what each Ray Data task runs).


def _decode(data: bytes, path: str, line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line + data[:e.start].count(b"\n")
        raise PrepareError(f"{path}:{at}: not UTF-8 ({e.reason} at byte {e.start}); convert "
                           "the file to UTF-8") from None


def iter_contents(f: dict) -> Iterator[tuple[int, object]]:
    """(row, content) of a file's documents: row is the 1-based line (jsonl) or the row index
    (parquet, datasets; 0 for a txt file); content a str (text) or a message list (chat)."""
    path, fmt, field = f["path"], f["format"], f["field"]
    if fmt == "txt":
        data = Path(path).read_bytes()
        yield 0, _checked(_decode(data, path, 1), f, path)
        return
    if fmt == "jsonl":
        n = 0
        with open(path, "rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                text = _decode(raw, path, line_no)
                try:
                    obj = json.loads(text)
                except ValueError as e:
                    raise PrepareError(f"{path}:{line_no}: not valid JSON ({e}); one JSON object "
                                       "a line") from None
                if not isinstance(obj, dict) or field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise PrepareError(f"{path}:{line_no}: no {field!r} field (has {keys}); "
                                       f"add it or set the source's field")
                n += 1
                yield line_no, _checked(obj[field], f, f"{path}:{line_no}")
        if n == 0:
            raise PrepareError(f"{path}: holds no JSON lines; remove it or fix the glob")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        batches = pf.iter_batches(columns=[field]) if field in names else None
    else:  # a `datasets` save_to_disk directory: Arrow stream files listed in its index
        state = json.loads((Path(path) / SAVED_DATASET_INDEX).read_text())
        tables = [pa.ipc.open_stream(Path(path) / d["filename"]).read_all()
                  for d in state.get("_data_files", [])]
        names = tables[0].schema.names if tables else []
        batches = (b for t in tables for b in t.to_batches()) if field in names else None
    if batches is None:
        raise PrepareError(f"{path}: no column {field!r} (columns: {names}); set the source's "
                           "field")
    row = 0
    for batch in batches:
        for value in batch.column(0).to_pylist():
            yield row, _checked(value, f, f"{path} row {row}")
            row += 1
    if row == 0:
        raise PrepareError(f"{path}: has no rows; remove it or fix the glob")


def _checked(value: object, f: dict, where: str) -> object:
    if f["kind"] == "text":
        if not isinstance(value, str):
            raise PrepareError(f"{where}: {f['field']!r} is {type(value).__name__}, not text")
        return value
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise PrepareError(f"{where}: {f['field']!r} must be a non-empty list of "
                           "{'role': str, 'content': str} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def content_hash(content: object) -> bytes:
    data = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).digest()[:16]


_TOKENIZERS: dict[str, object] = {}


def cached_tokenizer(path: str):
    """The run's tokenizer (data.tokenizer.load_tokenizer), loaded once per process: every
    batch of a file is tokenised by the same worker process."""
    if path not in _TOKENIZERS:
        from ray_jobs.data.tokenizer import load_tokenizer

        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def render_chat(tok, messages: list[dict], template: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a 0/1 mask, 1 on the assistant's tokens.

    The assistant spans are found by rendering: message i's text is what rendering messages
    [:i + 1] adds to rendering messages[:i] with the generation prompt; tokens starting inside
    such a span are the assistant's."""
    render = lambda msgs, gen: tok.apply_chat_template(  # noqa: E731
        msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head, upto = render(messages[:i], True), render(messages[:i + 1], False)
            if not (upto.startswith(head) and text.startswith(upto)):
                raise PrepareError("the chat template does not render a conversation as the "
                                   "concatenation of its turns, so the assistant's tokens "
                                   "cannot be found; use a template that does")
            spans.append((len(head), len(upto)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(lo <= a < hi for lo, hi in spans)) for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def tokenize_file(f: dict, tokenizer: str, template: str | None,
                  per_batch: int = DOCS_PER_BATCH) -> Iterator[dict]:
    """Batches of a file's documents: rows, token ids, masks (chat only), content hashes."""
    tok = cached_tokenizer(tokenizer)
    pending: list[tuple[int, object]] = []

    def flush() -> dict:
        contents = [c for _, c in pending]
        if f["kind"] == "text":
            ids = tok(contents, add_special_tokens=False)["input_ids"]
            masks = None
        else:
            pairs = []
            for row, c in pending:
                try:
                    pairs.append(render_chat(tok, c, template or PLAIN_CHAT_TEMPLATE))
                except PrepareError as e:
                    raise PrepareError(f"{f['path']}:{row}: {e}") from None
            ids, masks = [p[0] for p in pairs], [p[1] for p in pairs]
        out = {"row": [r for r, _ in pending], "ids": ids, "mask": masks,
               "hash": [content_hash(c) for c in contents]}
        pending.clear()
        return out

    for row, content in iter_contents(f):
        pending.append((row, content))
        if len(pending) >= per_batch:
            yield flush()
    if pending:
        yield flush()


def _arrow_batch(file_index: int, part: dict | None, error: str = ""):
    import pyarrow as pa

    part = part or {"row": [], "ids": [], "mask": None, "hash": []}
    n = len(part["row"])
    mask = part["mask"] if part["mask"] is not None else [None] * n
    return pa.table({
        "file": pa.array([file_index] * max(n, 1 if error else 0), pa.int32()),
        "row": pa.array(part["row"] or ([0] if error else []), pa.int64()),
        "ids": pa.array(part["ids"] or ([[]] if error else []), pa.list_(pa.uint32())),
        "mask": pa.array(mask or ([None] if error else []), pa.list_(pa.uint8())),
        "hash": pa.array(part["hash"] or ([b""] if error else []), pa.binary()),
        "error": pa.array([error] * max(n, 1 if error else 0), pa.string()),
    })


def tokenize_files_udf(batch, tokenizer: str, template: str | None):
    """Ray Data map_batches function: a batch of file tasks in, batches of documents out. Bad
    input comes back as an `error` row (a message, not a worker traceback)."""
    for task in batch.to_pylist():
        try:
            for part in tokenize_file(task, tokenizer, template):
                yield _arrow_batch(task["index"], part)
        except PrepareError as e:
            yield _arrow_batch(task["index"], None, str(e))
        except Exception as e:  # an unreadable parquet or arrow file, say
            yield _arrow_batch(task["index"], None,
                               f"{task['path']}: cannot read ({e.__class__.__name__}: {e})")


# ---------------------------------------------------------------------------------------------
# Packing in the driver.


class StreamWriter:
    """Appends uint32 tokens (and 0/1 masks) to shards of `shard_tokens`, saved as .npy."""

    def __init__(self, out: Path, shard_tokens: int, with_mask: bool):
        self.out, self.size, self.with_mask = out, shard_tokens, with_mask
        self.buf = np.empty(shard_tokens, np.uint32)
        self.mbuf = np.empty(shard_tokens, np.uint8) if with_mask else None
        self.fill, self.total, self.shards = 0, 0, []
        self.maps: dict[tuple[str, int], np.ndarray] = {}

    def append(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        at = 0
        while at < len(tokens):
            take = min(len(tokens) - at, self.size - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[at:at + take]
            if self.with_mask:
                self.mbuf[self.fill:self.fill + take] = 1 if mask is None else mask[at:at + take]
            self.fill, self.total, at = self.fill + take, self.total + take, at + take
            if self.fill == self.size:
                self._save()

    def read(self, offset: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens and mask [offset, offset + n) written so far (saved shards or the buffer)."""
        toks, masks = [], []
        at, left = offset, n
        while left > 0:
            i, lo = divmod(at, self.size)
            take = min(left, self.size - lo)
            if i < len(self.shards):
                toks.append(self._saved("file", i)[lo:lo + take])
                if self.with_mask:
                    masks.append(self._saved("mask", i)[lo:lo + take])
            else:
                toks.append(self.buf[lo:lo + take])
                if self.with_mask:
                    masks.append(self.mbuf[lo:lo + take])
            at, left = at + take, left - take
        return np.concatenate(toks), (np.concatenate(masks) if self.with_mask else None)

    def _saved(self, kind: str, i: int) -> np.ndarray:
        if (kind, i) not in self.maps:
            self.maps[(kind, i)] = np.load(self.out / self.shards[i][kind], mmap_mode="r")
        return self.maps[(kind, i)]

    def _save(self) -> None:
        i = len(self.shards)
        entry = {"file": f"tokens-{i:05d}.npy", "tokens": self.fill}
        np.save(self.out / entry["file"], self.buf[:self.fill])
        entry["sha256"] = sha256_file(self.out / entry["file"])
        if self.with_mask:
            entry["mask"] = f"mask-{i:05d}.npy"
            np.save(self.out / entry["mask"], self.mbuf[:self.fill])
        self.shards.append(entry)
        self.fill = 0

    def close(self) -> None:
        if self.fill:
            self._save()


def copies(factor: float, digest: bytes, seed: int) -> int:
    """floor(factor) copies, plus one more with probability frac(factor), decided by the
    content hash (reproducible, and the same for a document wherever it sits)."""
    whole = int(factor)
    u = int.from_bytes(hashlib.blake2b(digest + str(seed).encode(), digest_size=8).digest(),
                       "little") / 2**64
    return whole + (u < factor - whole)


class Packer:
    """Filters, dedups and weights documents in input order and writes the stream."""

    def __init__(self, run: RunSpec, out: Path, eos: int, with_mask: bool):
        self.spec, self.seed, self.eos = run.data.prepared, run.data.seed, eos
        self.writer = StreamWriter(out, self.spec.shard_tokens, with_mask)
        self.buckets = sorted((b.min_tokens, b.factor) for b in self.spec.upsample)
        self.seen: set[bytes] = set()
        # 8 bytes per kept document each (arrays, not lists of ints: billions of tokens are
        # millions of documents)
        self.starts, self.lengths, self.counts = array("q"), array("q"), array("q")
        self.doc_sources = array("H")
        n = len(self.spec.sources)
        self.stats = [{"name": s.name, "documents": 0, "too_short": 0, "too_long": 0,
                       "duplicates": 0, "weighted_out": 0, "kept": 0, "copies": 0, "tokens": 0}
                      for s in self.spec.sources][:n]

    def factor(self, source: int, n_tokens: int) -> float:
        f = self.spec.sources[source].weight
        for lo, factor in reversed(self.buckets):
            if n_tokens >= lo:
                return f * factor
        return f

    def add(self, source: int, ids: np.ndarray, mask: np.ndarray | None, digest: bytes) -> None:
        st = self.stats[source]
        st["documents"] += 1
        n = len(ids)
        if n < self.spec.min_tokens:
            st["too_short"] += 1
            return
        if self.spec.max_tokens is not None and n > self.spec.max_tokens:
            st["too_long"] += 1
            return
        if self.spec.dedup:
            if digest in self.seen:
                st["duplicates"] += 1
                return
            self.seen.add(digest)
        count = copies(self.factor(source, n), digest, self.seed)
        if count == 0:
            st["weighted_out"] += 1
            return
        st["kept"] += 1
        self.starts.append(self.writer.total)
        self.lengths.append(n + 1)
        self.counts.append(count)
        self._write(source, np.append(ids, self.eos).astype(np.uint32),
                    None if mask is None else np.append(mask, 1).astype(np.uint8))

    def _write(self, source: int, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        self.doc_sources.append(source)
        self.stats[source]["copies"] += 1
        self.stats[source]["tokens"] += len(tokens)
        self.writer.append(tokens, mask)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Write the extra copies (pass r holds every document with more than r copies) and
        close the stream; (document starts, their sources)."""
        doc_starts = array("q", self.starts)
        counts = np.frombuffer(self.counts, np.int64)
        for r in range(1, max(self.counts, default=1)):
            for d in np.flatnonzero(counts > r):  # d: the d-th kept document, in input order
                start, length, source = self.starts[d], self.lengths[d], self.doc_sources[d]
                doc_starts.append(self.writer.total)
                tokens, mask = self.writer.read(start, length)
                self._write(source, tokens.copy(), None if mask is None else mask.copy())
        self.writer.close()
        return np.asarray(doc_starts, np.int64), np.asarray(self.doc_sources, np.uint16)


# ---------------------------------------------------------------------------------------------
# The job.


def tokenized_batches(files: list[dict], tokenizer: str, template: str | None, engine: str,
                      address: str | None, log: Callable[[str], None]) -> Iterator:
    """Arrow tables of tokenized documents, in input order: by Ray Data, or in this process."""
    tasks = [{**f, "index": i} for i, f in enumerate(files)]
    if engine == "local":
        import pyarrow as pa

        for t in tasks:
            yield from tokenize_files_udf(pa.Table.from_pylist([t]), tokenizer, template)
        return
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(tokenize_files_udf, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"tokenizer": tokenizer, "template": template}, num_cpus=1)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def prepare(run: RunSpec, spec_dir: Path | None, run_dir: Path, *, engine: str = "ray",
            address: str | None = None, force: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Prepare data.prepared (unless the manifest there already matches); the manifest."""
    spec = run.data.prepared
    if spec is None:
        raise PrepareError("data.prepared is not set; add it to the run file (see docs/data.md)")
    out = resolve(spec.path, spec_dir)
    files = list_files(spec, spec_dir)
    tokenizer, template = tokenizer_files(run, run_dir, spec_dir)
    old = read_manifest(out)
    inputs = fingerprint(files, tokenizer, template, run, old)
    key = input_key(inputs)
    if old is not None and old.get("key") == key and not force:
        log(f"prepare: {out} is up to date ({old['total_tokens']:,} tokens from "
            f"{len(files)} files); nothing to do")
        return old
    if old is not None:
        why = differences(old.get("inputs", {}), inputs) or ["forced"]
        log(f"prepare: {out} is stale: " + "; ".join(why[:5]) + "; preparing again")
    tok = cached_tokenizer(str(tokenizer))  # load_tokenizer refuses one without EOS
    with_mask = any(s.kind == "chat" for s in spec.sources)
    if engine == "ray":
        import ray

        from ray_jobs.ray_setup import connect_ray

        if not ray.is_initialized():  # before the clock starts
            connect_ray(address, os.cpu_count() or 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _pack(run, files, tokenizer, template, tok.eos_token_id, with_mask, tmp,
                         engine, address, log)
        manifest.update(key=key, inputs=inputs, eos_token_id=tok.eos_token_id)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks it complete
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _pack(run: RunSpec, files: list[dict], tokenizer: Path, template: str | None, eos: int,
          with_mask: bool, tmp: Path, engine: str, address: str | None,
          log: Callable[[str], None]) -> dict:
    packer = Packer(run, tmp, eos, with_mask)
    t0 = last = time.perf_counter()
    done_files, raw_tokens = set(), 0
    for table in tokenized_batches(files, str(tokenizer), template, engine, address, log):
        errors = [e for e in table.column("error").to_pylist() if e]
        if errors:
            raise PrepareError(errors[0])
        file_col = table.column("file").to_numpy()
        ids_col = table.column("ids").combine_chunks()
        offsets, values = ids_col.offsets.to_numpy(), ids_col.values.to_numpy()
        masks = table.column("mask").to_pylist() if with_mask else None
        hashes = table.column("hash").to_pylist()
        for k in range(len(table)):
            f = files[int(file_col[k])]
            ids = values[offsets[k]:offsets[k + 1]]
            mask = None if masks is None or masks[k] is None else np.asarray(masks[k], np.uint8)
            packer.add(f["source"], ids, mask, hashes[k])
            raw_tokens += len(ids)
            done_files.add(int(file_col[k]))
        if time.perf_counter() - last > 5:
            last = time.perf_counter()
            log(f"prepare: {len(done_files)}/{len(files)} files, {raw_tokens:,} tokens "
                f"({raw_tokens / (last - t0):,.0f} tokens/s)")
    doc_starts, doc_sources = packer.finish()
    np.save(tmp / "doc_starts.npy", doc_starts)
    np.save(tmp / "doc_sources.npy", doc_sources)
    total = packer.writer.total
    seconds = time.perf_counter() - t0
    stages = {s.name: {"seq_len": s.seq_len, "sequences": stage_sequences(total, s.seq_len)}
              for s in run.stages}
    log(f"prepare: {raw_tokens:,} tokens read in {seconds:.1f} s "
        f"({raw_tokens / max(seconds, 1e-9):,.0f} tokens/s); stream of {total:,} tokens, "
        f"{len(doc_starts):,} documents, {len(packer.writer.shards)} shards")
    for st in packer.stats:
        log(f"prepare:   {st['name']}: {st['documents']:,} read, {st['kept']:,} kept "
            f"({st['copies']:,} copies, {st['tokens']:,} tokens); dropped {st['too_short']} "
            f"short, {st['too_long']} long, {st['duplicates']} duplicate, "
            f"{st['weighted_out']} by weight")
    if total == 0:
        raise PrepareError("data.prepared: every document was filtered out; relax min_tokens, "
                           "max_tokens or the weights")
    return {"format_version": FORMAT_VERSION, "total_tokens": total,
            "documents": int(len(doc_starts)), "raw_tokens": raw_tokens,
            "seconds": round(seconds, 3), "sources": packer.stats, "stages": stages,
            "shards": packer.writer.shards, "has_mask": with_mask}


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` (two renames; the old data is removed only after)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The trainer's check.


def check_prepared(run: RunSpec, spec_dir: Path | None, run_dir: Path, *,
                   address: str | None = None, log: Callable[[str], None] = print) -> dict:
    """The trainer's preflight: prepare when nothing is there; refuse data prepared from other
    inputs, tokenizer or settings, and a corpus too small for a stage. The manifest."""
    from ray_jobs.data.samples import budget_problems

    spec = run.data.prepared
    out = resolve(spec.path, spec_dir)
    old = read_manifest(out)
    if old is None:
        log(f"data.prepared: nothing prepared at {out}; preparing it now")
        manifest = prepare(run, spec_dir, run_dir, address=address, log=log)
    else:
        files = list_files(spec, spec_dir)
        tokenizer, template = tokenizer_files(run, run_dir, spec_dir)
        inputs = fingerprint(files, tokenizer, template, run, old)
        if old.get("key") != input_key(inputs):
            why = differences(old.get("inputs", {}), inputs)
            raise PrepareError(
                f"data.prepared: {out} was prepared from other inputs: {'; '.join(why[:5])}; "
                "rerun `python -m ray_jobs.prepare --run RUN.yaml` (it replaces the data) or "
                "point data.prepared.path elsewhere")
        manifest = old
    problems = budget_problems(run, int(manifest["total_tokens"]), out)
    if problems:
        raise PrepareError("\n".join(problems))
    return manifest


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.prepare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="RunSpec YAML with data.prepared")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: "
                        "RAY_ADDRESS, the job's cluster, or a new local one)")
    parser.add_argument("--force", action="store_true", help="prepare even if up to date")
    parser.add_argument("--engine", choices=["ray", "local"], default="ray",
                        help="'local': tokenize in this process, without Ray (for comparison)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ray_jobs.data.tokenizer import TokenizerError
    from specs.loading import load_or_report

    args = build_arg_parser().parse_args(argv)
    run = load_or_report(args.run, RunSpec)
    if run is None:
        return 2
    try:
        manifest = prepare(run, args.run.resolve().parent, run.run_dir, engine=args.engine,
                           address=args.address, force=args.force)
    except (PrepareError, TokenizerError) as e:
        print(f"{args.run}: cannot prepare\n" + "\n".join(f"  {x}" for x in str(e).splitlines()),
              file=sys.stderr)
        return 2
    from ray_jobs.data.samples import budget_problems

    for line in budget_problems(run, int(manifest["total_tokens"]),
                                resolve(run.data.prepared.path, args.run.resolve().parent)):
        print(f"prepare: warning: {line}", flush=True)
    for name, st in manifest["stages"].items():
        print(f"prepare: stage {name}: {st['sequences']:,} sequences of {st['seq_len'] + 1:,} "
              "tokens", flush=True)
    return 0

