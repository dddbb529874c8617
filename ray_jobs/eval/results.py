"""What an evaluation produced: results.json's document, and reading it back."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from specs.errors import SpecError
from specs.files import read_bounded
from specs.names import check_name, error_location

RESULTS_FILE = "results.json"
TABLES_FILE = "tables.md"


class ResultsError(ValueError):
    """A results.json that cannot be read: missing, a symlink, too large, not UTF-8, truncated
    or not a results document. The message names the file and what to do."""


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CellResult(_Doc):
    task: str = Field(description="Task name (RULER's).")
    length: int = Field(description="Context length in tokens.")
    depth: float | None = Field(description="Needle depth in percent; null for cwe_lite/fwe_lite.")
    score: float = Field(description="Mean score of the cell's samples, 0..1.")
    samples: int = Field(description="Samples scored.")
    engine: str = Field("one evaluator", description="What ran it: 'one evaluator' or "
                        "'evaluation gang of P'.")


class SampleResult(_Doc):
    task: str = Field(description="Task name.")
    length: int = Field(description="Context length in tokens.")
    depth: float | None = Field(description="Needle depth in percent.")
    index: int = Field(description="Sample index within the cell.")
    prompt_tokens: int = Field(description="Tokens of the prompt.")
    answers: list[str] = Field(description="Expected answers.")
    output: str = Field(description="The model's greedy continuation.")
    score: float = Field(description="Score of this output, 0..1.")


class Skipped(_Doc):
    task: str = Field(description="Task skipped (or '*' for all).")
    length: int = Field(description="Context length skipped.")
    reason: str = Field(description="Why it was not evaluated.")


class EvalResults(_Doc):
    checkpoint: str = Field(description="Evaluated checkpoint directory.")
    stage: str | None = Field(None, description="Stage of a ringpilot checkpoint.")
    step: int | None = Field(None, description="Step within the stage.")
    tasks: list[str] = Field(description="Tasks asked for.")
    lengths: list[int] = Field(description="Context lengths asked for.")
    depths: list[float] = Field(description="Needle depths (percent).")
    samples: int = Field(description="Samples per cell.")
    seed: int = Field(description="Seed of the prompts.")
    max_length: int = Field(description="Longest context one evaluator runs.")
    engines: dict[str, str] = Field(default_factory=dict, description="Per context length "
                                    "evaluated, what ran it (one evaluator or a gang of P), "
                                    "chosen automatically from max_length.")
    gang: dict | None = Field(None, description="The evaluation gang used for the longer "
                              "contexts: size, ring order, member pids, seconds to start.")
    started_unix: float = Field(description="When the evaluation began (Unix time).")
    finished_unix: float = Field(0.0, description="When it ended (Unix time).")
    scores: dict[str, float] = Field(default_factory=dict, description="Mean score per task.")
    cells: list[CellResult] = Field(default_factory=list, description="Score per cell.")
    skipped: list[Skipped] = Field(default_factory=list, description="Cells not evaluated.")
    outputs: list[SampleResult] = Field(default_factory=list, description="Every sample.")
    files: dict[str, str] = Field(default_factory=dict, description="Plots and tables written.")
    error: str | None = Field(None, description="Why the checkpoint was not evaluated at all.")
    task_depths: dict[str, list[float]] = Field(default_factory=dict, description="Depths of "
                                                "a task that has its own grid (niah_kamradt: "
                                                "Kamradt's), instead of `depths`.")
    kamradt: dict | None = Field(None, description="Kamradt's test as run: needle, question, "
                                 "key phrases scored, haystack files.")
    ruler: dict | None = Field(None, description="RULER through lm-eval: per-length rows (mean "
                               "over tasks x 100, 95% interval, samples, per task), tasks and "
                               "lengths not run with the reason, lm-eval's results file; the "
                               "average per length and the effective length, or `partial`.")
    babilong: dict | None = Field(None, description="BABILong through lm-eval: per BABILong "
                                  "config, the mean accuracy over tasks x 100, samples, per task; "
                                  "what did not run with the reason.")

    @field_validator("files")
    @classmethod
    def _files_are_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key, name in value.items():  # the report links them beside results.json
            check_name(name, f"files.{key}")
        return value

    @field_validator("tasks")
    @classmethod
    def _tasks_are_names(cls, value: list[str]) -> list[str]:
        for task in value:  # heatmap_<task>.png
            check_name(task, "tasks")
        return value

    @field_validator("scores")
    @classmethod
    def _scored_tasks_are_names(cls, value: dict[str, float]) -> dict[str, float]:
        # RULER's mean per length is keyed `ruler@<length>`; the report's plot file names
        # spell the `@` as `_at_` (score_vs_step_<task>.png)
        for task in value:
            name, _, length = task.partition("@")
            check_name(name, "scores")
            if _ and not (length.isascii() and length.isdigit() and len(length) <= 9):
                raise ValueError(f"scores: {task!r} is not NAME or NAME@LENGTH")
        return value


def load_results(path: str | Path) -> EvalResults:
    """results.json read back; ResultsError (one line) if it is a symlink, too large, not UTF-8,
    truncated or not a results document."""
    path = Path(path)
    if path.is_symlink():  # a results file is written in place, never linked from elsewhere
        raise ResultsError(f"{path}: is a symlink; ringpilot reads only the results file the "
                           "evaluation wrote there: remove the link and re-run the evaluation")
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise ResultsError(f"{path}: not a regular file; re-run the evaluation of that checkpoint")
    try:
        return EvalResults.model_validate_json(read_bounded(path, "results"))
    except SpecError as e:
        raise ResultsError(f"{path}: cannot read the evaluation results ({'; '.join(e.lines)}); "
                           "re-run the evaluation of that checkpoint") from None
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = error_location(first.get("loc", ()))
        what = ("it is not complete JSON (truncated or overwritten)"
                if first.get("type", "").startswith("json") else
                f"{where}: {first.get('msg', 'invalid')}")
        raise ResultsError(f"{path}: not an evaluation results file: {what}; re-run the "
                           "evaluation of that checkpoint") from None


def write_error(out_dir: Path, checkpoint: str, error: str) -> Path:
    """results.json of a checkpoint that could not be evaluated: the error, nothing else."""
    import time

    from specs.atomic import atomic_write

    doc = EvalResults(checkpoint=checkpoint, tasks=[], lengths=[], depths=[], samples=0, seed=0,
                      max_length=0, started_unix=time.time(), finished_unix=time.time(),
                      error=error)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / RESULTS_FILE, doc.model_dump_json(indent=2))
    return out_dir / RESULTS_FILE
