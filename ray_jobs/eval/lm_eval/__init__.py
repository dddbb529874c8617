"""lm-evaluation-harness in ringpilot: the backend (adapter), RULER (ruler) and its command.

`python -m ray_jobs.eval.lm_eval --checkpoint DIR ...` prints one checkpoint's RULER table.
"""
