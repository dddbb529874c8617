"""eval.data_dir: a local folder with what lm-eval's RULER and BABILong tasks would download,
checked up front and put in place of the downloads while their own generators build samples.

Layout (`ringpilot eval fetch-data DIR` builds it on a machine with internet):

    essays/*.txt                                 Paul Graham's essays, one per file (NIAH haystack)
    squad/dev-v2.0.json                          SQuAD v2.0 dev set (ruler_qa_squad)
    hotpotqa/hotpot_dev_distractor_v1.json       HotpotQA dev, distractor setting (ruler_qa_hotpot)
    nltk_data/tokenizers/punkt_tab/english/      nltk's sentence splitter (splits the essays)
    babilong/<config>/                           `datasets.save_to_disk` of one BABILong config
                                                 (0k, 1k, ... 128k), splits qa1..qa20

How the downloads are replaced, for lm-eval 0.4.13 (LM_EVAL_VERSIONS; checked before use, and
the functions' shapes are checked too, so a later lm-eval fails loudly rather than downloading):
  - essays: `niah_utils.get_haystack` (lm-eval's prepare_niah.get_haystack, which calls
    `datasets.load_dataset("baber/paul_graham_essays")` for "essay") is wrapped: "essay" reads the
    local files with the same whitespace split, other haystacks go to lm-eval's own function;
  - SQuAD, HotpotQA: `qa_utils.download_json(url)` answers lm-eval's two URLs from the local
    files and refuses any other; the `@cache`d readers are cleared before and after;
  - nltk: the folder's nltk_data goes first on `nltk.data.path`;
  - BABILong: no patch: its tasks take a `custom_dataset` in their configuration (lm-eval's hook),
    given one that reads the local save_to_disk folder.
No installed file of lm-eval is edited; the patches hold only inside `local_sources`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ray_jobs.eval.lm_eval.adapter import RulerInputError

LM_EVAL_VERSIONS = ">=0.4.13,<0.4.14"  # the versions whose download functions are patched here

ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery",
               "niah_multivalue")
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json"
HOTPOT_URL = ("https://huggingface.co/datasets/namlh2004/hotpotqa/resolve/"
              "7e54db4656209750ff487f6fdf8e39a66dba136b/hotpot_dev_distractor_v1.json")
ESSAYS_DATASET = "baber/paul_graham_essays"
BABILONG_DATASET = "RMT-team/babilong-1k-samples"
PUNKT_URL = "nltk.download('punkt_tab') (github.com/nltk/nltk_data)"
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
# BABILong's configs in lm-eval's dataset, by their context size in tokens (k = 1,024)
BABILONG_CONFIGS = {"0k": 0, **{f"{n}k": n * 1024 for n in (1, 2, 4, 8, 16, 32, 64, 128)}}
BABILONG_COLUMNS = ("input", "question", "target")

ESSAYS = "essays"
SQUAD = "squad/dev-v2.0.json"
HOTPOT = "hotpotqa/hotpot_dev_distractor_v1.json"
PUNKT = "nltk_data/tokenizers/punkt_tab/english"
BABILONG = "babilong"
QUESTIONS = 500  # lm-eval's RULER QA tasks make 500 samples per length, one question each
MAX_FILE_BYTES = 1 << 30  # the real files are 3 MB (essays), 4 MB (SQuAD), 46 MB (HotpotQA)


class DataDirError(RulerInputError):
    """eval.data_dir misses a file, or holds one in the wrong format."""


def babilong_config(length: int) -> str:
    """The largest BABILong config whose context fits `length` tokens ("0k": the facts alone)."""
    return max((c for c, n in BABILONG_CONFIGS.items() if n <= length),
               key=BABILONG_CONFIGS.__getitem__)


@dataclass(frozen=True)
class DataDir:
    """A checked data folder."""

    root: Path

    def essays(self) -> list[Path]:
        return sorted((self.root / ESSAYS).glob("*.txt"))


def check_data_dir(root: str | Path, ruler_tasks: Sequence[str] = (),
                   babilong_configs: Sequence[str] = ()) -> DataDir:
    """The folder, checked for what `ruler_tasks` and the BABILong `babilong_configs` need: one
    DataDirError listing every missing or malformed file, the format expected and where lm-eval
    would have fetched it from."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataDirError(f"eval.data_dir {root}: not a folder; build it with `ringpilot eval "
                           "fetch-data DIR` on a machine with internet and copy it here")
    problems: list[str] = []
    if any(t in ESSAY_TASKS for t in ruler_tasks):
        problems += _check_essays(root)
        problems += _check_punkt(root)
    if "ruler_qa_squad" in ruler_tasks:
        problems += _check_json(root / SQUAD, _squad_problem, f"SQuAD v2.0's dev JSON ({{data: "
                                "[{paragraphs: [{context, qas: [{question, answers: [{text}], "
                                f"is_impossible}}]}}]}}]}}), from {SQUAD_URL}")
    if "ruler_qa_hotpot" in ruler_tasks:
        problems += _check_json(root / HOTPOT, _hotpot_problem, "HotpotQA's dev distractor JSON "
                                "([{question, answer, context: [[title, [sentences]]]}]), from "
                                f"{HOTPOT_URL}")
    for config in dict.fromkeys(babilong_configs):
        problems += _check_babilong(root, config)
    if problems:
        raise DataDirError(f"eval.data_dir {root} is not complete ({len(problems)} problem(s)); "
                           "rebuild it with `ringpilot eval fetch-data DIR`:\n  - "
                           + "\n  - ".join(problems))
    return DataDir(root)


def _check_essays(root: Path) -> list[str]:
    where = (f"{root / ESSAYS}/*.txt: Paul Graham's essays as UTF-8 text files, one per essay "
             f"(lm-eval loads them from the Hugging Face dataset {ESSAYS_DATASET})")
    files = sorted((root / ESSAYS).glob("*.txt"))
    if not files:
        return [f"missing {where}"]
    bad = []
    for f in files:
        size = f.stat().st_size if f.is_file() else -1
        if not 0 < size <= MAX_FILE_BYTES:
            bad.append(f"{f.name} ({'not a file' if size < 0 else f'{size:,} bytes'})")
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            bad.append(f"{f.name} (not UTF-8)")
            continue
        if "\0" in text or not text.strip():
            bad.append(f"{f.name} ({'binary' if chr(0) in text else 'blank'})")
    return [f"malformed {where}: {', '.join(bad)}"] if bad else []


def _check_punkt(root: Path) -> list[str]:
    missing = [n for n in PUNKT_FILES if not (root / PUNKT / n).is_file()]
    return [f"missing {root / PUNKT}/{{{','.join(missing)}}}: nltk's punkt_tab sentence "
            f"splitter for English, which splits the essays (from {PUNKT_URL})"] if missing else []


def _check_json(path: Path, problem, what: str) -> list[str]:
    if not path.is_file():
        return [f"missing {path}: {what}"]
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        return [f"malformed {path}: {size:,} bytes, more than the 1 GiB expected of {what}"]
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        why = problem(doc)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"not JSON ({type(e).__name__}: {str(e)[:80]})"
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        why = f"a record lacks or mistypes {e}"
    return [f"malformed {path}: {why}; expected {what}"] if why else []


def _squad_problem(doc) -> str | None:
    answerable = 0
    for article in doc["data"]:
        for p in article["paragraphs"]:
            if not isinstance(p["context"], str):
                return "a paragraph's context is not text"
            for qa in p["qas"]:
                if not isinstance(qa["question"], str) or not isinstance(qa["is_impossible"], bool):
                    return "a question or its is_impossible has the wrong type"
                texts = [a["text"] for a in qa["answers"]]
                answerable += not qa["is_impossible"] and bool(texts)
    return (None if answerable >= QUESTIONS else f"{answerable} answerable questions, and "
            f"lm-eval reads one per sample, {QUESTIONS} per length")


def _hotpot_problem(doc) -> str | None:
    if not isinstance(doc, list) or len(doc) < QUESTIONS:
        return (f"{len(doc)} questions, and lm-eval reads one per sample, {QUESTIONS} per length"
                if isinstance(doc, list) else "not a list of questions")
    for d in doc:
        if not isinstance(d["question"], str) or not isinstance(d["answer"], str):
            return "a question or answer is not text"
        for title, sentences in d["context"]:
            if not isinstance(title, str) or not all(isinstance(s, str) for s in sentences):
                return "a context entry is not [title, [sentences]]"
    return None


def _check_babilong(root: Path, config: str) -> list[str]:
    folder = root / BABILONG / config
    what = (f"BABILong's {config} config as a `datasets.save_to_disk` DatasetDict with splits "
            f"qa1..qa20 and columns {', '.join(BABILONG_COLUMNS)} (lm-eval loads "
            f"{BABILONG_DATASET}, name={config!r})")
    if config not in BABILONG_CONFIGS:
        return [f"BABILong has no config {config!r}; its configs are {list(BABILONG_CONFIGS)}"]
    if not (folder / "dataset_dict.json").is_file():
        return [f"missing {folder}: {what}"]
    try:
        splits = _load_babilong(folder)
    except Exception as e:  # noqa: BLE001 - whatever datasets raises, the folder is the problem
        return [f"malformed {folder}: {type(e).__name__}: {str(e)[:120]}; expected {what}"]
    for name, split in splits.items():
        lacking = [c for c in BABILONG_COLUMNS if c not in split.column_names]
        if lacking or not re.fullmatch(r"qa\d+", name):
            return [f"malformed {folder}: split {name!r} lacks {lacking}; expected {what}"]
    return []


@functools.lru_cache(maxsize=16)
def _load_babilong(folder: Path):
    import datasets

    return datasets.load_from_disk(str(folder))


def babilong_splits(data: DataDir, config: str) -> list[str]:
    return sorted(_load_babilong(data.root / BABILONG / config), key=lambda s: int(s[2:]))


@contextlib.contextmanager
def local_babilong(data: DataDir) -> Iterator[None]:
    """Inside: lm-eval's BABILong tasks read their config and split from `data`, through their
    own `custom_dataset` function (babilong/common_utils.load_dataset, which calls
    `datasets.load_dataset(BABILONG_DATASET, name=max_seq_lengths, split=qa_split)`), replaced
    on the module copy lm-eval's task loader resolves YAML functions from."""
    _check_lm_eval_version()
    import lm_eval.tasks
    from lm_eval.tasks import _yaml_loader

    module = _yaml_loader._load_module_with_cache(
        (Path(lm_eval.tasks.__file__).parent / "babilong" / "common_utils.py").resolve())
    original = module.load_dataset
    if "RMT-team/babilong-1k-samples" not in original.__code__.co_consts:
        raise DataDirError("lm-eval's BABILong loader is not the one eval.data_dir replaces "
                           f"(lm-eval {LM_EVAL_VERSIONS}); run without eval.data_dir")

    def load_dataset(**kwargs):  # lm-eval's signature: metadata and dataset_kwargs
        config, split = kwargs.get("max_seq_lengths", "0k"), kwargs["qa_split"]
        return {split: _load_babilong(data.root / BABILONG / config)[split]}

    module.load_dataset = load_dataset
    try:
        yield
    finally:
        module.load_dataset = original


# -- lm-eval's download functions, answered from the folder -----------------------------------

def _essay_haystack(data: DataDir) -> list[str]:
    """The haystack lm-eval 0.4.13 builds from the essays dataset's `text` column (joined with
    spaces, whitespace runs collapsed, split on spaces), from the files in name order."""
    text = " ".join(f.read_text(encoding="utf-8") for f in data.essays())
    return re.sub(r"\s+", " ", text).split(" ")


def _check_lm_eval_version() -> None:
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    have = version("lm_eval")
    if have not in SpecifierSet(LM_EVAL_VERSIONS):
        raise DataDirError(
            f"eval.data_dir replaces the download functions of lm-eval {LM_EVAL_VERSIONS}; "
            f"lm-eval {have} is installed: install lm-eval 0.4.13 or run without eval.data_dir")


def _task_modules():
    """lm-eval's niah_utils and qa_utils as its task loader holds them: it loads a module a YAML
    names through `_yaml_loader._load_module_with_cache`, which re-executes one imported the
    usual way (no `__mtime__`) and keeps its own; patching another copy would change nothing."""
    import lm_eval.tasks
    from lm_eval.tasks import _yaml_loader

    folder = (Path(lm_eval.tasks.__file__).parent / "ruler").resolve()
    return (_yaml_loader._load_module_with_cache(folder / "niah_utils.py"),
            _yaml_loader._load_module_with_cache(folder / "qa_utils.py"))


@contextlib.contextmanager
def local_sources(data: DataDir) -> Iterator[None]:
    """Inside: lm-eval's RULER generators read the essays, SQuAD, HotpotQA and nltk's splitter
    from `data` and any other download they try raises."""
    _check_lm_eval_version()
    import nltk

    nltk_dir = str(data.root / "nltk_data")
    nltk.data.path.insert(0, nltk_dir)  # before prepare_niah is imported: it looks for punkt_tab
    niah_utils, qa_utils = _task_modules()
    original_haystack = niah_utils.get_haystack
    if getattr(original_haystack, "__module__", "") != "lm_eval.tasks.ruler.prepare_niah" or \
            SQUAD_URL not in qa_utils.read_squad.__wrapped__.__defaults__ or \
            HOTPOT_URL not in qa_utils.read_hotpotqa.__wrapped__.__defaults__:
        raise DataDirError("lm-eval's RULER download functions are not the ones eval.data_dir "
                           f"replaces (lm-eval {LM_EVAL_VERSIONS}); run without eval.data_dir")
    files = {SQUAD_URL: data.root / SQUAD, HOTPOT_URL: data.root / HOTPOT}

    def haystack(type_haystack):
        return _essay_haystack(data) if type_haystack == "essay" else \
            original_haystack(type_haystack)

    def download_json(url):
        if url not in files:
            raise DataDirError(f"lm-eval asked for {url}, which eval.data_dir does not hold")
        return json.loads(files[url].read_text(encoding="utf-8"))

    original_json = qa_utils.download_json
    caches = (qa_utils.read_squad, qa_utils.read_hotpotqa, qa_utils.download_json)
    for c in caches:
        c.cache_clear()
    niah_utils.get_haystack, qa_utils.download_json = haystack, download_json
    try:
        yield
    finally:
        niah_utils.get_haystack, qa_utils.download_json = original_haystack, original_json
        for c in caches:
            c.cache_clear()
        with contextlib.suppress(ValueError):
            nltk.data.path.remove(nltk_dir)


# -- building the folder, on a machine with internet ----------------------------------------

def fetch_data_dir(dest: str | Path, babilong_configs: Sequence[str] = tuple(BABILONG_CONFIGS)
                   ) -> Path:
    """Download what the suites need into a new folder `dest` (`ringpilot eval fetch-data`):
    written beside it first, checked, then renamed into place, so `dest` is complete or
    absent. Needs the network; the tests never call it."""
    import shutil
    import tempfile

    import datasets
    import nltk
    import requests

    unknown = [c for c in babilong_configs if c not in BABILONG_CONFIGS]
    if unknown:
        raise DataDirError(f"BABILong has no config {unknown}; its configs are "
                           f"{list(BABILONG_CONFIGS)}")
    dest = Path(dest).expanduser()
    if dest.exists():
        raise DataDirError(f"{dest} exists; give a new folder (it is created complete, or not "
                           "at all)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        (staging / ESSAYS).mkdir()
        for i, text in enumerate(datasets.load_dataset(ESSAYS_DATASET, split="train")["text"]):
            (staging / ESSAYS / f"{i:04d}.txt").write_text(text, encoding="utf-8")  # row order
        for url, rel in ((SQUAD_URL, SQUAD), (HOTPOT_URL, HOTPOT)):
            response = requests.get(url, timeout=120)
            response.raise_for_status()
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(response.content)
        if not nltk.download("punkt_tab", download_dir=str(staging / "nltk_data"), quiet=True,
                             raise_on_error=True):
            raise DataDirError("nltk could not download punkt_tab")
        for config in babilong_configs:
            datasets.load_dataset(BABILONG_DATASET, name=config).save_to_disk(
                str(staging / BABILONG / config))
        check_data_dir(staging, ESSAY_TASKS + ("ruler_qa_squad", "ruler_qa_hotpot"),
                       babilong_configs)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
