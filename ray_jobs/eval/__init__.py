"""Checkpoint evaluation: NIAH grid and RULER-style tasks, run by Ray actors beside training.

Modules: `tasks` (prompt generators; their names are specs.eval_tasks), `scoring`, `model`
(checkpoint loading and greedy decoding), `runner` (the grid and its outputs), `scheduler` (the
driver's thread: ledger watcher, queue, actors, retries), `pipeline` (inside an actor: one
checkpoint's evaluation), `gang` (sequence-parallel evaluation of long contexts), `lm_eval`
(ringpilot as an lm-eval backend, RULER), `report` (plots, tables, run report), `cli` (the
`python -m ray_jobs.evaluate` command).
"""
