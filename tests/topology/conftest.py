"""Shared fixtures: the published 8B recipe, a small model run, and preset clusters."""

import pytest
import yaml
from topology_helpers import ROOT

from specs.run import RunSpec


@pytest.fixture(scope="session")
def llama8b_run() -> RunSpec:
    return RunSpec.model_validate(yaml.safe_load((ROOT / "configs/llama3-8b-1m.yaml").read_text()))
