"""The Dockerfile, checked statically (no docker here): it builds the image the manifests name,
on Ray's image at the operator's Ray version, with torch pinned, ringpilot installed as a
package, and a non-root user."""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest

from operators.rayjob import RAY_UID, RAY_VERSION
from operators.resource import DEFAULT_IMAGE
from tests.manifests.conftest import KUSTOMIZATIONS, MANIFESTS, kustomize, load, samples

REPO = MANIFESTS.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def of(name: str) -> list[str]:
    return [args for inst, args in instructions() if inst == name]


def labels() -> dict[str, str]:
    found = {}
    for args in of("LABEL"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            found[key] = value
    return found


def test_base_is_rays_image_at_the_operators_ray_version():
    [base] = of("FROM")  # one stage: what is checked is what runs
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py3(?P<py>\d+)-(gpu|cpu|cu\d+)", base)
    assert m, f"FROM {base}: expected rayproject/ray:<ray version>-py3XX-<gpu|cpu|cuXX>"
    assert m["ray"] == RAY_VERSION  # the rayVersion every generated RayCluster declares
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lowest, highest = re.fullmatch(r">=3\.(\d+),<3\.(\d+)", project["requires-python"]).groups()
    assert int(lowest) <= int(m["py"]) < int(highest), "a Python ringpilot does not run on"


def test_runs_as_the_non_root_ray_user():
    users = of("USER")
    assert users, "no USER: the image would run as the base image's user, unchecked"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) == RAY_UID != 0  # numeric, so runAsNonRoot can verify it


def test_torch_and_ray_are_pinned_and_ringpilot_is_installed_as_a_package():
    run = " && ".join(of("RUN"))
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", makefile, re.M)[1]
    assert f'pip install --no-cache-dir "{torch}"' in run
    assert f"ray=={RAY_VERSION}" in run
    installs = re.findall(r"pip install [^&]*", run)
    assert not any(" -e " in i or "--editable" in i for i in installs), installs
    assert any(i.rstrip().endswith("/tmp/ringpilot") for i in installs), installs
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {shlex.split(args)[-2] for args in of("COPY")}
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    ignore = (REPO / ".dockerignore").read_text().split()
    assert all(f"!{p}/" in ignore for p in packages) and "!pyproject.toml" in ignore


def test_the_image_built_is_the_one_the_manifests_name():
    built = labels()["org.opencontainers.image.ref.name"]
    assert built == DEFAULT_IMAGE
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels()["org.opencontainers.image.version"] == version == built.rsplit(":", 1)[1]
    [deployment] = [d for d in kustomize("") if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == built
    for path in samples():
        text = path.read_text()
        for image in re.findall(r"image: (\S+)", text):
            assert image == built, f"{path.name} names {image}"
    assert any(load(p)["kind"] == "StagedTraining" for p in samples())


@pytest.mark.parametrize("subdir", KUSTOMIZATIONS)
def test_overlays_use_the_image_or_a_local_build_of_it(subdir):
    [deployment] = [d for d in kustomize(subdir) if d["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image in (DEFAULT_IMAGE, "ringpilot:dev")  # dev: `docker build -t ringpilot:dev .`
