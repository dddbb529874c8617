"""The house: packages import only downwards, nothing imports in a circle, every module imports
alone, and the tree passes the linter.

Floors, lowest first: specs/ (the seams), topology/, then ray_jobs/ and operators/ side by side,
then ringpilot/ (the command line and the demo launcher). A module may import its own package
and the floors below it; no product module imports tests/ or benchmarks/. Function-level imports
count too: a lazy import is still a dependency, and a lazy circle still is one.

Inside ray_jobs/ the same rule holds between its wings, lowest first: ring_attention/, data/,
eval/, train/, preflight/. Every module of ray_jobs/ sits in a wing, except ray_setup.py (which
the wings share, and which imports none of them) and the packages' `__init__`/`__main__` files
(the `python -m ray_jobs.prepare` and `python -m ray_jobs.evaluate` entry points).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"specs": 0, "topology": 1, "ray_jobs": 2, "operators": 2, "ringpilot": 3}
NOT_PRODUCT = ("tests", "benchmarks")
WINGS = {"ring_attention": 0, "data": 1, "eval": 2, "train": 3, "preflight": 4}
SHARED_BY_WINGS = {"ray_jobs.ray_setup"}


def module_files(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given top-level packages."""
    mods = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


def import_graph(root: Path, packages) -> nx.DiGraph:
    """Module -> the project modules (and foreign top-level names in NOT_PRODUCT) it imports,
    at any depth of the file, resolved to the longest known module name."""
    mods = module_files(root, packages)
    graph = nx.DiGraph()
    for name, path in mods.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top in NOT_PRODUCT:
                    graph.add_edge(name, top)
                    continue
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def wing_of(module: str) -> str | None:
    """The wing of a ray_jobs module (its second name), or None for shared and entry modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


def problems_of(graph: nx.DiGraph, mods: dict[str, Path] | None = None) -> list[str]:
    """Circles, imports that point up a floor, across a floor, up or across a ray_jobs wing, or
    into test code; and ray_jobs modules that sit outside every wing."""
    found = [" -> ".join([*c, c[0]]) + ": an import circle"
             for c in nx.simple_cycles(graph) if len(c) > 1]
    for a, b in graph.edges:
        pa, pb = a.split(".")[0], b.split(".")[0]
        if pb in NOT_PRODUCT:
            found.append(f"{a} imports {b}: product code must not import {pb}/")
        elif pa != pb and FLOORS[pb] >= FLOORS[pa]:
            found.append(f"{a} imports {b}: {pb}/ is on floor {FLOORS[pb]}, not below "
                         f"{pa}/ (floor {FLOORS[pa]}); move the shared piece down to specs/")
        elif pa == pb == "ray_jobs":
            found += _wing_problems(a, b)
    for name, path in (mods or {}).items():
        if (name.startswith("ray_jobs.") and wing_of(name) is None
                and name not in SHARED_BY_WINGS
                and path.name not in ("__init__.py", "__main__.py")):
            found.append(f"{name} sits outside the wings of ray_jobs/ ({', '.join(WINGS)}): "
                         "move it into the wing whose job it does")
    return sorted(found)


def _wing_problems(a: str, b: str) -> list[str]:
    wa, wb = wing_of(a), wing_of(b)
    if a in SHARED_BY_WINGS and wb is not None:
        return [f"{a} imports {b}: {a} is shared by the wings and must import none of them"]
    if wa is None or wb is None or wa == wb or WINGS[wb] < WINGS[wa]:
        return []
    return [f"{a} imports {b}: ray_jobs/{wb}/ (wing {WINGS[wb]}) is not below ray_jobs/{wa}/ "
            f"(wing {WINGS[wa]}); wings import only lower ones ({' < '.join(WINGS)})"]


def test_no_import_circle_and_no_upward_import():
    problems = problems_of(import_graph(ROOT, FLOORS), module_files(ROOT, FLOORS))
    assert problems == [], "\n".join(problems)


def test_the_checker_sees_circles_upward_and_test_imports(tmp_path):
    """The check above must be able to fail: a tree with each defect is caught."""
    files = {
        "specs/__init__.py": "",
        "specs/a.py": "from topology.b import x  # upward\n",
        "topology/__init__.py": "",
        "topology/b.py": "def f():\n    from topology.c import y  # lazy, still a circle\n",
        "topology/c.py": "from topology import b\nimport tests.helpers\n",
        "ray_jobs/__init__.py": "",
        "ray_jobs/d.py": "from operators.e import z  # sideways, same floor\n",
        "operators/__init__.py": "",
        "operators/e.py": "from . import f\n",
        "operators/f.py": "from .e import z  # relative circle\n",
        "ringpilot/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = problems_of(import_graph(tmp_path, FLOORS))
    assert any("specs.a imports topology.b" in p for p in problems)
    assert any("ray_jobs.d imports operators.e" in p for p in problems)
    assert any("topology.c imports tests" in p for p in problems)
    assert any(p.endswith("an import circle") and "topology.b" in p and "topology.c" in p
               for p in problems)
    assert any(p.endswith("an import circle") and "operators.e" in p and "operators.f" in p
               for p in problems)


def test_the_checker_sees_wings_out_of_order_and_modules_outside_them(tmp_path):
    """Wings: an upward import (eval/ -> train/), a sideways one into the shared module's
    dependencies, and a module beside the wings are caught; downward imports and entry points
    pass."""
    files = {
        "ray_jobs/__init__.py": "",
        "ray_jobs/ray_setup.py": "from ray_jobs.train.driver import main  # shared -> wing\n",
        "ray_jobs/loose.py": "",
        "ray_jobs/ring_attention/__init__.py": "",
        "ray_jobs/ring_attention/ring.py": "",
        "ray_jobs/data/__init__.py": "",
        "ray_jobs/data/samples.py": "from ray_jobs.ring_attention import ring  # down: fine\n",
        "ray_jobs/eval/__init__.py": "",
        "ray_jobs/eval/model.py": "from ray_jobs.train.checkpoint import read  # upward\n",
        "ray_jobs/train/__init__.py": "",
        "ray_jobs/train/__main__.py": "from ray_jobs.train.driver import main\n",
        "ray_jobs/train/driver.py": "from ray_jobs.eval import model  # down: fine\n",
        "ray_jobs/train/checkpoint.py": "",
        "ray_jobs/evaluate/__init__.py": "",
        "ray_jobs/evaluate/__main__.py": "from ray_jobs.eval import model\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = problems_of(import_graph(tmp_path, FLOORS), module_files(tmp_path, FLOORS))
    assert any(p.startswith("ray_jobs.eval.model imports ray_jobs.train.checkpoint")
               for p in problems), problems
    assert any(p.startswith("ray_jobs.ray_setup imports ray_jobs.train") for p in problems)
    assert any(p.startswith("ray_jobs.loose sits outside the wings") for p in problems)
    assert not any("ray_jobs.data.samples" in p or "ray_jobs.train.driver imports" in p
                   or "ray_jobs.evaluate" in p or "__main__" in p for p in problems), problems
    assert len(problems) == 3, problems


def test_specs_import_nothing_of_the_project_but_specs():
    graph = import_graph(ROOT, FLOORS)
    outside = sorted({(a, b) for a, b in graph.edges
                      if a.startswith("specs") and not b.startswith("specs")})
    assert outside == []


# One fresh interpreter imports the third-party libraries once, then forks a child per module:
# each child starts with no project module loaded, so an import that only works after another
# project module was imported (an order-dependent circle) fails there.
_IMPORT_ALONE = textwrap.dedent("""
    import importlib, os, sys, traceback
    for heavy in ("torch", "transformers", "ray", "networkx", "numpy", "pydantic", "yaml",
                  "matplotlib", "kubernetes", "kopf", "rich", "tokenizers"):
        importlib.import_module(heavy)
    assert not [m for m in sys.modules if m.split(".")[0] in {FLOORS!r}], "loaded too early"
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(name)
    print("FAILED:", " ".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_every_module_imports_alone():
    # An entry point's __main__ runs its command when imported; its imports are its target's.
    names = sorted(n for n in module_files(ROOT, FLOORS) if not n.endswith(".__main__"))
    code = _IMPORT_ALONE.replace("{FLOORS!r}", repr(set(FLOORS)))
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert len(names) > 60  # the walk found the tree


def test_ruff_passes():
    """Line length, import order, unused names: the configuration is pyproject's [tool.ruff]."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]



LEFTOVERS = (".orig", ".rej", ".bak", ".swp", "~")


def test_no_merge_or_editor_leftovers_are_tracked():
    """A `.orig` copy of the planner's decisions module rode along in the repository for many
    landings after a merge; nothing reads such files, and they read like live code."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing is tracked")
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    left = [name for name in done.stdout.splitlines() if name.endswith(LEFTOVERS)]
    assert not left, f"remove these from the repository: {left}"
