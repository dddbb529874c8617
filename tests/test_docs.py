"""The docs stay true to the repository: front page size, links, commands, benchmark keys."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), RESULTS]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"python -m ([A-Za-z_][\w.]*)")
# In RESULTS.md a benchmark key is a backticked snake_case name; commands and paths carry
# spaces, dots or slashes and so never match.
KEY = re.compile(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"
    for command in ("make demo", "make test"):
        assert command in text, f"README.md must show `{command}`"


def test_the_docs_exist_and_link_results():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"training.md", "data.md", "ring-attention.md", "evaluation.md", "planning.md",
            "kubernetes.md", "reliability.md"} <= names
    assert "benchmarks/RESULTS.md" in _links(README)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_every_python_dash_m_names_a_runnable_module():
    mentioned = {m.rstrip(".") for p in PAGES for m in MODULE.findall(p.read_text("utf-8"))}
    assert {"ray_jobs.train", "ray_jobs.prepare", "ray_jobs.evaluate"} <= mentioned
    missing = []
    for name in sorted(mentioned):
        spec = importlib.util.find_spec(name)
        if spec is None:
            missing.append(name)
        elif spec.submodule_search_locations is not None and (
            importlib.util.find_spec(f"{name}.__main__") is None
        ):
            missing.append(f"{name} (a package without __main__)")
    assert not missing, f"`python -m` of modules that do not exist: {missing}"


def test_every_benchmark_key_in_results_is_printed_by_a_benchmark():
    keys = set(KEY.findall(RESULTS.read_text(encoding="utf-8")))
    assert len(keys) >= 20, "RESULTS.md should quote the benchmarks' keys in backticks"
    sources = "\n".join(p.read_text("utf-8") for p in (ROOT / "benchmarks").glob("*.py"))
    unknown = sorted(k for k in keys if k not in sources)
    assert not unknown, f"RESULTS.md quotes keys no benchmarks/*.py prints: {unknown}"
