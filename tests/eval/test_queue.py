"""The scheduler's queue, without Ray: what is evaluated next."""

from ray_jobs.eval.scheduler import EvalScheduler
from specs.checkpoint import checkpoint_dir
from specs.ledger import EvalEntry, Ledger, mark_committed
from tests.eval.test_scheduler import tiny_run


def test_newest_committed_checkpoint_is_evaluated_first(tmp_path):
    """The queue, without Ray: newest last (evaluated next); finished ones are not queued."""
    run = tiny_run(tmp_path)
    run_dir = tmp_path / run.name
    ledger = Ledger(run_dir, run.name)
    for stage, step in [("s384", 2), ("s192", 2), ("s192", 4)]:
        path = checkpoint_dir(run_dir, stage, step)
        path.mkdir(parents=True)
        mark_committed(path)
        ledger.commit_checkpoint(stage, step, path)
    scheduler = EvalScheduler(run, run_dir)
    assert scheduler.pending() == [
        ("s192", "checkpoints/s192/step-000002", 2), ("s192", "checkpoints/s192/step-000004", 4),
        ("s384", "checkpoints/s384/step-000002", 2)]
    assert [p for _, p, _ in scheduler.pending()] == [
        "checkpoints/s192/step-000002", "checkpoints/s192/step-000004",
        "checkpoints/s384/step-000002"]
    ledger.record_eval("s384", "checkpoints/s384/step-000002", EvalEntry(status="done"))
    ledger.record_eval("s192", "checkpoints/s192/step-000002", EvalEntry(status="running"))
    assert [p for _, p, _ in scheduler.pending()] == [  # "running" from a dead driver: redo it
        "checkpoints/s192/step-000002", "checkpoints/s192/step-000004"]
