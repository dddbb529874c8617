"""ringpilot's Ray application: what runs in the Ray job.

Ring attention, sequence sharding, RoPE schedule, data, the staged trainer and its checkpoints,
and the evaluation actors. The command line and the demo launcher live in ringpilot/.
"""
