"""The preflight's report: findings one line each, preflight.json, a table and the fabric plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from specs.atomic import atomic_write  # noqa: E402
from topology.graph import Router  # noqa: E402
from topology.tomography import Explanation, HopTiming, Suspect, suspect_name  # noqa: E402

FindingKind = Literal["slow link", "slow device", "ambiguous", "inconsistent", "fabric", "none"]
TABLE_WIDTH = 100
HOPS_NAMED = 2  # hops a finding names before "+N more"
LEVEL_Y = {"core": 6.0, "spine": 5.0, "leaf": 4.0, "nic": 2.6, "socket": 1.8,
           "pcie_switch": 1.0, "gpu": 0.0}  # the fabric plot's rows, top down


@dataclass(frozen=True)
class Finding:
    """One line a person reads; `suspects` spelled as `ringpilot plan --exclude` takes them."""

    kind: FindingKind
    text: str
    suspects: tuple[str, ...] = ()


def findings(explanation: Explanation) -> list[Finding]:
    """What the explanation says, worst news first: the fabric-wide ratio, then the suspects
    of a unique explanation (or the ambiguity), then slow hops nothing explains; "no finding"
    when all is well."""
    e = explanation
    out = []
    if e.fabric_off:
        way = "slower" if e.median_ratio > 1 else "faster"
        out.append(Finding("fabric", f"the whole fabric runs at {e.median_ratio:.2f}x its "
                           f"profile ({way}: the median ratio of {len(e.rounds[0])} hops); "
                           "measure its links (ringpilot calibrate) and plan with --profile"))
    if e.unique:
        (explanation_set,) = e.candidates
        for s in sorted(explanation_set, key=suspect_name):
            out.append(_suspect_finding(e, s))
    elif e.candidates:
        hops = _hop_text([h for h, c in zip(e.hops, e.hop_suspects) if c])
        options = " | ".join(" + ".join(suspect_name(s) for s in sorted(c, key=suspect_name))
                             for c in e.candidates)
        then = ("a probe round tells them apart" if len(e.rounds) == 1 else
                "no probe among the stage's GPUs told them apart: exclude them all")
        out.append(Finding("ambiguous", f"ambiguous: {len(e.candidates)} explanations fit the "
                           f"slow hops ({hops}): {options}; {then}",
                           tuple(suspect_name(s) for s in e.suspects())))
    if e.unexplained:
        out.append(Finding("inconsistent", f"inconsistent: {_hop_text(list(e.unexplained))}, "
                           "yet fast hops clear every link and device on the way (noise, a "
                           "transient, or a slowdown the model cannot express)"))
    if not out:
        out.append(Finding("none", f"no finding: all {len(e.hops)} hops within "
                           f"{e.slow_factor:g}x of the median ratio ({e.median_ratio:.2f}x their "
                           "prediction)"))
    return out


def exit_code(explanation: Explanation) -> int:
    """0 when nothing is found, 1 otherwise (a slow hop, or a fabric far from its profile)."""
    return 1 if explanation.found else 0


def write_preflight(out_dir: str | Path, rounds: Sequence[Sequence[HopTiming]],
                    explanation: Explanation, numerics: Mapping[str, Any] | None = None) -> Path:
    """Write OUT_DIR/preflight.json: per round (the ring hops, then probes) each hop's src, dst,
    nbytes, predicted and measured seconds, ratio, whether it was slow and the suspects it
    crosses; the candidate explanations, the findings and the exit status; `numerics` (per-rank
    errors of the numerics check, JSON data) as given. Every hop of `rounds` must be one the
    explanation saw."""
    seen = dict(zip(explanation.hops, zip(explanation.slow, explanation.hop_suspects)))
    doc_rounds = []
    for k, hops in enumerate(rounds):
        rows = []
        for h in hops:
            if h not in seen:
                raise ValueError(f"rounds[{k}]: hop {h.src} -> {h.dst} is not in the "
                                 "explanation; pass the rounds given to explain and refine")
            slow, suspects = seen[h]
            rows.append({"src": h.src, "dst": h.dst, "nbytes": h.nbytes,
                         "predicted_s": h.predicted_s, "measured_s": h.measured_s,
                         "ratio": h.ratio, "slow": slow,
                         "suspects": [suspect_name(s) for s in suspects]})
        doc_rounds.append({"name": _round_name(k), "hops": rows})
    e = explanation
    doc = {
        "slow_factor": e.slow_factor, "fabric_factor": e.fabric_factor,
        "median_ratio": e.median_ratio, "fabric_off": e.fabric_off, "unique": e.unique,
        "candidates": [sorted(suspect_name(s) for s in c) for c in e.candidates],
        "aliases": {suspect_name(s): [suspect_name(x) for x in links]
                    for s, links in sorted(e.aliases.items(), key=lambda kv: suspect_name(kv[0]))},
        "unexplained": [f"{h.src}->{h.dst}" for h in e.unexplained],
        "notes": list(e.notes),
        "findings": [{"kind": f.kind, "text": f.text, "suspects": list(f.suspects)}
                     for f in findings(e)],
        "exit_code": exit_code(e), "rounds": doc_rounds,
        "numerics": dict(numerics) if numerics is not None else None,
    }
    try:
        text = json.dumps(doc, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"numerics: {err}; give plain JSON data (numbers, strings, lists, "
                         "dicts; finite floats)") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write(out / "preflight.json", text + "\n")


def render_table(explanation: Explanation) -> str:
    """Every hop as one row of at most TABLE_WIDTH columns: round, from, to, MiB, predicted and
    measured milliseconds, ratio, slow, and the suspects a slow hop crosses."""
    widths = {"round": 6, "from": 16, "to": 16, "MiB": 6, "pred ms": 8, "meas ms": 8,
              "ratio": 6, "slow": 4}
    widths["suspects"] = TABLE_WIDTH - sum(widths.values()) - len(widths)
    right = {"MiB", "pred ms", "meas ms", "ratio"}

    def line(cells: list[str]) -> str:
        out = [_fit(c, w).rjust(w) if name in right else _fit(c, w).ljust(w)
               for c, (name, w) in zip(cells, widths.items())]
        return " ".join(out).rstrip()

    rows = [line(list(widths)), line(["-" * w for w in widths.values()])]
    flags = iter(zip(explanation.slow, explanation.hop_suspects))
    for k, hops in enumerate(explanation.rounds):
        for h in hops:
            slow, suspects = next(flags)
            names = [suspect_name(s) for s in suspects]
            rows.append(line([_round_name(k), h.src, h.dst, f"{h.nbytes / 2**20:.2f}",
                              f"{h.predicted_s * 1e3:.3f}", f"{h.measured_s * 1e3:.3f}",
                              f"{h.ratio:.2f}", "SLOW" if slow else "",
                              _suspect_cell(names, widths["suspects"])]))
    return "\n".join(rows)


def plot_fabric(router: Router, explanation: Explanation, path: str | Path) -> Path:
    """Write `fabric_figure` as a PNG at `path`."""
    fig = fabric_figure(router, explanation)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fabric_figure(router: Router, explanation: Explanation) -> plt.Figure:
    """The cluster graph laid out node by node (GPUs at the bottom, fabric switches on top):
    suspects in every candidate explanation in red, those in only some dashed orange; a link
    is drawn as an arrow in its direction (with the links merged into it)."""
    g = router.graph
    pos = _layout(router)
    certain = _members(explanation, set.intersection(*(set(c) for c in explanation.candidates))
                       if explanation.candidates else set())
    possible = _members(explanation, {s for c in explanation.candidates for s in c}) - certain
    width = min(40.0, max(6.0, 0.35 * sum(1 for _, k in g.nodes(data="kind") if k == "gpu")))
    fig, ax = plt.subplots(figsize=(width, 5.5))
    for u, v in g.edges:
        ax.plot(*zip(pos[u], pos[v]), color="#c8c8c8", lw=1.0, zorder=1)
    colours = {"gpu": "#4c72b0", "nic": "#55a868", "pcie_switch": "#8172b2", "socket": "#937860"}
    for v, kind in g.nodes(data="kind"):
        face = ("#d62728" if v in certain else "#ff7f0e" if v in possible
                else colours.get(kind, "#333333"))
        ax.scatter(*pos[v], s=60 if kind == "gpu" else 40, color=face, zorder=3,
                   edgecolors="black" if v in certain | possible else "none")
        if kind in ("leaf", "spine", "core"):
            ax.annotate(v, pos[v], textcoords="offset points", xytext=(0, 7), ha="center",
                        fontsize=8)
    for node, x in _node_centres(router, pos).items():
        ax.annotate(node, (x, LEVEL_Y["gpu"]), textcoords="offset points", xytext=(0, -16),
                    ha="center", fontsize=8)
    for suspects, colour, style in ((certain, "#d62728", "-"), (possible, "#ff7f0e", "--")):
        for s in suspects:
            if not isinstance(s, str):
                u, v = s
                ax.add_patch(FancyArrowPatch(pos[u], pos[v], arrowstyle="-|>", mutation_scale=12,
                                             color=colour, lw=2.2, linestyle=style, zorder=2,
                                             connectionstyle="arc3,rad=0.18"))
    kinds = [Line2D([], [], ls="", marker="o", color=c, label=k.replace("_", " "))
             for k, c in colours.items()]
    ax.legend(handles=[Line2D([], [], color="#d62728", lw=2.2, label="slow: in every explanation"),
                       Line2D([], [], color="#ff7f0e", lw=2.2, ls="--",
                              label="candidate: in some explanations"), *kinds],
              loc="upper right", fontsize=8, frameon=False)
    ax.set_title(_plot_title(explanation), fontsize=10)
    ax.set_axis_off()
    ax.margins(0.05, 0.12)
    fig.tight_layout()
    return fig


# ---- helpers ----------------------------------------------------------------------------------

def _suspect_finding(e: Explanation, s: Suspect) -> Finding:
    hops = [h for h, c in zip(e.hops, e.hop_suspects) if s in c]
    name = suspect_name(s)
    if isinstance(s, str):
        what = f"slow device {s}"
        kind: FindingKind = "slow device"
    else:
        what = f"slow link {s[0]} -> {s[1]}"
        kind = "slow link"
        others = [suspect_name(x) for x in e.aliases.get(s, ()) if x != s]
        if others:
            what += f" (or {', '.join(others)}: no GPU pair tells them apart)"
    return Finding(kind, f"{what}: {_hop_text(hops)} (unique explanation; re-plan around it: "
                   f"--exclude {name})", (name,))


def _members(e: Explanation, suspects: set[Suspect]) -> set[Suspect]:
    """The suspects with the links and vertices merged into each."""
    return {m for s in suspects for m in e.aliases.get(s, (s,))}


def _hop_text(hops: list[HopTiming]) -> str:
    """'hops a -> b, c -> d (+3 more) ran 12.0-40.2x their prediction'."""
    named = ", ".join(f"{h.src} -> {h.dst}" for h in hops[:HOPS_NAMED])
    more = f" (+{len(hops) - HOPS_NAMED} more)" if len(hops) > HOPS_NAMED else ""
    lo, hi = min(h.ratio for h in hops), max(h.ratio for h in hops)
    ratio = f"{hi:.1f}x" if hi - lo < 0.05 else f"{lo:.1f}-{hi:.1f}x"
    if len(hops) == 1:
        return f"hop {named} ran {ratio} its prediction"
    return f"hops {named}{more} ran {ratio} their prediction"


def _round_name(k: int) -> str:
    return "ring" if k == 0 else f"probe{k}"


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` from the left (the GPU's end of a name says the most)."""
    return text if len(text) <= width else ".." + text[len(text) - width + 2:]


def _suspect_cell(names: list[str], width: int) -> str:
    text = ", ".join(names)
    if len(text) <= width or len(names) < 2:
        return text
    more = f" +{len(names) - 1}"
    return _fit(names[0], width - len(more)) + more


def _layout(router: Router) -> dict[str, tuple[float, float]]:
    """Nodes side by side, each a column block as wide as its most numerous kind of vertex;
    inside a node, each kind on its row spread over the block; fabric switches above the
    middle of what hangs below them."""
    g = router.graph
    pos: dict[str, tuple[float, float]] = {}
    x0 = 0.0
    for vertices in _by_node(router).values():
        by_kind: dict[str, list[str]] = {}
        for v in vertices:
            by_kind.setdefault(g.nodes[v]["kind"], []).append(v)
        span = max(len(vs) for vs in by_kind.values())
        for kind, vs in by_kind.items():
            # sockets off the centre line, so that a NIC's link down to its PCIe switch does
            # not seem to pass through the socket
            centre = 0.3 if kind == "socket" else 0.5
            for i, v in enumerate(sorted(vs, key=_natural)):
                pos[v] = (x0 + (i + centre) * span / len(vs), LEVEL_Y[kind])
        x0 += span + 1.0
    for level in ("leaf", "spine", "core"):
        switches = sorted((v for v, k in g.nodes(data="kind") if k == level), key=_natural)
        for i, v in enumerate(switches):
            below = [pos[w] for w in g.neighbors(v) if w in pos and pos[w][1] < LEVEL_Y[level]]
            x = sum(p[0] for p in below) / len(below) if below else i * 2.0
            pos[v] = (x, LEVEL_Y[level])
    return pos


def _by_node(router: Router) -> dict[str, list[str]]:
    """Each node's vertices (GPUs, PCIe switches, sockets, NICs), nodes in the spec's order."""
    out: dict[str, list[str]] = {n.name: [] for n in router.spec.nodes}
    for v, node in router.graph.nodes(data="node"):
        if node is not None:
            out[node].append(v)
    return out


def _node_centres(router: Router, pos: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    return {node: (min(pos[v][0] for v in vs) + max(pos[v][0] for v in vs)) / 2
            for node, vs in _by_node(router).items()}


def _natural(name: str) -> tuple:
    """Sort key that puts gpu2 before gpu10."""
    head = name.rstrip("0123456789")
    tail = name[len(head):]
    return (head, int(tail) if tail else -1)


def _plot_title(e: Explanation) -> str:
    slow = len(e.slow_hops)
    if not e.candidates:
        return f"no slow hop of {len(e.hops)}" if not slow else f"{slow} slow hops, unexplained"
    what = ("unique explanation: " + ", ".join(suspect_name(s) for s in
                                               sorted(e.candidates[0], key=suspect_name))
            if e.unique else f"{len(e.candidates)} candidate explanations")
    return f"{slow} slow hop{'s' if slow != 1 else ''} of {len(e.hops)}; {what}"
