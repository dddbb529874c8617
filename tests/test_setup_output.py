"""`make setup` prints what a person needs; pip's and setuptools' output goes to a log file.

Runs the Makefile's real setup recipe into a fresh venv, with `PIP_FLAGS=--no-deps` and
`TORCH_SPEC=pip` so that it installs no dependency (they are the .venv's business): the
project's own build, where setuptools printed its deprecation and "Editable installation"
banners, is what is checked.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("deprecated", "!!", "****", "Editable installation", "WARNING", "Successfully",
         "Requirement already")


def make_setup(tmp_path: Path, torch_spec: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "setup", f"VENV={tmp_path / 'venv'}", "PIP_FLAGS=--no-deps",
         f"TORCH_SPEC={torch_spec}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_setup_prints_only_its_own_lines(tmp_path):
    done = make_setup(tmp_path, "pip")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    lines = out.splitlines()
    assert lines and all(line.startswith("setup: ") for line in lines), out
    assert any("pinned" in line for line in lines) and lines[-1].startswith("setup: done")
    assert not any(n in out for n in NOISE), out
    log = (tmp_path / "venv" / "setup.log").read_text()
    assert "Successfully installed ringpilot" in log  # what was hidden is kept


def test_a_failed_step_shows_its_log(tmp_path):
    done = make_setup(tmp_path, "./no-such-torch-wheel.whl")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "setup: failed:" in out and "no-such-torch-wheel" in out, out
    assert "setup.log" in out


def test_flash_attn_installs_after_torch_without_build_isolation():
    """flash-attn's setup.py imports torch: pip's build isolation (an `.[gpu]` extra) could
    never build it. `make flash-attn` installs it into the venv's pinned torch instead."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert not any("flash-attn" in dep for deps in extras.values() for dep in deps)
    done = subprocess.run(["make", "-n", "flash-attn", "VENV=.venv"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    recipe = done.stdout.replace("\\\n", " ")  # make -n keeps the line continuations
    pip = [line for line in recipe.splitlines() if "flash-attn>=2.7" in line]
    assert len(pip) == 1, done.stdout
    assert "--no-build-isolation" in pip[0] and "-c .venv/torch-constraint.txt" in pip[0]
