"""ringpilot Ray application: ring attention, sequence sharding, RoPE schedule, data, staged trainer, ledger, evaluation."""
