"""`python -m ray_jobs.evaluate --checkpoint DIR`: the entry point of ray_jobs.eval.cli."""
