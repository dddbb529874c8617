"""Staged long-context training on Ray Train: `python -m ray_jobs.train --run RUN.yaml`.

Submitted to a Ray cluster with
    ray job submit --address http://HEAD:8265 --working-dir . \\
        -- python -m ray_jobs.train --run RUN.yaml
One stage on its own GPUs (the 8B recipe's first stage on one 8-GPU node):
    python -m ray_jobs.train --run configs/llama3-8b-1m.yaml --stage 65k \\
        --cluster configs/clusters/l40s-8x-2s.yaml
With no --run it trains the embedded default, configs/tiny.yaml. Rerunning the same command
resumes: finished stages are skipped, the current one restarts from its last committed checkpoint.

The driver: (1) check the RunSpec against the filesystem and the Ray cluster, before any worker
starts, and take the run (the ledger's next epoch: a driver still running, or the workers of a
killed one, can no longer write to it); (2) build the tokenizer and the plan, and prepare
data.prepared if it is missing (ray_jobs.data.prepare; stale or too small: refused); (3) start
evaluation, progress and the ring-health watch (ray_jobs.train.watch: slow ring hops, stopped
ranks); (4) run one TorchTrainer per stage
(ray_jobs.train.loop.train_stage_worker), recording stages in the ledger; (5) print the summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray_jobs.data.inputs import list_files
from ray_jobs.data.prepare import check_prepared
from ray_jobs.data.prepared import PrepareError
from ray_jobs.data.samples import read_documents
from ray_jobs.data.tokenizer import TokenizerError, build_tokenizer, resolve_tokenizer_source
from ray_jobs.ray_setup import connect_ray, quiet_run_config
from ray_jobs.ring_attention.families import checkpoint_problems
from ray_jobs.ring_attention.kernels import kernel_problems
from ray_jobs.train.config import StepInfo, WorkerConfig
from ray_jobs.train.heartbeat import FLIGHT_RECORDER_PREFIX, flight_recorder_env, health_dir
from ray_jobs.train.placement import (
    NODE_LABEL,
    check_capacity,
    only_stages,
    plan_for_cluster,
    write_plan,
)
from specs.atomic import writable_dir_problem
from specs.checkpoint import CheckpointError, TrainerState, final_checkpoint, read_state
from specs.ledger import Fenced, Ledger, LedgerError
from specs.loading import SpecError, load_or_report
from specs.plan import Plan
from specs.run import RunSpec, StageSpec, describe_attention
from specs.trust import check_checkpoint_is_data
from topology.eval_plan import eval_gpus_beside
from topology.planner import PlanError

DEFAULT_RUN = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN,
                        help="RunSpec YAML (default: the embedded tiny run)")
    parser.add_argument("--stage", default=None,
                        help="train only this stage (by name), resuming from the ledger; only "
                        "its ring x dp x ulysses GPUs are planned and checked. The Kubernetes "
                        "operator runs one stage per RayJob this way")
    parser.add_argument("--cluster", type=Path, default=None,
                        help="ClusterSpec YAML to plan on instead of the run's "
                        "resources.cluster (e.g. configs/clusters/l40s-8x-2s.yaml, one 8-GPU "
                        "node, for a first stage)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, the job's cluster, or a "
                        "new local one)")
    parser.add_argument("--calibrate", default=None, metavar="CLUSTER",
                        help="ClusterSpec YAML of the cluster this runs on: measure its profile "
                        "first (ringpilot calibrate; kept in RUN_DIR/calibration/ for a resumed "
                        "run) and show the step time it predicts beside the measured one in "
                        "the summary")
    return parser


class PreflightError(Exception):
    """Problems found before any worker starts, one line each."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class Prepared:
    """What the preflight read and decided, used from then on (nothing is read twice)."""

    documents: list[str]  # data.documents' texts (empty when the mix has none)
    plan: Plan | None  # the plan on resources.cluster; None: planned where Ray puts workers
    layout: Plan | None  # the degrees every stage runs with: `plan`, or from resources.workers
    workers: int  # the workers Ray must offer: resources.workers, or a --stage's world
    workers_from: str  # what asks for them, named in the capacity error


def select_stages(run: RunSpec, only: str | None) -> list[int] | None:
    """The index of the --stage to train (None: every stage); PreflightError for an unknown
    name. Whether it may start (the previous stage done) is plan_stages' question."""
    names = [s.name for s in run.stages]
    if only is None:
        return None
    if only not in names:
        raise PreflightError([f"--stage: no stage {only!r} in the run "
                              f"(stages: {', '.join(names)})"])
    return [names.index(only)]


def plan_stages(run: RunSpec, only: str | None, run_dir: Path) -> list[int]:
    """Indices of the stages to train; --stage needs the previous stage done in the ledger."""
    names = [s.name for s in run.stages]
    if only is None:
        return list(range(len(names)))
    [index] = select_stages(run, only)
    if index > 0:
        prev = names[index - 1]
        entry = Ledger(run_dir, run.name).read().stages.get(prev)
        if entry is None or entry.state != "done":
            raise PreflightError([f"--stage {only}: the previous stage {prev!r} is "
                                  f"{entry.state if entry else 'not started'} in the ledger "
                                  f"{run_dir / 'ledger.json'}; train {prev!r} first"])
    return [index]


def preflight(run: RunSpec, spec_dir: Path, run_dir: Path,
              stages: list[int] | None = None) -> Prepared:
    """Everything checkable without workers: storage, tokenizer, attention kernel, documents,
    degrees, cluster plan. `stages` (--stage): plan and check the capacity for these alone, on
    their own ring x dp x ulysses GPUs. Returns what it read and planned; raises PreflightError
    with every problem."""
    problems, documents, plan = [], [], None
    new_run_dir = not run_dir.exists()
    unwritable = writable_dir_problem(run_dir)
    if unwritable:
        problems.append(f"storage.path: cannot write the run directory {run_dir} "
                        f"({unwritable}); give a writable (shared) directory")
    try:
        resolve_tokenizer_source(run, spec_dir)
    except TokenizerError as e:
        problems.append(str(e))
    if run.model.path is not None:  # a model directory is data: refused if it carries code
        try:
            check_checkpoint_is_data(spec_dir / run.model.path)
            problems += [f"model.path: {p}" for p in checkpoint_problems(run, spec_dir)]
        except CheckpointError as e:
            problems.append(f"model.path: {e}")
    problems += rope_problems(run, spec_dir)
    problems += kernel_problems(run.resources.device, run.compute_dtype, run.model.head_dim)
    try:
        documents = read_documents(run, spec_dir)
    except FileNotFoundError as e:
        problems.append(str(e))
    if run.data.prepared is not None and run.data.mix.documents > 0:
        try:  # the inputs exist; their contents are checked (or prepared) once Ray is up
            list_files(run.data.prepared, spec_dir)
        except PrepareError as e:
            problems.append(str(e))
    if run.eval.enabled and run.eval.kamradt is not None:
        from ray_jobs.eval.tasks import haystack_files, read_haystack

        try:
            read_haystack(haystack_files(run.eval.kamradt.haystack, spec_dir))
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    try:  # the ledger of a run being resumed: readable, every path in it inside the run
        check_ledger(Ledger(run_dir, run.name))
    except LedgerError as e:
        problems.append(f"storage: {e}")
    layout, planned = None, only_stages(run, stages)
    try:  # the degrees, resolved once (specs.degrees.resolve_degrees), or why they cannot be
        if run.resources.cluster:
            plan = layout = plan_for_cluster(planned, spec_dir)
        else:
            layout = check_capacity(planned, spec_dir)
    except (PlanError, SpecError, ValueError) as e:
        hint = ("; or train one stage at a time on its own GPUs (--stage NAME)"
                if stages is None and len(run.stages) > 1 and isinstance(e, PlanError) else "")
        problems.append(f"resources: {e.render() if isinstance(e, SpecError) else e}{hint}")
    if problems:
        if new_run_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a refused run leaves nothing behind (the write probe made it)
        raise PreflightError(problems)
    workers, workers_from = run.resources.workers, "resources.workers"
    if stages is not None:
        dims = layout.stage(run.stages[stages[0]].name).dims
        workers = dims.world
        workers_from = (f"--stage {run.stages[stages[0]].name} (ring x dp x ulysses = "
                        f"{dims.ring} x {dims.dp} x {dims.ulysses})")
    return Prepared(documents=documents, plan=plan, layout=layout, workers=workers,
                    workers_from=workers_from)


def check_ledger(ledger: Ledger) -> None:
    """Raise LedgerError if the ledger cannot be read or names a path outside the run."""
    for name, entry in ledger.read().stages.items():
        for ckpt in entry.checkpoints:
            ledger.resolve(ckpt.path, f"{ledger.path}: stages.{name}.checkpoints path")
        for ev in entry.eval.values():
            if ev.results:
                ledger.resolve(ev.results, f"{ledger.path}: stages.{name}.eval results")


ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads")


def check_checkpoint_shapes(run: RunSpec, run_dir: Path, indices: list[int]) -> None:
    """The checkpoints the stages would start from must be the RunSpec's model: a run directory
    reused for another model would otherwise fail inside every worker."""
    ledger, problems = Ledger(run_dir, run.name), []
    for index in indices:
        name = run.stages[index].name
        start = ledger.latest_committed(name)
        if start is None and index > 0:
            start = final_checkpoint(ledger, run.stages[index - 1].name)
        config = start / "config.json" if start is not None else None
        if config is None or not config.is_file():
            continue
        saved = json.loads(config.read_text())
        wrong = [f"{key} {saved.get(key)} (model.{key} is {getattr(run.model, key)})"
                 for key in ARCHITECTURE if saved.get(key) != getattr(run.model, key)]
        if wrong:
            problems.append(f"stages ({name}): the checkpoint it starts from, {start}, is another "
                            f"model: {', '.join(wrong)}; point storage.path or name at a fresh "
                            "run directory, or fix model")
    if problems:
        raise PreflightError(problems)


def check_ray_capacity(run: RunSpec, workers: int | None = None,
                       workers_from: str = "resources.workers", eval_gpus: float = 0) -> None:
    """Refuse to start a trainer that Ray could never schedule (it would wait forever).
    `workers` (default resources.workers): what the stages to train start, `workers_from` what
    asks for them (a --stage needs only its own world); `eval_gpus`: what the plan evaluates
    beside training (topology.eval_plan.eval_gpus_beside)."""
    import ray

    workers = run.resources.workers if workers is None else workers
    key = "GPU" if run.resources.device == "gpu" else "CPU"
    need = workers * (1 if key == "GPU" else run.resources.cpus_per_worker)
    extra = eval_gpus if key == "GPU" else 0
    have = ray.cluster_resources().get(key, 0)
    if have < need + extra:
        fix = ("lower resources.workers / cpus_per_worker" if workers_from == "resources.workers"
               else "lower the stage's degrees or resources.cpus_per_worker")
        beside = (f" plus {extra:g} for evaluation beside training (plan.json eval.stages; "
                  "or set eval.gpus 0)" if extra else "")
        raise PreflightError([f"{workers_from}: {workers} {run.resources.device} "
                              f"workers need {need:g} {key}{beside} but the Ray cluster has "
                              f"{have:g}; add nodes or {fix}"])


def ray_train_name(run: RunSpec, stage: str, epoch: int | None) -> str:
    """Ray Train's run name, one per driver attempt. Within an attempt Ray Train restarts failed
    workers from its own state under <run dir>/ray/<name>; across attempts the ledger alone
    says where to resume, so a rerun never reads what an earlier attempt left there (seen:
    Ray Train's checkpoint-manager state, written while the disk was full, left truncated, and
    every later TorchTrainer of that name refused to start)."""
    return f"{run.name}-{stage}" + (f"-attempt{epoch}" if epoch is not None else "")


def train_stage(config: WorkerConfig) -> None:
    """One TorchTrainer for one stage: workers = ring x dp from the plan."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    quiet = quiet_run_config()
    from ray.train.torch import TorchTrainer

    from ray_jobs.train.loop import train_stage_worker

    run, stage, run_dir = config.run, config.stage, config.run_dir
    res = run.resources
    gpu = res.device == "gpu"
    label_selector = None
    if config.plan is not None:  # pin each worker to its planned node; positions from the plan
        label_selector = [{NODE_LABEL: w.node} for w in config.plan.workers]
    scaling = ScalingConfig(num_workers=config.workers, use_gpu=gpu,
                            resources_per_worker={"CPU": res.cpus_per_worker,
                                                  **({"GPU": 1} if gpu else {})},
                            label_selector=label_selector)
    trainer = TorchTrainer(
        functools.partial(train_stage_worker, config), scaling_config=scaling,
        run_config=RunConfig(
            name=ray_train_name(run, stage.name, config.epoch), storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=run.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.storage.keep_last),
            worker_runtime_env=worker_runtime_env(config), **quiet,
        ),
    )
    trainer.fit()


def worker_runtime_env(config: WorkerConfig) -> dict:
    """The stage's workers' runtime environment (merged by Ray with the job's): on GPUs, NCCL's
    flight recorder on, dumping into the attempt's health directory (made now: the dump does
    not make it), so a hang that reaches NCCL's timeout leaves a record of every collective."""
    if config.run.resources.device != "gpu":
        return {}
    beats = health_dir(config.run_dir, config.stage.name, config.epoch)
    beats.mkdir(parents=True, exist_ok=True)
    return {"env_vars": flight_recorder_env(beats / FLIGHT_RECORDER_PREFIX)}


FENCED_EXIT = 3  # a newer driver took the run over while this one ran


def preflight_command(run: RunSpec, spec_dir: Path, run_path: Path, address: str | None,
                      stage: str | None) -> list[str]:
    """The `python -m ray_jobs.preflight` command failure.preflight runs before training: the
    stages this driver trains, on its cluster file, joining its Ray cluster."""
    cluster = Path(run.resources.cluster)
    cmd = [sys.executable, "-m", "ray_jobs.preflight", "--run", str(run_path.resolve()),
           "--cluster", str(cluster if cluster.is_absolute() else spec_dir / cluster),
           "--out", str(run.run_dir / "preflight")]
    return cmd + (["--address", address] if address else []) + (
        ["--stage", stage] if stage else [])


def fabric_preflight(run: RunSpec, spec_dir: Path, run_path: Path, address: str | None,
                     stage: str | None, runner: Callable[[list[str]], int] | None = None) -> int:
    """Run the preflight (failure.preflight) and return its exit status: 0 nothing found, 1
    findings, 2 bad input. A process of its own, not an import: the preflight wing sits above
    the trainer's (it builds the trainer's meshes), and its Ray Train worker group ends before
    the stage's starts."""
    import subprocess

    if not run.resources.cluster:
        print("failure.preflight: the preflight times the planned rings of a cluster "
              "description; give resources.cluster (or --cluster CLUSTER.yaml), or set "
              "failure.preflight: false", file=sys.stderr)
        return 2
    cmd = preflight_command(run, spec_dir, run_path, address, stage)
    print(f"preflight (failure.preflight): {' '.join(cmd[1:])}", flush=True)
    return (runner or (lambda c: subprocess.run(c).returncode))(cmd)


def main(argv: list[str] | None = None, *,
         before_step: Callable[[StepInfo], None] | None = None,
         before_commit: Callable[[Path], None] | None = None) -> int:
    """The driver. `before_step` (every worker, before each step) and `before_commit` (rank 0,
    a checkpoint written but not yet committed) are test hooks for fault injection."""
    args = build_arg_parser().parse_args(argv)
    run = load_or_report(args.run, RunSpec)
    if run is None:
        return 2
    if args.cluster is not None:
        if not args.cluster.is_file():
            print(f"--cluster: no file {args.cluster} (give a ClusterSpec YAML, e.g. "
                  "configs/clusters/l40s-8x-2s.yaml for one 8-GPU node)", file=sys.stderr)
            return 2
        run = run.model_copy(update={"resources": run.resources.model_copy(
            update={"cluster": str(args.cluster.resolve())})})
    spec_dir, run_dir = args.run.resolve().parent, run.run_dir

    # 1. Check everything that can be checked before a worker starts.
    try:
        chosen = select_stages(run, args.stage)
        prepared = preflight(run, spec_dir, run_dir, chosen)
        indices = plan_stages(run, args.stage, run_dir)
        check_checkpoint_shapes(run, run_dir, indices)
    except PreflightError as e:
        print(f"{args.run}: cannot start\n" + "\n".join(f"  {line}" for line in e.lines),
              file=sys.stderr)
        return 2
    if run.failure.preflight:
        code = fabric_preflight(run, spec_dir, args.run, args.address, args.stage)
        if code != 0:
            print(f"{args.run}: the preflight (failure.preflight) found what is printed above "
                  f"(report: {run_dir / 'preflight'}); fix it, re-plan around it "
                  "(ringpilot plan --exclude), or set failure.preflight: false", file=sys.stderr)
            return code
    # From here this driver owns the run: the workers of any earlier attempt are fenced off.
    ledger = Ledger(run_dir, run.name).begin_attempt()
    print(run.summary(), flush=True)
    print(f"driver attempt {ledger.epoch} of run {run.name} ({run_dir})", flush=True)

    # 2. Tokenizer (trained once, saved in the run dir) and the cluster plan, if described.
    build_tokenizer(run, run_dir, spec_dir, prepared.documents)
    if prepared.plan is not None:
        write_plan(run_dir, prepared.plan, keep_others=chosen is not None)

    connect_ray(args.address, prepared.workers * run.resources.cpus_per_worker + 2)
    try:
        check_ray_capacity(run, prepared.workers, prepared.workers_from, eval_gpus_beside(
            prepared.plan and prepared.plan.eval, [run.stages[i].name for i in indices]))
        if run.data.prepared is not None and run.data.mix.documents > 0:
            # prepared data: made now (a Ray Data job) if missing; refused if made from other
            # inputs, tokenizer or settings, or too small for a stage
            try:
                check_prepared(run, spec_dir, run_dir, address=args.address)
            except (PrepareError, TokenizerError) as e:
                raise PreflightError(str(e).splitlines()) from None
    except PreflightError as e:
        print(f"{args.run}: cannot start\n" + "\n".join(f"  {line}" for line in e.lines),
              file=sys.stderr)
        return 2

    predicted = prepared.plan
    if args.calibrate is not None:
        predicted = _calibrated_plan(only_stages(run, chosen), run_dir, args)
        if predicted is None:
            return 2

    # 3. Evaluation actors (their own resources), the progress lines, the metric sinks
    #    (observability:) and the ring-health watch, the last three fed from the run directory
    #    on driver threads.
    from ray_jobs.train.observe import Observer
    from ray_jobs.train.progress import ProgressPrinter, render_summary
    from ray_jobs.train.watch import HealthWatch, cluster_route
    evaluator = _start_eval(run, run_dir, ledger, spec_dir)
    printer = ProgressPrinter(run_dir).start()
    observer = Observer(run, run_dir, predicted, warn=_warn).start()
    watch = HealthWatch(run, run_dir, ledger, predicted, route=cluster_route(run, spec_dir),
                        warn=_warn).start()
    wall, code = {}, 0
    base_rope = run.base_rope(spec_dir)  # the base model's RoPE rule, each stage's reference
    try:
        # 4. One trainer per stage; a finished stage is never trained again.
        for index in indices:
            name = run.stages[index].name
            entry = ledger.read().stages.get(name)
            if entry is not None and entry.state == "done":
                print(f"[{name}] done in the ledger; skipping", flush=True)
                continue
            latest = ledger.latest_committed(name)
            stage = run.stages[index]
            masking = ("" if stage.attention == "causal" else  # the default goes unsaid
                       f", attention {describe_attention(stage.attention, stage.position_ids)}")
            print(f"[{name}] seq_len {stage.seq_len:,}, rope "
                  f"{run.stage_rope_words(index, base_rope)}{masking}; "
                  f"{'resuming from ' + latest.name if latest else 'starting'}", flush=True)
            try:
                change = latest and attention_change(index, stage, read_state(latest))
            except CheckpointError:
                change = None  # the trainer's resume says what is wrong with the checkpoint
            if change:
                _warn(change)
            if evaluator is not None:  # evaluations on this stage's GPUs finish first
                evaluator.make_room(name)
            ledger.start_stage(name)
            t0 = time.perf_counter()
            stage_plan = prepared.plan.stage(name) if prepared.plan is not None else None
            watch.begin_stage(name)
            try:
                train_stage(WorkerConfig(run=run, stage_index=index, run_dir=run_dir,
                                         spec_dir=spec_dir, plan=stage_plan,
                                         workers=prepared.layout.stage(name).dims.world,
                                         epoch=ledger.epoch, before_step=before_step,
                                         before_commit=before_commit))
            except Exception as e:  # Ray Train gave up after failure.max_failures restarts
                watch.end_stage()
                print(f"[{name}] failed: {e.__class__.__name__}: {e}", file=sys.stderr, flush=True)
                code = 1
                try:
                    ledger.finish_stage(name, "failed")
                except OSError as err:  # e.g. the storage that failed the stage is full
                    print(f"[{name}] the ledger {ledger.path} still says 'running': "
                          f"{err.strerror or err}", file=sys.stderr, flush=True)
                observer.finish_stage(name, "failed")
                break
            watch.end_stage()
            wall[name] = time.perf_counter() - t0
            ledger.finish_stage(name, "done")
            observer.finish_stage(name, "done")
    except Fenced as e:  # its workers stopped at their next write; so does the driver
        print(f"{args.run}: stopped: {e}", file=sys.stderr, flush=True)
        code = FENCED_EXIT
    finally:
        watch.stop()
        printer.stop()
        if evaluator is not None:
            evaluator.stop(wait=code == 0, timeout=300)
        observer.stop("done" if code == 0 else "failed")  # after the last scores are in
    # 5. Summary.
    render_summary(run, run_dir, wall, predicted=predicted, base_rope=base_rope)
    return code


def attention_change(index: int, stage: StageSpec, resumed: TrainerState) -> str | None:
    """A warning when a stage resumes from a checkpoint that attended over packed documents
    otherwise than the RunSpec now says (attention, position_ids): the stage goes on as the
    RunSpec says, so its steps before and after differ. None when they agree."""
    was = (resumed.attention, resumed.position_ids)
    if was == (stage.attention, stage.position_ids):
        return None
    return (f"[{stage.name}] warning: its checkpoint at step {resumed.step} trained with "
            f"attention {describe_attention(*was)}, and the stage goes on with "
            f"{describe_attention(stage.attention, stage.position_ids)} as the RunSpec now says; "
            f"to go on as before, set stages[{index}].attention: {resumed.attention} and "
            f"position_ids: {resumed.position_ids}")


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _calibrated_plan(run: RunSpec, run_dir: Path, args: argparse.Namespace) -> Plan | None:
    """The plan on --calibrate's cluster with its measured profile (None, said in one line,
    when the cluster file or the measurement does not fit)."""
    from ray_jobs.train.calibrate import calibrated_plan
    from topology.calibration import CalibrationError

    out = run_dir / "calibration" / f"{Path(args.calibrate).stem}.yaml"
    try:
        plan, fresh = calibrated_plan(run, args.calibrate, out, address=args.address)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return None
    except (CalibrationError, PlanError, ValueError, OSError) as e:
        print(f"--calibrate {args.calibrate}: {e}", file=sys.stderr)
        return None
    print(f"calibrated {args.calibrate}: {'measured now' if fresh else 'kept from earlier'} "
          f"({out}); predicted s/step: " + ", ".join(
              f"{s.name} {s.prediction.step_seconds:.3f}" for s in plan.stages), flush=True)
    return plan


def _start_eval(run: RunSpec, run_dir: Path, ledger: Ledger, spec_dir: Path):
    if not run.eval.enabled:
        return None
    try:
        from ray_jobs.eval.scheduler import EvalScheduler
    except ImportError as e:
        print(f"eval: enabled but ray_jobs.eval is not available ({e}); checkpoints are not "
              "evaluated", file=sys.stderr, flush=True)
        return None
    scheduler = EvalScheduler(run, run_dir, ledger=ledger, spec_dir=spec_dir)
    scheduler.start()
    return scheduler


def rope_problems(run: RunSpec, spec_dir: Path) -> list[str]:
    """Each stage's RoPE as the installed transformers checks it (the RunSpec checks the fields;
    transformers the rule they make with the model's shapes), one line per stage it refuses."""
    from ray_jobs.train.model import llama_config, set_rope

    try:
        base = run.base_rope(spec_dir)
    except CheckpointError as e:
        return [f"model.path: {e}"]
    problems = []
    for i, stage in enumerate(run.stages):
        rope = run.stage_rope(i, base)
        try:
            set_rope(llama_config(run.model, stage.seq_len, rope), rope, seq_len=stage.seq_len,
                     pretrain_seq_len=run.model.pretrain_seq_len)
        except ValueError as e:
            where = "rope" if stage.rope is not None else "rope (the base model's rule, kept)"
            problems.append(f"stages[{i}] ({stage.name}).{where}: {e}; fix the stage's rope "
                            "block")
    return problems
