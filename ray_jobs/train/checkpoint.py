"""Checkpoints: sharded model and optimizer state (torch.distributed.checkpoint), committed
through the ledger, and once per stage a Hugging Face export written by every rank.

The torch I/O of the format that specs/checkpoint.py owns (the layout, every path and the
TrainerState record come from there). Order of a save: everything is written into a staging
directory named by the driver attempt's epoch (`.step-000050.epoch-3`): every rank writes its
DCP shards of the model and AdamW state (collective); rank 0 writes the small files (config.json,
the tokenizer, the trainer state, the scheduler). The stage's final checkpoint also gets the
Hugging Face export, written by all ranks in parallel (`export_state_dict`, `write_hf_export`):
each rank writes its shards in safetensors form, then each consolidates a share of the output
files, one full tensor at a time; no rank ever gathers the model. Then rank 0 writes the
COMMITTED marker and, under the ledger's lock and only while its epoch still owns the run,
renames the directory into place and records it (`Ledger.commit_checkpoint`), then prunes to
storage.keep_last. A directory without its marker is never read; a superseded attempt's
straggler never writes where the current attempt reads (specs/ledger.py, fencing).

A resume loads the DCP state into whatever mesh the new workers build (DCP reshards), so the
world size may change; the data position is (stage, step) in the global batch, which does not
depend on it. A resume never reads an export. The next stage reads the previous stage's export
(load_hf_weights, each rank its rows); an evaluator reads the export when there is one, else
the DCP model shards (ray_jobs/eval/model.py).
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint._consolidate_hf_safetensors import (
    consolidate_safetensors_files_on_every_rank,
)
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from specs.checkpoint import (
    STAGING_GLOB,
    STATE_DIR,
    TrainerState,
    checkpoint_dir,
    dcp_dir,
    parse_checkpoint_name,
    parse_staging_name,
    scheduler_file,
    stage_dir,
    staging_dir,
    write_state,
)
from specs.ledger import Fenced, Ledger, is_committed, mark_committed
from specs.trust import check_run_dir

log = logging.getLogger(__name__)

# The export's files hold at most this many bytes each, tensors grouped in state-dict order, as
# published checkpoints are split (an 8B model in fp32: 7 files). A rank's transient host memory
# while writing is about its share of one file, and one full tensor while consolidating.
EXPORT_FILE_BYTES = 5 * 10**9
EXPORT_SHARDS_DIR = ".export-shards"  # each rank's pieces, inside the staging dir, then removed


def clear_stale_staging(stage_dir: Path, epoch: int | None, name: str | None = None) -> None:
    """Remove staging directories of older attempts (never a newer one's), and this attempt's
    own leftover for the checkpoint `name` (a worker group that died while writing it)."""
    for d in stage_dir.glob(STAGING_GLOB) if stage_dir.is_dir() else ():
        parsed = parse_staging_name(d.name)
        if parsed is None:
            continue
        step_name, e = parsed
        if e < (epoch or 0) or (e == (epoch or 0) and step_name == name):
            shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(ledger: Ledger, model: torch.nn.Module, tokenizer, optimizer, scheduler,
                    state: TrainerState, *, keep_last: int, final: bool,
                    before_commit=None, export_file_bytes: int = EXPORT_FILE_BYTES) -> Path:
    """Write, commit and record a checkpoint; prune the stage's older ones. Collective: every
    rank calls it, and every rank raises `Fenced` if a newer driver attempt owns the run (the
    staged files are then removed; nothing was committed). `model` is the Hugging Face model
    inside the FSDP root. Every checkpoint holds the DCP shards and the small files; a `final`
    one also the Hugging Face export (in files of at most `export_file_bytes`). No rank gathers
    the model. `before_commit(staged_dir)` is a fault-injection hook for tests, run on rank 0
    after every file is written and before the COMMITTED marker. Returns the dir."""
    path = checkpoint_dir(ledger.run_dir, state.stage, state.step)
    # a checkpoints/ or stage folder that is a symlink out of the run would be written through
    ledger.resolve(path.relative_to(ledger.run_dir), "the checkpoint folder")
    staged = staging_dir(path, ledger.epoch)
    rank = dist.get_rank()

    def start() -> None:
        with ledger.fenced():  # a superseded attempt does not even start writing
            clear_stale_staging(path.parent, ledger.epoch, path.name)
            staged.mkdir(parents=True)

    on_rank0(rank, start)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=dcp_dir(staged))
    del model_sd, optim_sd
    if final:  # the stage's one Hugging Face export: every rank writes its part
        write_hf_export(export_state_dict(model), staged, file_bytes=export_file_bytes)

    def commit() -> None:
        # config.json only, not save_pretrained: the weights are the DCP shards (and the
        # export). The ring attention implementation is a training-time choice; evaluators
        # and the next stage set their own.
        # as save_pretrained records them: the class (fully_shard renames it FSDP<class>)
        # and the storage dtype (the export's)
        model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
        model.config.dtype = str(next(model.parameters()).dtype).split(".")[1]
        model.config.save_pretrained(staged)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / STATE_DIR).mkdir()
        torch.save(scheduler.state_dict(), scheduler_file(staged))
        write_state(staged, state)
        if before_commit is not None:
            before_commit(staged)
        mark_committed(staged)
        try:
            ledger.commit_checkpoint(state.stage, state.step, path, final=final, staged=staged)
        except Fenced:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        prune_checkpoints(ledger, state.stage, keep_last)

    # nobody runs ahead of a checkpoint still being written, and all learn if it was refused
    on_rank0(rank, commit)
    return path


def export_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the Hugging Face export holds, as this rank has it: every weight under its Hugging
    Face name, as this rank's shard (a DTensor once parallelize() has run; nothing gathered), in
    the model's storage dtype (fp32 master weights: the next stage starts from them losslessly).
    A tied lm_head is stored once, as embed_tokens (what save_pretrained writes and
    from_pretrained and load_hf_weights read back). Runs under FakeTensorMode (the memory
    trace)."""
    state = get_model_state_dict(model)
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    if (lm_head is not None and inner is not None
            and lm_head.weight is inner.embed_tokens.weight):
        state.pop("lm_head.weight", None)
    return state


def export_file_index(state: dict[str, torch.Tensor], file_bytes: int) -> dict[str, int]:
    """name -> file number (from 1) of the export: tensors in state-dict order, a new file when
    the next tensor would take the current one past `file_bytes` (a larger tensor gets a file of
    its own). Sizes are of whole tensors (a DTensor's shape is the global one)."""
    index, number, used = {}, 1, 0
    for name, tensor in state.items():
        size = math.prod(tensor.shape) * tensor.element_size()
        if used and used + size > file_bytes:
            number, used = number + 1, 0
        index[name] = number
        used += size
    return index


def write_hf_export(state: dict[str, torch.Tensor], out_dir: Path, *,
                    file_bytes: int = EXPORT_FILE_BYTES, process_group=None) -> None:
    """Write the Hugging Face export of `state` (`export_state_dict`) into `out_dir`: the
    model-0000i-of-0000n.safetensors files and model.safetensors.index.json. Collective, on a
    storage every rank sees. Every rank writes its shards of each file into a temporary folder
    (torch's HuggingFaceStorageWriter; its transient host memory is its share of one file), then
    consolidates the output files whose number % world == rank, reading each full tensor's
    pieces from the shard files (about one full tensor in host memory); rank 0 writes the
    index. No rank gathers the model."""
    index = export_file_index(state, file_bytes)
    shards = Path(out_dir) / EXPORT_SHARDS_DIR
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(
        path=str(shards), fqn_to_index_mapping=index, save_distributed=True,
        enable_consolidation=False), process_group=process_group)
    consolidate_safetensors_files_on_every_rank(str(shards), str(out_dir), index,
                                                process_group=process_group)
    dist.barrier(group=process_group)  # every rank has read the shards it needed
    if dist.get_rank(group=process_group) == 0:
        shutil.rmtree(shards)


def on_rank0(rank: int, write) -> None:
    """Rank 0 calls `write` (a fenced write to the run); every rank learns, at one broadcast,
    whether it was refused and then raises the same `Fenced`. Collective."""
    fenced: list[Fenced | None] = [None]
    if rank == 0:
        try:
            write()
        except Fenced as e:
            fenced = [e]
    dist.broadcast_object_list(fenced)
    if fenced[0] is not None:
        raise fenced[0]


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> None:
    """Load a checkpoint's model and optimizer shards into this mesh, and its scheduler.
    Collective: every rank calls it."""
    check_run_dir(path)  # DCP unpickles its metadata: only from files no one else can write
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=dcp_dir(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    # DCP reads every tensor into the tensors of `state`, on this rank's device, shard by shard
    # (never a whole optimizer state on the device it was saved from); the scheduler's state is
    # plain numbers, read onto the CPU.
    scheduler.load_state_dict(torch.load(scheduler_file(path), map_location="cpu",
                                         weights_only=True))


def prune_checkpoints(ledger: Ledger, stage: str, keep_last: int) -> list[str]:
    """Forget all but the newest `keep_last` committed checkpoints in the ledger, then delete
    them. Only a checkpoint directory directly inside the stage's directory, not a symlink,
    named `step-NNNNNN` and carrying its COMMITTED marker is ever deleted; any other entry is
    logged and kept (ledger entry and files), and one leading out of the run is a LedgerError."""
    entry = ledger.read().stages.get(stage)
    old = [c.path for c in (entry.checkpoints if entry else [])][:-keep_last]
    doomed, kept = [], []
    for rel in old:
        path = ledger.resolve(rel, f"stages.{stage}.checkpoints path")
        why = _not_prunable(ledger.run_dir, stage, path)
        if why:
            log.warning("not pruning %s (stages.%s.checkpoints path %r): %s; kept", path, stage,
                        rel, why)
            kept.append(rel)
        else:
            doomed.append((rel, path))
    if doomed:
        ledger.forget_checkpoints(stage, [rel for rel, _ in doomed])
        for _, path in doomed:
            shutil.rmtree(path, ignore_errors=True)
    return [rel for rel, _ in doomed]


def _not_prunable(run_dir: Path, stage: str, path: Path) -> str | None:
    """Why `path` is not a checkpoint of `stage` that pruning may delete, else None (a missing
    one too: it is only forgotten)."""
    expected = stage_dir(run_dir, stage)
    if path.is_symlink():
        return "it is a symlink, not the checkpoint directory itself"
    if (path.absolute().parent != expected.absolute()
            or path.resolve().parent != expected.resolve()):
        return f"it is not directly inside the stage's directory {expected}"
    if parse_checkpoint_name(path.name) is None:
        return "its name is not a checkpoint's (step-NNNNNN)"
    if path.exists() and not (path.is_dir() and is_committed(path)):
        return "it is not a committed checkpoint directory (no COMMITTED marker)"
    return None
