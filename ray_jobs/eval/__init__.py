"""Checkpoint evaluation: NIAH grid and RULER-style tasks, run by Ray actors beside training.

Modules: `tasks` (prompt generators), `scoring`, `model` (checkpoint loading and greedy
decoding), `runner` (the grid and its outputs), `scheduler` (ledger watcher and Ray actors),
`report` (plots, tables, run report), `fixtures` (tiny checkpoints and tokenizers built locally).
"""
