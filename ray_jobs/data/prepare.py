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
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ray_jobs.data.inputs import differences, fingerprint, input_key, list_files, tokenizer_files
from ray_jobs.data.packing import Packer
from ray_jobs.data.prepared import (
    FORMAT_VERSION,
    MANIFEST,
    PrepareError,
    read_manifest,
    resolve,
    stage_sequences,
)
from ray_jobs.data.readers import cached_tokenizer, tokenize_files_udf
from specs.run import RunSpec

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
            "shards": packer.writer.shards, "has_mask": with_mask,
            "document_lengths": document_length_histogram(doc_starts, total)}


def document_length_histogram(doc_starts: np.ndarray, total: int) -> list[dict]:
    """The packed stream's documents by length (EOS included) in power-of-two buckets, as
    data.document_lengths spells a histogram: [{max_tokens, share}], share the fraction of the
    stream's tokens in the bucket's documents (lengths 2**(k-1) + 1 .. 2**k). Buckets from the
    one below the shortest document's to the longest's; `ringpilot plan` reads it from the
    manifest to price attention `document`."""
    lengths = np.diff(np.append(doc_starts, total))
    if total <= 0 or not len(lengths):
        return []
    bounds = 1 << np.arange(int(lengths.max() - 1).bit_length() + 1, dtype=np.int64)
    tokens = np.bincount(np.searchsorted(bounds, lengths), weights=lengths,
                         minlength=len(bounds))
    first = max(0, int(np.flatnonzero(tokens)[0]) - 1)  # an empty bucket below: its lower bound
    return [{"max_tokens": int(b), "share": round(float(t) / total, 6)}
            for b, t in zip(bounds[first:], tokens[first:])]


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

