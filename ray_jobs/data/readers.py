"""Reading and tokenizing one source file (jsonl, txt, parquet, a `datasets` save_to_disk
folder; text or chat): what each Ray Data task of the prepare job runs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from ray_jobs.data.inputs import SAVED_DATASET_INDEX
from ray_jobs.data.prepared import (
    PrepareError,
)

DOCS_PER_BATCH = 256
# The chat rendering used when the tokenizer has no chat template (documented in the RunSpec).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)




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


