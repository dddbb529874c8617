"""The training wing: the driver, the worker loop and everything a training step needs.

Top floor of ray_jobs/: may import ring_attention/, data/ and eval/ (the driver starts the
evaluation scheduler); nothing imports it but ringpilot/. `python -m ray_jobs.train` runs the
driver (`__main__.py`).
"""
