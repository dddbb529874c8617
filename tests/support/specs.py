"""Editing a run spec (the dict a RunSpec validates) by dotted path, as tests and benchmarks
vary one field of a known-good spec."""

from __future__ import annotations


def set_dotted(spec: dict, dotted: str, value: object) -> None:
    """spec["stages"][0]["steps"] = value for dotted "stages.0.steps": a part indexes a list
    where the node is one, else names a key (made if missing)."""
    node = spec
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
