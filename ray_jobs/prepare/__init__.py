"""`python -m ray_jobs.prepare --run RUN.yaml`: the entry point of ray_jobs.data.prepare."""
