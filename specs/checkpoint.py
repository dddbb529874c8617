"""The checkpoint format: where a run's checkpoints live, what they hold, and how they are read.

The one owner of the on-disk layout. The trainer (ray_jobs/train/checkpoint.py) writes it with
torch; the evaluator, the progress table, the launcher, the planner's measured step times and
the benchmarks read it through the functions here, so none of them builds a checkpoint path or
opens the trainer's state file by hand. Torch-free: the evaluator sits below the trainer.

    <run dir>/
        checkpoints/<stage>/step-000050/        one checkpoint (`checkpoint_dir`)
            dcp/                 every rank's shards of the model and AdamW state (DCP)
            trainer_state/       scheduler.pt, state.json (`TrainerState`)
            config.json, generation_config.json, tokenizer.json, ...
            COMMITTED            written last (specs/ledger.py)
        checkpoints/<stage>/step-000100/        the stage's final checkpoint: the same, and
            model-00001-of-0000N.safetensors, ..., model.safetensors.index.json
                                 the Hugging Face export (`has_export`), written by every rank
        checkpoints/<stage>/.step-000050.epoch-3/   an attempt's staging folder (`staging_dir`)
        eval/<stage>/step-000050/               that checkpoint's evaluation (`eval_dir`)

Every checkpoint is a Hugging Face model directory by its config.json and tokenizer; only the
stage's final one holds the weights in Hugging Face form (the export: the next stage starts
from it, any Hugging Face loader opens it). The others hold the weights only as DCP shards,
which the evaluator reads (ray_jobs/eval/model.py) and a resume reads (always: a resume never
reads an export). The trainer's own files sit in subfolders beside them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from specs.degrees import AttentionMasking, ParallelDims, PositionIds
from specs.errors import SpecError
from specs.files import read_bounded
from specs.ledger import COMMITTED, Ledger, is_committed
from specs.names import check_name, check_relative, error_location
from specs.plan import DEGREE_KEYS

CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
DCP_DIR = "dcp"
STATE_DIR = "trainer_state"
STATE_FILE = "state.json"
SCHEDULER_FILE = "scheduler.pt"
HF_EXPORT_FILES = ("config.json", "tokenizer.json")  # what an evaluator needs of the export
STAGING_GLOB = ".step-*.epoch-*"

_NAME = re.compile(r"step-(\d{6,})")
_STAGING = re.compile(r"\.(step-\d{6,})\.epoch-(\d+)")


class CheckpointError(ValueError):
    """A directory that cannot be read as a checkpoint, with what is wrong and what to do."""


class TrainerState(BaseModel):
    """Where training stands: enough to continue exactly as if nothing had stopped."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    stage_index: int = Field(ge=0)
    step: int = Field(ge=0, description="Optimizer steps done in this stage.")
    tokens: int = Field(0, description="Tokens trained on in this stage.")
    rope_theta: float = 0.0
    rope: dict = Field(default_factory=dict, description="transformers' rope_parameters the "
                       "stage trains with (config.json carries them too).")
    seq_len: int = 0
    seconds: float = Field(0.0, description="Training time in this stage so far.")
    parts_seconds: dict[str, float] = Field(default_factory=dict,
                                            description="`seconds` by phase (StepClock).")
    world_size: int = 1
    dims: ParallelDims = Field(default_factory=ParallelDims, description="The layout the plan "
                               "gave; state.json spells it with plan.json's degree keys.")
    losses: list[float] = Field(default_factory=list, description="Per optimizer step.")
    init_from: str | None = Field(None, description="Checkpoint the stage started from "
                                  "(relative to the run directory).")
    init_checksum: float = Field(0.0, description="Sum of |weights| at the stage's start: shows "
                                 "what carried over.")
    attention_kernel: str = Field("", description="The block kernel the ring ran on, and why "
                                  "(select_block_kernel).")
    attention: AttentionMasking = Field(
        "causal", description="What a token attended to (the stage's attention): 'causal' or "
        "'document'. States written before the choice existed read 'causal', as they trained.")
    position_ids: PositionIds = Field(
        "continuous", description="The RoPE positions the stage trained with: 'continuous' or "
        "'per_document'.")

    @field_validator("stage")
    @classmethod
    def _stage_is_a_name(cls, value: str) -> str:
        return check_name(value, "stage")  # it names checkpoints/<stage>/ on resume

    @field_validator("init_from")
    @classmethod
    def _init_from_inside(cls, value: str | None) -> str | None:
        return None if value is None else check_relative(value, "init_from")

    @model_validator(mode="before")
    @classmethod
    def _dims_from_degree_keys(cls, doc):
        """state.json carries the layout as plan.json's degree keys (ring_degree, ...)."""
        if isinstance(doc, dict) and any(k in doc for k in DEGREE_KEYS):
            doc = dict(doc)
            degrees = {k: doc.pop(k) for k in DEGREE_KEYS if k in doc}
            doc["dims"] = ParallelDims.from_degree_keys(degrees)
        return doc

    def to_document(self) -> dict:
        """state.json's document: the fields, the layout under plan.json's degree keys."""
        doc = self.model_dump(exclude={"dims"})
        doc.update(self.dims.degree_keys())
        return doc


class CheckpointPlace(NamedTuple):
    """Where a checkpoint folder sits in its run: `checkpoint_dir(run_dir, stage, step)`."""

    run_dir: Path
    stage: str
    step: int


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The step of a checkpoint folder's name (`step-000050` -> 50), else None."""
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """`<run>/checkpoints/<stage>`; UnsafePath unless `stage` is a simple name."""
    return Path(run_dir) / CHECKPOINTS_DIR / check_name(stage, "stage")


def checkpoint_dir(run_dir: str | Path, stage: str, step: int) -> Path:
    return stage_dir(run_dir, stage) / checkpoint_name(step)


def locate(path: str | Path) -> CheckpointPlace | None:
    """(run dir, stage, step) of a folder laid out as `checkpoint_dir` lays it out, else None
    (a plain Hugging Face directory, or a checkpoint copied elsewhere)."""
    p = Path(path)
    step = parse_checkpoint_name(p.name)
    if step is None or p.parent.parent.name != CHECKPOINTS_DIR:
        return None
    return CheckpointPlace(p.parent.parent.parent, p.parent.name, step)


def staging_dir(path: Path, epoch: int | None) -> Path:
    """Where the attempt of `epoch` writes the checkpoint `path` before it is moved into place."""
    return path.parent / f".{path.name}.epoch-{epoch or 0}"


def parse_staging_name(name: str) -> tuple[str, int] | None:
    """(checkpoint name, epoch) of a staging folder's name, else None."""
    m = _STAGING.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else None


def eval_dir(run_dir: str | Path, stage: str, step: int) -> Path:
    """Where the evaluation of `checkpoint_dir(run_dir, stage, step)` writes its results."""
    return Path(run_dir) / EVAL_DIR / check_name(stage, "stage") / checkpoint_name(step)


def dcp_dir(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / DCP_DIR


def scheduler_file(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / STATE_DIR / SCHEDULER_FILE


def export_files(checkpoint: str | Path) -> list[Path]:
    """The Hugging Face weight files of a folder (`*.safetensors`), sorted; [] if none."""
    return sorted(Path(checkpoint).glob("*.safetensors"))


def has_export(checkpoint: str | Path) -> bool:
    """Whether the folder holds weights in Hugging Face form (a stage's final checkpoint, or a
    plain Hugging Face model), not only the trainer's DCP shards."""
    return bool(export_files(checkpoint))


def is_trainer_checkpoint(checkpoint: str | Path) -> bool:
    """Whether the folder is one of ringpilot's checkpoints (not a plain Hugging Face model)."""
    return (Path(checkpoint) / STATE_DIR).is_dir()


def write_state(checkpoint: str | Path, state: TrainerState) -> None:
    """Write the trainer's state into a checkpoint being written (its trainer_state/ exists)."""
    # json.dumps, not model_dump_json: a diverged loss (NaN, inf) must read back as itself
    (Path(checkpoint) / STATE_DIR / STATE_FILE).write_text(
        json.dumps(state.to_document(), indent=1) + "\n")


def read_state(checkpoint: str | Path) -> TrainerState:
    """The trainer's state saved in a checkpoint; CheckpointError if it is missing or invalid."""
    path = Path(checkpoint) / STATE_DIR / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: {checkpoint} is not a checkpoint the "
                              "trainer wrote; give a committed checkpoint from the run "
                              "ledger")
    if not path.is_file():  # a FIFO or device would block or never end
        raise CheckpointError(f"{path}: not a regular file; the checkpoint is damaged: use "
                              "another committed checkpoint of the run")
    try:
        return TrainerState.model_validate(json.loads(read_bounded(path, "metadata")))
    except (SpecError, json.JSONDecodeError, RecursionError) as e:
        why = "; ".join(e.lines) if isinstance(e, SpecError) else f"not JSON: {e}"[:200]
        raise CheckpointError(f"{path}: cannot read the trainer state ({why}); the checkpoint "
                              "is damaged: use another committed checkpoint of the run") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = error_location(first.get("loc", ()))
        raise CheckpointError(f"{path}: not a trainer state: {where}: {first['msg']}; it is "
                              "written by the trainer and never edited: restore it, or use "
                              "another committed checkpoint of the run") from None


def read_pointer(path: str | Path) -> str:
    """The checkpoint path (relative to the run) in Ray Train's pointer.json, checked to be a
    relative path of simple names; CheckpointError (one line) for a damaged or tampered one."""
    try:
        doc = json.loads(read_bounded(path, "metadata"))
        return check_relative(doc["path"], "path")
    except (SpecError, ValueError, TypeError, KeyError, RecursionError) as e:
        why = "; ".join(e.lines) if isinstance(e, SpecError) else " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: not a checkpoint pointer ({why}); it is written by the "
                              "trainer: start the run again from its ledger") from None


def final_checkpoint(ledger: Ledger, stage: str) -> Path | None:
    """The stage's final committed checkpoint (the start of the next stage), else None."""
    entry = ledger.read().stages.get(stage)
    for ckpt in reversed(entry.checkpoints if entry else []):
        path = ledger.resolve(ckpt.path, f"stages.{stage}.checkpoints path")
        if ckpt.final and is_committed(path):
            return path
    return None


def check_checkpoint(path: str | Path) -> Path:
    """An evaluable folder: a committed ringpilot checkpoint (with its Hugging Face export, or
    only its DCP shards) or a plain Hugging Face Llama directory saved with its tokenizer.
    Refuses missing and incomplete ones (a ringpilot folder without its COMMITTED marker),
    folders without config.json and the tokenizer, and a ringpilot folder with no weights (no
    export and no dcp/)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a committed checkpoint "
                              f"directory ({CHECKPOINTS_DIR}/<stage>/step-NNNNNN/) or a HF Llama "
                              "directory")
    if is_trainer_checkpoint(path) and not is_committed(path):
        raise CheckpointError(f"checkpoint {path} is incomplete: it has {STATE_DIR}/ but no "
                              f"{COMMITTED} marker (the trainer was still writing it, or crashed); "
                              "evaluate a committed checkpoint from the run ledger instead")
    missing = [f for f in HF_EXPORT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it must be a Hugging "
                              "Face Llama directory saved with its tokenizer (save_pretrained)")
    if is_trainer_checkpoint(path) and not has_export(path) and not dcp_dir(path).is_dir():
        raise CheckpointError(f"checkpoint {path} has no weights: neither *.safetensors (the "
                              f"Hugging Face export) nor {DCP_DIR}/ (the trainer's shards); it is "
                              "damaged: evaluate another committed checkpoint of the run")
    return path


def config_rope(model_dir: str | Path) -> dict | None:
    """The RoPE rule in a Hugging Face checkpoint's config.json as transformers' rope_parameters
    (transformers 5 writes `rope_parameters`; older files have `rope_theta` and `rope_scaling`,
    whose `type` is the old name of `rope_type`); None when the file does not exist."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(read_bounded(path, "metadata"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); restore the config.json that "
                              "save_pretrained wrote") from None
    params = config.get("rope_parameters") or dict(config.get("rope_scaling") or {})
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: rope_parameters is {type(params).__name__}, not a "
                              "mapping; restore the config.json that save_pretrained wrote")
    params = dict(params)
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    if config.get("rope_theta") is not None:
        params.setdefault("rope_theta", config["rope_theta"])
    return params
