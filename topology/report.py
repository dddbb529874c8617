"""Planning report: plan.json, report.md and report.html with PNG plots, headline numbers first."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

from specs.atomic import atomic_write
from specs.cluster import ClusterSpec  # noqa: E402
from specs.plan import Plan, StagePlan  # noqa: E402
from specs.run import describe_rope  # noqa: E402

PARTS = ["dense compute", "attention compute", "exposed ring K/V", "exposed weight sharding",
         "data-parallel sync"]


def _alt(stage: StagePlan, name: str):
    return next(a for a in stage.alternatives if a.name == name)


def _fmt_min(m: float) -> str:
    return f"{m:,.0f} min" if m < 600 else f"{m / 60:,.1f} h"


def _headline(plan: Plan, spec: ClusterSpec, compare: list[float] | None) -> tuple[list[str], list]:
    total = sum(s.prediction.wall_minutes for s in plan.stages)
    ray = sum(_alt(s, "ray-default").wall_minutes for s in plan.stages)
    peak = max(sum(s.prediction.memory_gb.values()) for s in plan.stages)
    gpus = max(s.dims.world for s in plan.stages)
    rooms = [s.prediction.ring_headroom for s in plan.stages if s.prediction.ring_headroom]
    room = min(rooms) if rooms else None
    if room is None:
        net = "No stage uses a ring of more than one GPU."
    elif room >= 1:
        net = (f"**The network is not the bottleneck**: in every stage the K/V exchange hides "
               f"behind attention compute; the slowest ring hop could be {room:.1f}x slower "
               "before it shows (a faster fabric would not shorten this run; faster GPUs or "
               "higher MFU would).")
    else:
        worst = min(plan.stages, key=lambda s: s.prediction.ring_headroom or 9e9)
        net = (f"**The network limits stage {worst.name}**: its slowest ring hop takes "
               f"{1 / room:.1f}x the attention block it should hide behind (see the slowest "
               "link column; placement, faster links or a larger ring_degree help).")
    lines = [
        f"**Predicted wall time, all {len(plan.stages)} stages: {_fmt_min(total)}** on "
        f"{gpus} of {spec.num_gpus} GPUs ({plan.profile} profile); Ray's default order: "
        f"{_fmt_min(ray)} ({ray / total:.2f}x).",
        f"Peak memory per GPU: {peak:.1f} GB of {_device(plan).hbm_bytes / 1e9:.0f} GB. "
        "Unknown-topology nodes left out: "
        f"{', '.join(plan.unknown_topology) or 'none'}.",
        net,
    ]
    head = ["stage", "seq_len", "rope", "ring x dp", "step s", "tokens/s", "MFU",
            "wall", "ring hop ms (planned / Ray / bound)", "hop headroom", "slowest link",
            "mem GB"]
    if compare:
        head.append("published (MFU it implies)")
    rows = [head]
    for i, s in enumerate(plan.stages):
        p = s.prediction
        worst = s.bottleneck_links[0] if s.bottleneck_links else None
        row = [s.name, f"{s.seq_len:,}",
               describe_rope(s.rope or {"rope_type": "default", "rope_theta": s.rope_theta}),
               _layout(s),
               f"{p.step_seconds:,.1f}", f"{p.tokens_per_second:,.0f}", f"{p.mfu:.0%}",
               _fmt_min(p.wall_minutes),
               f"{p.ring_hop_seconds * 1e3:.2f} / "
               f"{_alt(s, 'ray-default').ring_hop_seconds * 1e3:.2f}"
               f" / {_alt(s, 'lower-bound').ring_hop_seconds * 1e3:.2f}",
               f"{p.ring_headroom:.1f}x" if p.ring_headroom else "-",
               f"{worst.link} ({worst.flows} flow{'s' if worst.flows != 1 else ''}, "
               f"{worst.share_gb_s:.1f} GB/s each)" if worst
               else "none (ring of 1)", f"{sum(p.memory_gb.values()):.1f}"]
        if compare:
            row.append(_published(s, compare[i], plan.profile) if i < len(compare) else "")
        rows.append(row)
    if compare:
        lines.append("Published wall times are compared as given; the MFU each implies is the "
                     "model FLOPs (6N + causal attention) of all steps over the published "
                     "minutes at the GPUs' peak: above ~60% the published run likely did less "
                     "attention work (e.g. shorter documents) than full causal sequences.")
    return lines, rows


def _device(plan: Plan):
    """The hardware profile the plan was made with (its device's memory and peak)."""
    from topology.profile import get_profile

    return get_profile(plan.profile or "l40s")


def _published(s: StagePlan, minutes: float, profile: str | None) -> str:
    from topology.profile import get_profile

    steps = s.prediction.wall_minutes * 60 / s.prediction.step_seconds
    peak = get_profile(profile or "l40s").peak_bf16_flops * s.dims.world
    mfu = s.prediction.model_flops_per_step * steps / (minutes * 60 * peak)
    return f"{_fmt_min(minutes)} ({mfu:.0%})"


def _md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def render_plots(plan: Plan, out: Path, spec: ClusterSpec | None = None) -> list[str]:
    """PNG plots; returns their file names."""
    names = [s.name for s in plan.stages]
    files = []
    # step-time breakdown
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(names)
    for part in PARTS:
        vals = [s.prediction.parts_seconds.get(part, 0.0) for s in plan.stages]
        ax.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per optimizer step"), ax.set_title("Step time by part")
    ax.legend(fontsize=7)
    files.append(_save(fig, out / "step_breakdown.png"))
    # memory per GPU
    fig, ax = plt.subplots(figsize=(7, 3.5))
    # the peak's parts differ by phase (loss or layer) and by checkpointing policy
    parts = list(dict.fromkeys(k for s in plan.stages for k in s.prediction.memory_gb))
    bottom = [0.0] * len(names)
    for part in parts:
        vals = [s.prediction.memory_gb.get(part, 0.0) for s in plan.stages]
        ax.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    device = _device(plan)
    ax.axhline(device.hbm_bytes / 1e9, color="red", linestyle="--",
               label=f"{device.gpu_model} {device.hbm_bytes / 1e9:.0f} GB")
    ax.set_ylabel("GB per GPU"), ax.set_title("Memory per GPU"), ax.legend(fontsize=6)
    files.append(_save(fig, out / "memory.png"))
    # planned vs Ray default vs bound
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    x = range(len(names))
    for k, (label, get) in enumerate([
            ("planned", lambda s: (s.prediction.ring_hop_seconds, s.prediction.wall_minutes)),
            ("ray-default", lambda s: (_alt(s, "ray-default").ring_hop_seconds,
                                       _alt(s, "ray-default").wall_minutes)),
            ("random", lambda s: (_alt(s, "random").ring_hop_seconds,
                                  _alt(s, "random").wall_minutes)),
            ("lower-bound", lambda s: (_alt(s, "lower-bound").ring_hop_seconds,
                                       _alt(s, "lower-bound").wall_minutes))]):
        vals = [get(s) for s in plan.stages]
        axes[0].bar([i + k * 0.2 for i in x], [v[0] * 1e3 for v in vals], 0.2, label=label)
        axes[1].bar([i + k * 0.2 for i in x], [v[1] for v in vals], 0.2, label=label)
    for ax, title in zip(axes, ["slowest ring hop (ms)", "wall minutes"]):
        ax.set_xticks([i + 0.3 for i in x], names), ax.set_title(title)
    axes[0].legend(fontsize=7)
    files.append(_save(fig, out / "planned_vs_baselines.png"))
    # link load
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for s in plan.stages:
        shares = sorted(ll.share_gb_s for ll in s.bottleneck_links)
        ax.plot(range(1, len(shares) + 1), shares, marker="o", label=s.name)
    ax.set_xlabel("most contended links, worst first"), ax.set_ylabel("GB/s per transfer")
    ax.set_title("Link load (fair share per ring transfer)"), ax.legend(fontsize=7)
    files.append(_save(fig, out / "link_load.png"))
    files.append(render_rings_plot(plan, out / "rings.png", spec))
    return files


def _node_layout(spec: ClusterSpec | None, node: str, gpus: list[int]) -> dict[int, tuple]:
    """x offset and socket of each local GPU: gaps between PCIe switches, wider between sockets."""
    if spec is None or node not in {n.name for n in spec.nodes}:
        return {g: (i, 0) for i, g in enumerate(sorted(gpus))}
    nt = spec.node_types[next(n.node_type for n in spec.nodes if n.name == node)]
    out, x = {}, 0.0
    for si, sock in enumerate(nt.sockets):
        for sw in sock.switches:
            for g in sorted(sw.gpus):
                out[g] = (x, si)
                x += 1
            x += 0.4
        x += 0.8
    return out


MAX_RINGS_DRAWN = 4  # per stage; the last panel's title says how many more there are
PANEL_UNITS = 64  # GPU positions that fit one panel of a 16-inch-wide row
ARC_BASE, ARC_SLOPE = 0.5, 0.12  # a hop's arc peaks this high (data units) + per unit of span


def rings_figure(plan: Plan, spec: ClusterSpec | None = None):
    """The rings of every stage, whole: a row per stage, a panel per ring (the first
    MAX_RINGS_DRAWN; fewer, wider panels when a ring spans many nodes), each over every GPU of
    the nodes the ring uses: GPUs grouped by PCIe switch, coloured by CPU socket, the ring's own
    outlined; arrows in ring order (K/V passes along), all above the GPUs, the axes sized to
    hold the highest."""
    fig = plt.figure(figsize=(16, 2.8 * len(plan.stages)))
    grid = fig.add_gridspec(len(plan.stages), 12)  # 12 columns: 1, 2, 3 or 4 panels a row
    for row, s in enumerate(plan.stages):
        units = sum(_node_width(spec, node, s) + 3 for node in _ring_nodes(s.rings[0]))
        cols = max(1, min(MAX_RINGS_DRAWN, len(s.rings), int(PANEL_UNITS * 1.5 // units)))
        span = 12 // cols
        for k in range(cols):
            ax = fig.add_subplot(grid[row, k * span:(k + 1) * span])
            _draw_ring(ax, s, k, spec, len(s.rings) - cols if k == cols - 1 else 0)
    return fig


def _ring_nodes(ring) -> list[str]:
    return list(dict.fromkeys(w.node for w in ring))


def _node_gpus(s, node: str) -> list[int]:
    return sorted({w.gpu for w in s.workers if w.node == node})


def _node_width(spec: ClusterSpec | None, node: str, s) -> float:
    layout = _node_layout(spec, node, _node_gpus(s, node))
    return max(x for x, _ in layout.values()) if layout else 0


def _draw_ring(ax, s, k: int, spec: ClusterSpec | None, more_rings: int) -> None:
    colours = ["#8fb8de", "#f4b183", "#a9d18e", "#d5a6bd"]
    ring = s.rings[k]
    in_ring = {(w.node, w.gpu) for w in ring}
    nodes = _ring_nodes(ring)
    positions = sum(len(_node_layout(spec, n, _node_gpus(s, n))) for n in nodes)
    size = max(12, min(110, 2600 / max(positions, 1)))
    pos, x0 = {}, 0.0
    for node in nodes:
        layout = _node_layout(spec, node, _node_gpus(s, node))
        for g in sorted({w.gpu for w in s.workers if w.node == node}):
            x, sock = layout.get(g, (g, 0))
            pos[(node, g)] = x0 + x
            ax.scatter(x0 + x, 0, s=size, color=colours[sock % 4], zorder=2,
                       edgecolors="black" if (node, g) in in_ring else "none")
            if positions <= 24:
                ax.annotate(str(g), (x0 + x, 0), ha="center", va="center", fontsize=6,
                            zorder=3)
        width = max(x for x, _ in layout.values()) if layout else 0
        ax.text(x0 + width / 2, -0.9, node, ha="center", va="top", fontsize=7)
        x0 += width + 3
    top = 1.0
    hops = list(zip(ring, ring[1:] + ring[:1])) if len(ring) > 1 else []
    for a, b in hops:
        x1, x2 = pos[(a.node, a.gpu)], pos[(b.node, b.gpu)]
        # A quadratic Bezier in data coordinates, so its height is known (matplotlib's arc3
        # bends in pixels and leaves the axes): every hop arcs upwards, higher the farther.
        peak = ARC_BASE + ARC_SLOPE * abs(x2 - x1)
        path = MplPath([(x1, 0.2), ((x1 + x2) / 2, 2 * peak - 0.2), (x2, 0.2)],
                       [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3])
        ax.add_patch(FancyArrowPatch(path=path, arrowstyle="->", color="tab:blue", lw=0.8,
                                     mutation_scale=8))
        top = max(top, peak)
    title = f"{s.name}: ring {k + 1} of {s.dims.dp} ({s.dims.sequence} GPUs)"
    if more_rings > 0:
        title += f"; {more_rings} more rings not drawn"
    ax.set_title(title, fontsize=8)
    ax.set_xlim(-1, max(x0 - 2, 1))
    ax.set_ylim(-2.0, top * 1.1 + 0.3)
    ax.axis("off")


def render_rings_plot(plan: Plan, path: Path, spec: ClusterSpec | None = None) -> str:
    """rings_figure saved as a PNG (colour = CPU socket, gaps = PCIe switches)."""
    fig = rings_figure(plan, spec)
    fig.suptitle("Rings in order (arrows: K/V hops); colour = CPU socket, gaps = PCIe "
                 "switches, outlined = the ring's GPUs", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def render_report(plan: Plan, spec: ClusterSpec, out: str | Path,
                  whatif: Plan | None = None, whatif_label: str = "",
                  compare_minutes: list[float] | None = None,
                  measured: list[list[str]] | None = None) -> list[Path]:
    """Write plan.json, plan-whatif.json (with a what-if), report.md, report.html and
    PNGs into `out`; return the paths written. `measured`: the predicted-against-measured
    table (topology.measured.compare_rows)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    main = plan
    atomic_write(out / "plan.json", plan.model_dump_json(indent=2))
    if whatif is not None:
        atomic_write(out / "plan-whatif.json", whatif.model_dump_json(indent=2))
    lines, rows = _headline(main, spec, compare_minutes)
    pngs = render_plots(main, out, spec)
    sections: list[tuple[str, list]] = [("Headline", lines + [rows])]
    if any(s.checkpointing_options for s in main.stages):
        sections.append(("Activation checkpointing", _checkpointing_section(main)))
    if any(s.attention_options for s in main.stages):
        sections.append(("Attention over packed documents", _attention_section(main)))
    if any(s.prediction.lifecycle_gb for s in main.stages):
        sections.append(("Memory by phase", _lifecycle_section(main)))
    if whatif is not None:
        diff = [["stage", "before: wall", "after: wall", "change", "after: ring x dp",
                 "after: slowest link"]]
        for a, b in zip(plan.stages, whatif.stages):
            pa, pb = a.prediction, b.prediction
            worst = b.bottleneck_links[0].link if b.bottleneck_links else "none"
            diff.append([a.name, _fmt_min(pa.wall_minutes), _fmt_min(pb.wall_minutes),
                         f"{pb.wall_minutes / pa.wall_minutes - 1:+.1%}",
                         _layout(b), worst])
        sections.append((f"What if: {whatif_label}", [diff]))
    if measured is not None:
        sections.append(("Predicted against measured", [
            "Step time the plan predicts for each stage beside what the run measured (its "
            "newest committed checkpoint's training seconds over its steps).", measured]))
    per_stage = []
    for s in main.stages:
        p = s.prediction
        shares = ", ".join(f"{k} {v / p.step_seconds:.0%}" for k, v in p.parts_seconds.items()
                           if v > 0)
        if p.ring_hop_gap is not None:
            per_stage.append(f"**{s.name}** slowest K/V hop: planned "
                             f"{p.ring_hop_seconds * 1e3:.3f} ms, lower bound "
                             f"{p.ring_hop_bound_seconds * 1e3:.3f} ms, gap "
                             f"{p.ring_hop_gap:.3f}x.")
        per_stage.append(f"**{s.name}**: {shares}. Ring 0 order: "
                         + " -> ".join(f"{w.node}:{w.gpu}" for w in s.rings[0][:12])
                         + (" ..." if len(s.rings[0]) > 12 else "") + ". "
                         + " ".join(n.rstrip(".") + "." for n in s.notes))
    sections.append(("Where the time goes", per_stage))
    if main.eval is not None:
        sections.append(("Evaluation at the trained lengths", _eval_section(main)))
    sections.append(("Plots", [f"![{p}]({p})" for p in pngs]))
    sections.append(("Cluster", [f"`{line}`" for line in spec.summary().splitlines()]))
    sections.append(("Assumptions (predictions are only as good as these)", main.assumptions))
    md, body = [f"# ringpilot plan: run {main.run} on {spec.name}"], []
    for title, items in sections:
        md.append(f"\n## {title}\n")
        body.append(f"<h2>{html.escape(title)}</h2>")
        for it in items:
            if isinstance(it, list):
                md.append(_md_table(it))
                body.append(_html_table(it))
            elif it.startswith("!["):
                md.append(it)
                src = it[it.index("(") + 1:-1]
                body.append(f'<img src="{html.escape(src)}" alt="{html.escape(src)}">')
            else:
                md.append(f"- {it}" if title.startswith("Assumptions") else it + "\n")
                body.append(f"<p>{html.escape(it).replace('**', '')}</p>")
    atomic_write(out / "report.md", "\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:"
             "collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}")
    atomic_write(
        out / "report.html",
        "<!doctype html><html><head><meta charset='utf-8'><title>ringpilot plan "
        f"{html.escape(main.run)}"
        f"</title><style>{style}</style></head><body><h1>ringpilot plan: run "
        f"{html.escape(main.run)} on {html.escape(spec.name)}</h1>{''.join(body)}</body></html>\n")
    extra = ["plan-whatif.json"] if whatif is not None else []
    return [out / f for f in ["plan.json", *extra, "report.md", "report.html", *pngs]]


def _eval_section(plan: Plan) -> list:
    """Per context length: one evaluator or a gang, its ring, predicted prefill, decoding and
    hours per checkpoint (cost model)."""
    e = plan.eval
    rows = [["context", "runs on", "ring (first GPUs)", "tokens per member", "prefill",
             "decode", "prompts", "per checkpoint"]]
    for r in e.lengths:
        ring = " -> ".join(f"{w.node}:{w.gpu}" for w in r.ring[:4]) + (
            " ..." if len(r.ring) > 4 else "")
        rows.append([f"{r.length:,}", r.engine, ring, f"{r.tokens_per_member:,}",
                     f"{r.prefill_seconds:.1f} s", f"{r.decode_ms_per_token:.1f} ms",
                     str(r.prompts), f"{r.checkpoint_hours:.2f} h"])
    where = [["stage", "GPUs per checkpoint", "when", "evaluation nodes"]]
    for s in e.stages:
        nodes = ", ".join(s.nodes[:4]) + (" ..." if len(s.nodes) > 4 else "") or "-"
        where.append([s.stage, f"{s.gpus:g}", s.when, nodes])
    placed = (["Where each stage's checkpoints are evaluated: an evaluation actor is created "
               "when a checkpoint lands and released after it, on whole nodes holding none of "
               "the stage's training workers; a stage that leaves too few evaluates at its "
               "boundary, on the GPUs it frees, before the next stage starts.", where]
              if e.stages else [])
    return [f"Evaluators load checkpoints in {e.dtype}. One GPU holds "
            f"{e.tokens_per_device:,} context tokens of this model "
            f"(eval.max_tokens_per_evaluator: {e.max_tokens_per_evaluator:,}); longer contexts "
            "run on evaluation gangs: ring-attention prefill, sequence-parallel decoding. "
            f"Evaluating one checkpoint's whole grid takes {e.checkpoint_hours:.1f} h on one "
            f"gang at a time ({e.answer_tokens} tokens decoded per prompt; cost model).",
            rows, *placed, *e.notes]


def _ranks_per_host(s: StagePlan) -> int:
    """The most of the stage's ranks one node holds: the rank processes sharing its memory."""
    per_node: dict[str, int] = {}
    for ring in s.rings:
        for w in ring:
            per_node[w.node] = per_node.get(w.node, 0) + 1
    return max(per_node.values(), default=1)


def _lifecycle_section(plan: Plan) -> list:
    """Per stage the peak of each phase of its life per GPU, per rank's host process, and per
    host (the stage's ranks on its fullest node together)."""
    gpu = _device(plan).hbm_bytes / 1e9
    phases = list(dict.fromkeys(p for s in plan.stages for p in s.prediction.lifecycle_gb))
    rows = [["stage", "shard group", "ranks per host",
             *(f"{p}: GPU / rank's host / host" for p in phases)]]
    for s in plan.stages:
        life, n = s.prediction.lifecycle_gb, _ranks_per_host(s)
        cells = []
        for p in phases:
            if p not in life:
                cells.append("-")
                continue
            device, host = life[p].get("device", 0.0), life[p].get("host")
            fit = "" if device <= gpu else " (does not fit)"
            cells.append(f"{device:.1f} GB / - / -{fit}" if not host else
                         f"{device:.1f} / {host:.2f} / {host * n:.1f} GB{fit}")
        rows.append([s.name, str(s.dims.shard), str(n), *cells])
    return [f"Each phase of a stage's life at its peak (cost model: topology.cost."
            f"lifecycle_memory), per GPU (of {gpu:.0f} GB, the reserve included), per rank's "
            "host process, and per host (a host runs one rank process per GPU it gives the "
            "stage: the ranks per host column; an upper bound, every rank at its own peak at "
            "once; '-': not modelled). load: the model built on the meta device, "
            "sharded, then filled from a Hugging Face checkpoint 32 MB of rows at a time; "
            "resume: the DCP shards of weights and AdamW read back; step: a training step; "
            "save: a checkpoint's DCP shards written; export: the stage's final checkpoint "
            "written as Hugging Face files by every rank, then consolidated one full tensor at "
            "a time. No phase gathers the model on one rank. The GPU numbers of load and export "
            "are checked against traces of the trainer's code (ringpilot plan --verify-memory); "
            "the host numbers are modelled from torch's and safetensors' code, not traced, and "
            "the profile does not know a host's memory, so they are reported, not checked.",
            rows]


def _attention_section(plan: Plan) -> list:
    """Per stage causal and document attention priced on its layout: step time, attention
    compute and exposed K/V of each, document masking's allowed pairs, its busiest rank over
    the mean, the blocks it skips, and its speed-up over causal."""
    rows = [["stage", "trains with", "causal: step (attention, exposed K/V)",
             "document: step (attention, exposed K/V)", "allowed pairs of causal",
             "busiest rank / mean", "blocks skipped", "document speed-up: step (attention)"]]
    for s in plan.stages:
        by = {o.attention: o for o in s.attention_options}
        if set(by) != {"causal", "document"}:
            rows.append([s.name, "-", "-", "-", "-", "-", "-", "-"])
            continue
        causal, document = by["causal"], by["document"]
        chosen = next(o.attention for o in s.attention_options if o.chosen)
        rows.append([
            s.name, chosen, *(f"{o.step_seconds:,.1f} s ({o.attention_seconds:,.1f} s, "
                              f"{o.exposed_ring_seconds:,.1f} s)" for o in (causal, document)),
            f"{document.work:.0%}", f"{document.imbalance:.2f}x",
            f"{document.skipped_blocks:.0%}",
            f"{causal.step_seconds / document.step_seconds:.2f}x "
            f"({causal.attention_seconds / document.attention_seconds:.2f}x)"])
    return ["Attention `causal` lets a token see every earlier token of its packed sequence; "
            "`document` only the earlier tokens of its own document, so its work is the sum "
            "over documents of len (len + 1) / 2 pairs, not seq_len (seq_len + 1) / 2. Priced "
            "on each stage's layout from the document-length histogram (packed sequences "
            "sampled from it), each sharded per document as the trainer shards it on a ring "
            "(zigzag alone balances one causal sequence, not its documents): the busiest ring "
            "rank sets the pace, and a block with no allowed pair is skipped but still passes "
            "its K/V, a transfer nothing hides. Attention and exposed K/V are "
            "seconds per optimizer step; the speed-up is causal over document.", rows]


def _checkpointing_section(plan: Plan) -> list:
    """Per stage the policy the trainer applies, its predicted gain against `full`, and every
    policy's step time and memory per GPU on the stage's layout."""
    gpu = _device(plan).hbm_bytes / 1e9
    policies = list(dict.fromkeys(o.policy for s in plan.stages
                                  for o in s.checkpointing_options))
    rows = [["stage", "policy", "against full", *(f"{p}: step, mem" for p in policies)]]
    for s in plan.stages:
        by = {o.policy: o for o in s.checkpointing_options}
        chosen, full = by.get(s.activation_checkpointing), by.get("full")
        if chosen is None or full is None or chosen is full:
            gain = "-"
        else:
            gain = (f"{chosen.peak_gb - full.peak_gb:+.1f} GB, "
                    f"{chosen.step_seconds / full.step_seconds - 1:+.0%} step")
        rows.append([s.name, s.activation_checkpointing, gain, *(
            f"{by[p].step_seconds:,.1f} s, {by[p].peak_gb:.1f} GB"
            + ("" if by[p].fits else " (does not fit)") if p in by else "-"
            for p in policies)])
    return [f"Each stage's policy, priced on its layout (memory per GPU at the peak, of "
            f"{gpu:.0f} GB): full recomputes every decoder layer in backward, ring attention "
            "included; attention keeps ring attention's output and log-sum-exp, so the ring "
            "runs once forward and once backward; none keeps every activation. A stage set to "
            "auto gets the fastest that fits.", rows]


def _layout(s) -> str:
    """A stage's "ring x dp" cell: 8 x 1, or 4u2 x 1 with Ulysses (a ring of 4 groups of 2)."""
    return s.dims.label()
