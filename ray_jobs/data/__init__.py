"""The data wing: the run's tokenizer, training samples, and the prepare job with its corpus reader.

Modules: `tokenizer` (the one loader, or a BPE trained here), `samples` (what a worker trains on,
by address), the prepare job's `inputs` (files, fingerprint), `readers` (reading and tokenizing a
file: each Ray Data task), `packing` (the token stream), `prepare` (the job and the trainer's
check), and `prepared` (the on-disk layout and its reader). Floor 1 of ray_jobs/ (above
ring_attention/): imports nothing of eval/ or train/.
"""
