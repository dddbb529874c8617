"""Fault matrix of the trainer (ray_jobs.train) on local Ray: each fault vs an unbroken run.

    python benchmarks/faults.py [--only NAME ...]

Scenarios (the tiny two-stage run of the tests, 2 CPU workers in one ring):
  worker_killed x5      a training worker exits at a step drawn from the seed
  driver_killed x2      the driver is SIGKILLed (seed 0: at once, before any checkpoint; seed 1:
                        after a drawn number of checkpoints) and rerun at once, its workers
                        possibly still alive (fencing must keep them out)
  commit_interrupted    rank 0 dies with a checkpoint written and not yet COMMITTED
  eval_actor_killed     the evaluation actor is SIGKILLed mid-evaluation
  ledger_truncated,     the ledger cut in half / replaced by another document: the driver must
  ledger_corrupt        refuse with one message and change nothing; restored, the run resumes
  storage_full          the run's filesystem (a tmpfs mounted here, root needed) fills during a
                        stage: the stage fails, the previous committed checkpoint survives and
                        loads; with space again, the rerun finishes
Hostile input (a careless or malicious edit, not a crash):
  ledger_tampered x5    the newest checkpoint's path in the ledger set to '.', '..', an absolute
                        path, a symlink out of the run, or a stage renamed '../NAME': refused
                        with one message, nothing inside or outside the run changes; restored,
                        the run resumes
  spec_absurd           each count of the spec at 10^12: one message, in under a second
  checkpoint_with_code  model.path is a checkpoint whose tokenizer_config names a shipped .py:
                        refused before anything loads; the code never runs
Each asserts: no sample skipped or repeated in the steps that made the final model, the losses
equal the uninterrupted run's (rel 1e-5), every committed checkpoint loads (HF export, trainer
state, DCP metadata). Last line: one JSON object with `scenarios`, `passed`, `samples_lost`,
`samples_repeated`, `max_recovery_seconds` (fault to the first trained step after it; the
storage_full scenario needs an operator to free space and is not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray workers start from this environment: they import the fault hooks from tests.support.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import yaml  # noqa: E402

from ray_jobs.ray_setup import state_api_env  # noqa: E402
from specs.checkpoint import CHECKPOINTS_DIR, STAGING_GLOB, dcp_dir, read_state  # noqa: E402
from specs.ledger import Ledger, is_committed  # noqa: E402
from tests.support.faults import (  # noqa: E402
    CrashOnce,
    DieBeforeCommit,
    FillDiskOnce,
    crash_marker,
)
from tests.train.conftest import mini_spec  # noqa: E402

STAGES = {"s64": 6, "s128": 8}
OVERRIDES = {"stages.1.steps": STAGES["s128"], "storage.checkpoint_every": 2,
             "failure.max_failures": 3}
EVAL = {"enabled": True, "tasks": ["niah_lite"], "context_lengths": [64, 128],
        "depths": [0, 50, 100],
        "samples": 4, "cpus": 1, "max_retries": 2}


@dataclass
class Outcome:
    name: str
    passed: bool = False
    samples_lost: int = 0
    samples_repeated: int = 0
    recovery_seconds: float | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def write_spec(tmp: Path, name: str, **overrides) -> Path:
    spec = mini_spec(tmp / "runs", name=name, **{**OVERRIDES, **overrides})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def train(spec: Path, **hooks) -> int:
    from ray_jobs.train.driver import main

    return main(["--run", str(spec)], **hooks)


def records(run_dir: Path, stage: str) -> list[dict]:
    path = run_dir / "metrics" / f"{stage}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def effective(run_dir: Path, stage: str) -> dict[int, dict]:
    """step -> the record of the attempt whose state the final model carries (the last one)."""
    return {r["step"]: r for r in records(run_dir, stage)}


def compare(run_dir: Path, baseline: Path, out: Outcome) -> None:
    """The invariants every scenario must keep, against the uninterrupted run."""
    ledger = Ledger(run_dir)
    for stage, steps in STAGES.items():
        got, want = effective(run_dir, stage), effective(baseline, stage)
        if sorted(got) != list(range(1, steps + 1)):
            out.problems.append(f"{stage}: steps recorded {sorted(got)}")
        have = Counter(s for r in got.values() for s in r["samples"])
        need = Counter(s for r in want.values() for s in r["samples"])
        out.samples_lost += sum((need - have).values())
        out.samples_repeated += sum((have - need).values())
        for step, rec in want.items():
            if step in got and sorted(got[step]["samples"]) != sorted(rec["samples"]):
                out.problems.append(f"{stage} step {step}: other samples")
        latest = ledger.latest_committed(stage)
        if latest is None:
            out.problems.append(f"{stage}: no committed checkpoint")
            continue
        losses = read_state(latest).losses
        base = read_state(Ledger(baseline).latest_committed(stage)).losses
        if len(losses) != len(base) or any(abs(a - b) > 1e-5 * abs(b) for a, b in
                                           zip(losses, base)):
            out.problems.append(f"{stage}: losses {losses} differ from the uninterrupted {base}")
    out.problems += unloadable(run_dir)


def unloadable(run_dir: Path) -> list[str]:
    """Every checkpoint the ledger lists: committed, and its weights (the HF export of a final
    one, else the DCP shards, as an evaluator reads them), trainer state and DCP metadata load."""
    from torch.distributed.checkpoint import FileSystemReader

    from ray_jobs.eval.model import load_checkpoint

    problems, ledger = [], Ledger(run_dir)
    for stage, entry in ledger.read().stages.items():
        for ckpt in entry.checkpoints:
            path = ledger.resolve(ckpt.path)
            try:
                assert is_committed(path), "no COMMITTED marker"
                load_checkpoint(path)  # the export, or the DCP shards of an intermediate one
                read_state(path)
                FileSystemReader(str(dcp_dir(path))).read_metadata()
            except Exception as e:  # noqa: BLE001 - reported, the scenario fails
                problems.append(f"{ckpt.path}: does not load ({type(e).__name__}: {e})")
    return problems


def first_step_after(run_dir: Path, t: float) -> float | None:
    times = [r["time"] for s in STAGES for r in records(run_dir, s) if r["time"] > t]
    return min(times) - t if times else None


# -- scenarios ----------------------------------------------------------------------------------
def worker_killed(tmp: Path, seed: int, out: Outcome) -> Path:
    rng = random.Random(seed)
    stage = rng.choice(list(STAGES))
    step = rng.randrange(1, STAGES[stage])
    spec = write_spec(tmp, f"worker-{seed}")
    run_dir = tmp / "runs" / f"worker-{seed}"
    if train(spec, before_step=CrashOnce(stage, step)) != 0:
        out.problems.append("the run failed")
    marker = crash_marker(run_dir, stage, step)
    if not marker.exists():
        out.problems.append(f"the worker was never killed at {stage} step {step}")
    else:
        out.recovery_seconds = first_step_after(run_dir, marker.stat().st_mtime)
    out.name += f" ({stage} step {step})"
    return run_dir


def driver_killed(tmp: Path, seed: int, out: Outcome, gcs: str) -> Path:
    rng = random.Random(seed)
    spec = write_spec(tmp, f"driver-{seed}")
    run_dir = tmp / "runs" / f"driver-{seed}"
    ledger = Ledger(run_dir)
    wait_for = 0 if seed == 0 else rng.randrange(1, 4)  # committed checkpoints before the kill
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.train", "--run", str(spec),
                             "--address", gcs], cwd=REPO, env={**os.environ, **state_api_env()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        doc = ledger.read() if ledger.path.exists() else None
        done = sum(len(e.checkpoints) for e in doc.stages.values()) if doc else 0
        if doc is not None and doc.epoch >= 1 and done >= wait_for:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    out.name += f" (after {wait_for} checkpoint(s))"
    if train(spec) != 0:  # at once: the killed driver's workers may still be running
        out.problems.append("the rerun failed")
    for stage in STAGES:
        recs = records(run_dir, stage)
        new = [i for i, r in enumerate(recs) if r["epoch"] == 2]
        if new and any(r["epoch"] != 2 for r in recs[new[0]:]):
            out.problems.append(f"{stage}: an attempt-1 line landed after attempt 2 began")
    out.recovery_seconds = first_step_after(run_dir, killed_at)
    return run_dir


def commit_interrupted(tmp: Path, out: Outcome) -> Path:
    spec = write_spec(tmp, "commit")
    run_dir = tmp / "runs" / "commit"
    if train(spec, before_commit=DieBeforeCommit("s64", 4)) != 0:
        out.problems.append("the run failed")
    marker = run_dir / ".commit-interrupted-s64-4"
    if not marker.exists():
        out.problems.append("rank 0 never died before the commit")
    else:
        out.recovery_seconds = first_step_after(run_dir, marker.stat().st_mtime)
    left = sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).rglob(STAGING_GLOB))
    if left:
        out.problems.append(f"staging directories left behind: {left}")
    return run_dir


def eval_actor_killed(tmp: Path, out: Outcome) -> Path:
    # keep every checkpoint: a pruned checkpoint cannot be evaluated (the scheduler then
    # records it failed, rightly), which would hide whether the killed evaluation recovered
    spec = write_spec(tmp, "eval", eval=EVAL, **{"storage.keep_last": 10})
    run_dir = tmp / "runs" / "eval"
    ledger, killed = Ledger(run_dir), {}

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            doc = ledger.read() if ledger.path.exists() else None
            running = [(s, p) for s, e in (doc.stages.items() if doc else ())
                       for p, ev in e.eval.items() if ev.status == "running"]
            if running:
                pids = subprocess.run(["pgrep", "-f", "ray::EvalActor"], capture_output=True,
                                      text=True).stdout.split()
                for pid in pids:
                    os.kill(int(pid), signal.SIGKILL)
                if pids:
                    killed.update(at=time.time(), path=running[0][1])
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    if train(spec) != 0:
        out.problems.append("the run failed")
    thread.join(5)
    doc = ledger.read()
    evals = {p: ev for e in doc.stages.values() for p, ev in e.eval.items()}
    if not killed:
        out.problems.append("no evaluation actor was killed")
    else:
        ev = evals.get(killed["path"])
        if ev is None or ev.status != "done" or ev.attempts < 2:
            out.problems.append(f"the killed evaluation of {killed['path']} ended {ev}")
        done = run_dir / ev.results if ev and ev.results else None
        if done is not None and done.exists():
            out.recovery_seconds = done.stat().st_mtime - killed["at"]
    bad = {p: ev.status for p, ev in evals.items() if ev.status != "done"}
    if bad:
        out.problems.append(f"evaluations not done: {bad}")
    return run_dir


def ledger_broken(tmp: Path, out: Outcome, how: str) -> Path:
    spec = write_spec(tmp, f"ledger-{how}")
    run_dir = tmp / "runs" / f"ledger-{how}"
    from ray_jobs.train.driver import main

    if main(["--run", str(spec), "--stage", "s64"]) != 0:
        out.problems.append("stage s64 failed")
    good = (run_dir / "ledger.json").read_text()
    broken = good[: len(good) // 2] if how == "truncated" else '{"run": "x", "stages": []}'
    (run_dir / "ledger.json").write_text(broken)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    err = tempfile.TemporaryFile(mode="w+")
    saved, sys.stderr = sys.stderr, err
    try:
        code = train(spec)
    finally:
        sys.stderr = saved
    err.seek(0)
    lines = [x for x in err.read().splitlines() if x.strip()]
    if code != 2 or len(lines) != 2 or "not a valid run ledger" not in lines[-1]:
        out.problems.append(f"the driver did not refuse with one message: {code} {lines}")
    if (run_dir / "ledger.json").read_text() != broken:
        out.problems.append("the broken ledger was rewritten")
    changed = [str(p) for p, t in before.items() if not p.exists() or p.stat().st_mtime_ns != t]
    if changed:
        out.problems.append(f"the refused run changed files: {changed}")
    (run_dir / "ledger.json").write_text(good)  # the operator restores it from a backup
    if train(spec) != 0:
        out.problems.append("the run did not resume with the restored ledger")
    return run_dir


def refused(spec: Path) -> tuple[int, list[str], float]:
    """Run the driver on `spec`: its exit code, its non-empty stderr lines and its seconds."""
    err = tempfile.TemporaryFile(mode="w+")
    saved, sys.stderr = sys.stderr, err
    started = time.perf_counter()
    try:
        code = train(spec)
    finally:
        sys.stderr = saved
    seconds = time.perf_counter() - started
    err.seek(0)
    return code, [x for x in err.read().splitlines() if x.strip()], seconds


def snapshot(*roots: Path) -> dict[Path, int]:
    """Every file (and symlink) under `roots` with its modification time."""
    return {p: p.lstat().st_mtime_ns for root in roots for p in root.rglob("*")
            if p.is_file() or p.is_symlink()}


def ledger_tampered(tmp: Path, out: Outcome, how: str) -> Path:
    """The ledger edited to lead out of the run: the newest committed checkpoint at '.', '..',
    an absolute path or a symlink to a directory outside, or a stage named '../NAME'. The driver
    refuses with one message; nothing inside or outside the run is read into, written or
    deleted; with the ledger restored, the run resumes."""
    spec = write_spec(tmp, f"tampered-{how}")
    run_dir = tmp / "runs" / f"tampered-{how}"
    outside = tmp / f"outside-{how}"
    (outside / "checkpoint").mkdir(parents=True)
    (outside / "checkpoint" / "COMMITTED").write_text("a directory that looks like one\n")
    (outside / "keep.txt").write_text("must survive\n")
    from ray_jobs.train.driver import main

    if main(["--run", str(spec), "--stage", "s64"]) != 0:
        out.problems.append("stage s64 failed")
    good = (run_dir / "ledger.json").read_text()
    doc = json.loads(good)
    newest = doc["stages"]["s64"]["checkpoints"][-1]
    if how == "dot":
        newest["path"] = "."
    elif how == "dotdot":
        newest["path"] = f"../../outside-{how}/checkpoint"
    elif how == "absolute":
        newest["path"] = str(outside / "checkpoint")
    elif how == "symlink":
        link = run_dir / "checkpoints" / "s64" / "step-999999"
        link.symlink_to(outside / "checkpoint", target_is_directory=True)
        newest["path"] = str(link.relative_to(run_dir))
    elif how == "stage-name":
        doc["stages"][f"../../outside-{how}"] = doc["stages"].pop("s64")
    (run_dir / "ledger.json").write_text(json.dumps(doc))
    tampered = (run_dir / "ledger.json").read_text()
    before = snapshot(run_dir, outside)
    code, lines, _ = refused(spec)
    if code != 2 or not 1 <= len(lines) <= 2:
        out.problems.append(f"the driver did not refuse with one message: {code} {lines}")
    if (run_dir / "ledger.json").read_text() != tampered:
        out.problems.append("the tampered ledger was rewritten")
    after = snapshot(run_dir, outside)
    changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
    if changed:
        out.problems.append(f"the refused run changed files: {changed}")
    if how == "symlink":
        (run_dir / "checkpoints" / "s64" / "step-999999").unlink()
    (run_dir / "ledger.json").write_text(good)  # the operator restores it from a backup
    if train(spec) != 0:
        out.problems.append("the run did not resume with the restored ledger")
    return run_dir


def checkpoint_with_code(tmp: Path, out: Outcome, baseline: Path) -> None:
    """A run whose model.path is a checkpoint carrying code (a tokenizer module named by an
    auto_map): the driver refuses before anything loads, with one message, and the code never
    runs (the marker it would write does not appear)."""
    from tests.test_trust import plant_code

    model = tmp / "hostile-model"
    latest = Ledger(baseline).latest_committed("s64")
    shutil.copytree(latest, model, ignore=shutil.ignore_patterns("dcp", "trainer_state",
                                                                 "COMMITTED"))
    marker = tmp / "CODE-RAN"
    plant_code(model, marker)
    spec = write_spec(tmp, "hostile-model", **{"model.path": str(model)})
    code, lines, _ = refused(spec)
    if code != 2 or not 1 <= len(lines) <= 2:
        out.problems.append(f"not one clear refusal: {code} {lines}")
    if marker.exists():
        out.problems.append("the checkpoint's code ran")
    if (tmp / "runs" / "hostile-model").exists():
        out.problems.append("a refused run created its run directory")


# Counts no real run has: each must be refused at once, before Ray or a model is touched.
ABSURD = {"model.num_key_value_heads": 10**12, "model.num_attention_heads": 10**12,
          "model.num_hidden_layers": 10**12, "model.vocab_size": 10**12,
          "stages.0.data_parallel_degree": 10**12, "stages.0.ring_degree": 10**12,
          "stages.0.seq_len": 10**12, "stages.0.steps": 10**12, "resources.workers": 10**12}


def spec_absurd(tmp: Path, out: Outcome) -> None:
    """Every count at 10^12, one at a time: refused with one message in under a second."""
    for dotted, value in ABSURD.items():
        spec = write_spec(tmp, "absurd", **{dotted: value})
        code, lines, seconds = refused(spec)
        if code != 2 or not 1 <= len(lines) <= 2 or dotted.split(".")[-1] not in lines[-1]:
            out.problems.append(f"{dotted}={value}: not one clear refusal: {code} {lines}")
        if seconds > 1.0:
            out.problems.append(f"{dotted}={value}: refused after {seconds:.1f} s (limit 1 s)")
    if (tmp / "runs" / "absurd").exists():
        out.problems.append("a refused spec created its run directory")


def storage_full(tmp: Path, out: Outcome) -> Path | None:
    mount = tmp / "small-fs"
    mount.mkdir()
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if got.returncode != 0:
        out.problems.append(f"cannot mount a 64 MiB tmpfs here ({got.stderr.strip()}); "
                            "run as root to include this scenario")
        return None
    try:
        spec_dict = mini_spec(mount / "runs", name="full", **OVERRIDES)
        spec = tmp / "full.yaml"
        spec.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        run_dir = mount / "runs" / "full"
        filler = mount / "filler"
        code = train(spec, before_step=FillDiskOnce("s128", 3, str(filler)))
        if code == 0 or not filler.exists():
            out.problems.append(f"the full filesystem did not fail the stage (exit {code})")
        survived = Ledger(run_dir).latest_committed("s128")
        if survived is None or survived.name != "step-000002":
            out.problems.append(f"the committed checkpoint before the fill is gone: {survived}")
        out.problems += unloadable(run_dir)
        filler.unlink()  # the operator frees space
        if train(spec) != 0:
            out.problems.append("the rerun with space again failed")
        keep = tmp / "runs" / "full"
        shutil.copytree(run_dir, keep, symlinks=True)
        return keep
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None,
                        help="scenario names (prefixes) to run, e.g. worker_killed storage_full")
    args = parser.parse_args()
    import ray

    from ray_jobs.ray_setup import start_local_ray

    gcs = start_local_ray(4, log_to_driver=False,
                          env_vars={"PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "1"})
    tmp = Path(tempfile.mkdtemp(prefix="ringpilot-faults-"))
    t0 = time.perf_counter()
    base_spec = write_spec(tmp, "baseline")
    assert train(base_spec) == 0, "the uninterrupted run failed"
    baseline = tmp / "runs" / "baseline"
    print(f"baseline: {time.perf_counter() - t0:.0f} s", flush=True)

    plan = [(f"worker_killed/{s}", lambda o, s=s: worker_killed(tmp, s, o)) for s in range(5)]
    plan += [(f"driver_killed/{s}", lambda o, s=s: driver_killed(tmp, s, o, gcs)) for s in (0, 1)]
    plan += [("commit_interrupted", lambda o: commit_interrupted(tmp, o)),
             ("eval_actor_killed", lambda o: eval_actor_killed(tmp, o)),
             ("ledger_truncated", lambda o: ledger_broken(tmp, o, "truncated")),
             ("ledger_corrupt", lambda o: ledger_broken(tmp, o, "corrupt")),
             ("storage_full", lambda o: storage_full(tmp, o))]
    plan += [(f"ledger_tampered/{how}", lambda o, how=how: ledger_tampered(tmp, o, how))
             for how in ("dot", "dotdot", "absolute", "symlink", "stage-name")]
    plan += [("spec_absurd", lambda o: spec_absurd(tmp, o)),
             ("checkpoint_with_code", lambda o: checkpoint_with_code(tmp, o, baseline))]
    if args.only:
        plan = [(n, f) for n, f in plan if any(n.startswith(p) for p in args.only)]
    outcomes = []
    for name, scenario in plan:
        out, started = Outcome(name), time.perf_counter()
        try:
            run_dir = scenario(out)
            if run_dir is not None:
                compare(run_dir, baseline, out)
        except Exception as e:  # noqa: BLE001 - a scenario that breaks fails, the rest go on
            out.problems.append(f"{type(e).__name__}: {e}")
        out.seconds = time.perf_counter() - started
        out.passed = not out.problems and not out.samples_lost and not out.samples_repeated
        outcomes.append(out)
        rec = "-" if out.recovery_seconds is None else f"{out.recovery_seconds:.1f} s"
        print(f"{'PASS' if out.passed else 'FAIL'} {out.name}: lost {out.samples_lost}, "
              f"repeated {out.samples_repeated}, recovery {rec}, {out.seconds:.0f} s"
              + "".join(f"\n    {p}" for p in out.problems), flush=True)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    recoveries = [o.recovery_seconds for o in outcomes if o.recovery_seconds is not None]
    print(json.dumps({
        "scenarios": len(outcomes), "passed": sum(o.passed for o in outcomes),
        "samples_lost": sum(o.samples_lost for o in outcomes),
        "samples_repeated": sum(o.samples_repeated for o in outcomes),
        "max_recovery_seconds": round(max(recoveries), 1) if recoveries else None,
        "failed": [o.name for o in outcomes if not o.passed],
    }))
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
