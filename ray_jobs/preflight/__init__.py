"""The preflight wing: know the fabric and the layout before a stage trains on them.

Top wing of ray_jobs/ (it builds the trainer's layouts: may import ring_attention/ and train/);
nothing imports it but ringpilot/. probe.py times ring hops, chosen pairs and collectives on
any process group; numerics.py checks the planned layout's attention against unsharded
attention; run.py is the job (`python -m ray_jobs.preflight`, `ringpilot preflight`).
"""
