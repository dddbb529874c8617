"""The version floors in pyproject.toml admit no release that lacks an API the code relies on.

Each row names an API, the first release that has it and where that was read, a check that the
installed package has it, and the source file that uses it (so a row cannot outlive its use).
"""

from __future__ import annotations

import importlib
import inspect
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _ray_label_selector() -> bool:
    from ray.train import ScalingConfig

    return "label_selector" in inspect.signature(ScalingConfig).parameters


def _public_fsdp2() -> bool:
    fsdp = importlib.import_module("torch.distributed.fsdp")
    return all(hasattr(fsdp, name) for name in ("fully_shard", "FSDPModule",
                                                "MixedPrecisionPolicy"))


def _rope_parameters() -> bool:
    from transformers import LlamaConfig

    return "rope_theta" in (LlamaConfig(rope_parameters={"rope_type": "default",
                                                         "rope_theta": 5e5}).rope_parameters)


@dataclass(frozen=True)
class Needs:
    package: str
    since: str  # the first release with the API
    api: str
    evidence: str
    check: object  # () -> bool on the installed package
    used_in: str  # a file that uses it
    usage: str  # text that appears there


NEEDS = [
    Needs("ray", "2.53", "ray.train.ScalingConfig(label_selector=...)",
          "read in the ray 2.52.0 and 2.53.0 wheels' ray/train/v2/api/config.py: absent, present",
          _ray_label_selector, "ray_jobs/train/driver.py", "label_selector=label_selector"),
    Needs("torch", "2.6", "torch.distributed.fsdp.fully_shard / FSDPModule / MixedPrecisionPolicy",
          "public in torch.distributed.fsdp from 2.6 (2.5 had them under "
          "torch.distributed._composable.fsdp); PyTorch docs page created 2024-12-04",
          _public_fsdp2, "ray_jobs/train/parallelize.py",
          "from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard"),
    Needs("transformers", "5.0", "PretrainedConfig.rope_parameters (rope_theta inside it)",
          "transformers 5 moved rope_theta into rope_parameters", _rope_parameters,
          "ray_jobs/train/model.py", "rope_parameters="),
]


def _floors() -> dict[str, Version]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for line in deps:
        req = Requirement(line)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        out[req.name] = max(lows) if lows else Version("0")
    return out


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: f"{n.package}-{n.since}")
def test_floor_admits_no_release_without_the_api(need):
    floor = _floors()[need.package]
    assert floor >= Version(need.since), (
        f"pyproject.toml allows {need.package}>={floor}, but {need.api} needs {need.since} "
        f"({need.evidence}); raise the floor")


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: f"{n.package}-{n.since}")
def test_installed_package_has_the_api_and_the_code_uses_it(need):
    assert need.check(), f"the installed {need.package} lacks {need.api}"
    assert need.usage in (ROOT / need.used_in).read_text(), (
        f"{need.used_in} no longer uses {need.api}: drop or update this row")
