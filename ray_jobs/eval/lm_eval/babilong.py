"""lm-eval's BABILong tasks on one checkpoint, at the BABILong config each evaluated length holds.

BABILong's data is a fixed dataset (RMT-team/babilong-1k-samples, one config per context size:
0k, 1k, ... 128k, k = 1,024 tokens); a length runs the largest config that fits it. With
eval.data_dir the tasks read the folder's save_to_disk copy through their `custom_dataset` hook;
without it lm-eval loads the hub dataset (offline: listed as not run, with the reason).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ray_jobs.eval.lm_eval.adapter import MODEL_NAME, RulerInputError, require_lm_eval
from ray_jobs.eval.lm_eval.offline_data import (
    BABILONG_CONFIGS,
    babilong_config,
    babilong_splits,
    check_data_dir,
    local_babilong,
)

BABILONG_TASKS: tuple[str, ...] = tuple(f"babilong_qa{i}" for i in range(1, 21))
# lm-eval's babilong_longctx group: the five tasks BABILong has at every length
LONG_TASKS: tuple[str, ...] = BABILONG_TASKS[:5]


@dataclass
class PreparedBabilong:
    checkpoint: str
    configs: dict[str, list[int]]  # config -> the evaluated lengths it stands for
    tasks: dict[str, dict]  # config -> {task name: lm-eval Task}
    managers: dict[str, object]
    unavailable: dict[str, str] = field(default_factory=dict)  # "task@config" -> why


def prepare_babilong(checkpoint: str | Path, lengths: Sequence[int],
                     tasks: Sequence[str] = LONG_TASKS,
                     data_dir: str | Path | None = None) -> PreparedBabilong:
    """lm-eval's BABILong `tasks` loaded for the configs of `lengths`."""
    require_lm_eval()
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    unknown = [t for t in tasks if t not in BABILONG_TASKS]
    if unknown:
        raise RulerInputError(f"unknown BABILong task(s) {unknown}; lm-eval's are "
                              f"babilong_qa1 .. babilong_qa20")
    configs: dict[str, list[int]] = {}
    for n in sorted(set(lengths)):
        configs.setdefault(babilong_config(n), []).append(n)
    data = check_data_dir(data_dir, babilong_configs=list(configs)) if data_dir else None
    folder = Path(lm_eval.tasks.__file__).parent / "babilong"
    prepared = PreparedBabilong(str(checkpoint), configs, {}, {})
    for config in configs:
        manager = TaskManager(include_path=folder, include_defaults=False,
                              metadata={"max_seq_lengths": config})
        have = babilong_splits(data, config) if data else None
        built = {}
        for task in tasks:
            split = task.removeprefix("babilong_")
            if have is not None and split not in have:
                prepared.unavailable[f"{task}@{config}"] = (
                    f"eval.data_dir holds no split {split} of BABILong's {config} config "
                    f"(it has {', '.join(have)}; BABILong has qa6..qa20 at 0k only)")
                continue
            try:
                with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
                        local_babilong(data) if data else contextlib.nullcontext():
                    built.update(manager.load([task])["tasks"])
            except Exception as e:  # noqa: BLE001 - a task that cannot load its data is reported
                first = (str(e).strip().splitlines() or [""])[0][:200]
                prepared.unavailable[f"{task}@{config}"] = (
                    f"{type(e).__name__}: {first}" + ("" if data else
                                                      "; give eval.data_dir to run it offline"))
        if built:
            prepared.tasks[config], prepared.managers[config] = built, manager
    return prepared


def evaluate_babilong(prepared: PreparedBabilong, out_dir: str | Path, *,
                      limit: int | None = None, model: str | type = MODEL_NAME,
                      device: str = "cpu", compute_dtype: str = "float32") -> dict:
    """Each config's tasks through lm_eval.simple_evaluate with the backend `model`; returns the
    results document (rows per config: its size in tokens, the mean accuracy over tasks x 100,
    samples, per task) and writes it to OUT_DIR/babilong_table.json."""
    import lm_eval

    from ray_jobs.eval.lm_eval.ruler import backend_class

    start = time.perf_counter()
    cls = backend_class(model) if isinstance(model, str) else model
    extra = {"compute_dtype": compute_dtype} if compute_dtype != "float32" else {}
    lm = cls(pretrained=prepared.checkpoint, device=device, **extra)
    rows = []
    for config, tasks in prepared.tasks.items():
        samples = {name: list(range(min(limit or len(t.eval_docs), len(t.eval_docs))))
                   for name, t in tasks.items()}
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()),
                                          task_manager=prepared.managers[config],
                                          samples=samples, bootstrap_iters=0)
        per_task = {t: 100.0 * results["results"][t]["acc,none"] for t in tasks}
        rows.append({"config": config, "length": BABILONG_CONFIGS[config],
                     "lengths": prepared.configs[config],
                     "score": sum(per_task.values()) / len(per_task),
                     "samples": sum(len(s) for s in samples.values()), "tasks": per_task})
    doc = {"checkpoint": prepared.checkpoint, "rows": rows, "unavailable": prepared.unavailable,
           "seconds": time.perf_counter() - start}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "babilong_table.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc
