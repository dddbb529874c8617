"""Shared fixtures: the published 8B recipe, a small model run, and preset clusters."""

import pytest
import yaml
from topology_helpers import ROOT

from specs.run import RunSpec


@pytest.fixture(scope="session")
def llama8b_run() -> RunSpec:
    return RunSpec.model_validate(yaml.safe_load((ROOT / "configs/llama3-8b-1m.yaml").read_text()))


@pytest.fixture(scope="session")
def netns():
    """The Router of configs/clusters/netns-4x2.yaml (4 namespaces x 2 ranks on one bridge)."""
    from topology.graph import Router, build_graph
    from topology.sources import load_cluster

    spec = load_cluster(ROOT / "configs/clusters/netns-4x2.yaml")
    return Router(spec, build_graph(spec))
