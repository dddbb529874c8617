"""ringpilot topology: cluster graph, cost model, ring placement planner, planning report."""
