"""ringpilot topology: the cluster as a networkx graph, cost model, ring placement planner, planning report."""
