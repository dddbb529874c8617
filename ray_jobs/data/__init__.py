"""The data wing: the run's tokenizer, training samples, and the prepare job with its corpus reader.

Floor 1 of ray_jobs/ (above ring_attention/): imports nothing of eval/ or train/.
"""
