"""Evaluation reports: per-checkpoint heatmaps and tables, and the run's Markdown + HTML report."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from ray_jobs.eval.results import RESULTS_FILE, TABLES_FILE, EvalResults, load_results
from specs.atomic import atomic_write
from specs.checkpoint import parse_checkpoint_name
from specs.eval_tasks import DEPTH_TASKS, KAMRADT_TASK
from specs.ledger import EvalEntry, Ledger, contained
from specs.names import check_name

REPORT_DIR = "eval"


RULER_CURVES_PNG = "ruler_vs_published.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(results: EvalResults, task: str) -> tuple[list[int], list[float], list[list[float]]]:
    """The task's whole grid as asked (every length, and every depth for NIAH tasks), NaN where
    a cell was not run (see `_not_run`), so no cell is silently left out."""
    cells = [c for c in results.cells if c.task == task]
    lengths = sorted(set(results.lengths) | {c.length for c in cells})
    asked = results.task_depths.get(task, results.depths)
    depths = (sorted(set(asked) | {c.depth for c in cells if c.depth is not None})
              if task in DEPTH_TASKS else [])
    by = {(c.length, c.depth): c.score for c in cells}
    return lengths, depths, [[by.get((n, d), float("nan")) for d in depths] for n in lengths]


def _not_run(results: EvalResults, task: str, length: int) -> str:
    """Why a (task, length) has no score: its skip reason, or that it was not reached."""
    for s in results.skipped:
        if s.length == length and s.task in (task, "*"):
            return s.reason
    return "not reached (the evaluation stopped before this cell)"


def render_heatmap(results: EvalResults, task: str, path: str | Path) -> None:
    """Score per (context length, needle depth) as a heatmap PNG (Kamradt's test: his layout,
    context length across and depth down, red to green)."""
    plt = _pyplot()
    lengths, depths, grid = _grid(results, task)
    if task == KAMRADT_TASK:
        _kamradt_heatmap(plt, results, lengths, depths, grid, path)
        return
    fig, ax = plt.subplots(figsize=(3.0 + 0.7 * len(depths), 2.2 + 0.45 * len(lengths)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")  # grey: cells not run
    im = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "not run" if v != v else f"{v:.2f}", ha="center", va="center",
                    fontsize=7 if v != v else 8)
    where = (f"{results.stage} step {results.step}" if results.stage
             else Path(results.checkpoint).name)
    ax.set_title(f"{task}: {where}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _kamradt_heatmap(plt, results: EvalResults, lengths, depths, grid, path) -> None:
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("kamradt", ["#F0496E", "#EBB839", "#0CD79F"])
    cmap = cmap.with_extremes(bad="lightgrey")
    by_depth = [[row[j] for row in grid] for j in range(len(depths))]  # depth down, length across
    fig, ax = plt.subplots(figsize=(3.0 + 0.8 * len(lengths), 2.0 + 0.32 * len(depths)))
    im = ax.imshow(by_depth, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth percent")
    for i, row in enumerate(by_depth):
        for j, v in enumerate(row):
            if v != v:
                ax.text(j, i, "not run", ha="center", va="center", fontsize=7)
    where = (f"{results.stage} step {results.step}" if results.stage
             else Path(results.checkpoint).name)
    ax.set_title(f"Pressure testing: needle in a haystack ({where})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="score (key phrases found)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_checkpoint_tables(results: EvalResults) -> str:
    """One Markdown table per task: rows are context lengths (with what ran them), columns
    needle depths; cells not run say so, with the reason under the table."""
    out = [f"# Evaluation of {results.checkpoint}", "",
           f"seed {results.seed}, {results.samples} samples per cell; scores 0..1", ""]
    if results.error:
        return "\n".join(out + [f"not evaluated: {results.error}"]) + "\n"
    for task in results.tasks:
        lengths, depths, grid = _grid(results, task)
        out.append(f"## {task}: {results.scores.get(task, float('nan')):.3f}")
        header = ["length", "run on"] + ([f"{d:g}%" for d in depths] if depths else ["score"])
        if not depths:
            cells = {c.length: c.score for c in results.cells if c.task == task}
            grid = [[cells.get(n, float("nan"))] for n in lengths]
        rows, reasons = [], []
        for n, row in zip(lengths, grid):
            engine = results.engines.get(str(n), "-")
            rows.append([f"{n:,}", engine] + ["not run" if v != v else f"{v:.2f}" for v in row])
            if any(v != v for v in row):
                reasons.append(f"- not run at {n:,} tokens: {_not_run(results, task, n)}")
        out += ["", _md_table(header, rows), ""] + reasons + ([""] if reasons else [])
    if results.gang:
        g = results.gang
        out += [f"Contexts over {results.max_length:,} tokens ran on an evaluation gang of "
                f"{g['size']} (ring order {g.get('ring')}): ring-attention prefill, "
                "sequence-parallel decoding.", ""]
    if results.ruler is not None:
        out += ruler_lines(results.ruler)
    if results.babilong is not None:
        out += babilong_lines(results.babilong)
    if results.skipped:
        out += ["## skipped", ""]
        out += [f"- {s.task} at {s.length:,} tokens: {s.reason}" for s in results.skipped]
    return "\n".join(out) + "\n"


def ruler_lines(ruler: dict) -> list[str]:
    """RULER as it is published: per length, the mean over tasks x 100, with its samples and a
    95% interval, and what could not run, with the reason."""
    out = ["## RULER (lm-eval's tasks, ringpilot backend)", "",
           f"Tasks: {', '.join(ruler['tasks'])}; {ruler.get('samples_per_task', '?')} samples "
           "per task and length; score = mean over the tasks that ran, x 100.", ""]
    rows = [[f"{r['length']:,}", f"{r['score']:.1f}", f"+/- {r['ci95']:.1f}", str(r['samples']),
             ", ".join(f"{t} {v:.1f}" for t, v in r["tasks"].items())] for r in ruler["rows"]]
    if rows:
        out += [_md_table(["length", "RULER", "95% CI", "samples", "per task"], rows), ""]
    if ruler.get("label"):
        out += [f"**{ruler['label']}** (threshold {ruler['threshold']}: "
                f"{ruler['threshold_source']})", ""]
        if ruler.get("tasks_missing"):
            out += [f"- not in the average: {', '.join(ruler['tasks_missing'])}"]
    if ruler.get("error"):
        out += [f"- not run: {ruler['error']}"]
    out += [f"- not run: {task}: {why}" for task, why in ruler.get("unavailable", {}).items()]
    out += [f"- not run at {int(n):,} tokens: {why}" for n, why in ruler.get("not_run", {}).items()]
    return out + [""]


def babilong_lines(doc: dict) -> list[str]:
    """BABILong per config: the mean accuracy over the tasks x 100, and what could not run."""
    out = ["## BABILong (lm-eval's tasks, ringpilot backend)", "",
           f"Tasks: {', '.join(doc['tasks'])}; {doc.get('samples_per_task', '?')} samples per "
           "task; score = mean accuracy over the tasks that ran, x 100.", ""]
    rows = [[r["config"], ", ".join(f"{n:,}" for n in r["lengths"]), f"{r['score']:.1f}",
             str(r["samples"]), ", ".join(f"{t} {v:.1f}" for t, v in r["tasks"].items())]
            for r in doc["rows"]]
    if rows:
        out += [_md_table(["config", "for lengths", "BABILong", "samples", "per task"], rows), ""]
    if doc.get("error"):
        out += [f"- not run: {doc['error']}"]
    out += [f"- not run: {task}: {why}" for task, why in doc.get("unavailable", {}).items()]
    out += [f"- not run at {int(n):,} tokens: {why}" for n, why in doc.get("not_run", {}).items()]
    return out + [""]


def _plot_ruler_curves(curves: list[tuple[str, dict]], path: Path) -> None:
    """Our RULER average per length, one line per checkpoint, against the published curves
    (dashed) and RULER's threshold."""
    from ray_jobs.eval.lm_eval.effective_length import REFERENCE_CURVES, THRESHOLD

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for ref in REFERENCE_CURVES:
        ax.plot(ref.lengths, ref.scores, linestyle="--", marker=".",
                label=f"{ref.model} (published)")
    for name, average in curves:
        pts = sorted((int(n), v) for n, v in average.items())
        ax.plot(*zip(*pts), marker="o", linewidth=2, label=name)
    ax.axhline(THRESHOLD, color="grey", linestyle=":", label=f"threshold {THRESHOLD}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("RULER average x 100")
    ax.set_title("RULER per length: this run against published curves")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _ruler_headline(rows) -> tuple[list[list[str]], list[tuple[str, dict]]]:
    """Per checkpoint that ran RULER: its average per length and its label (effective length
    or partial); and the curves to plot."""
    table, curves = [], []
    for stage, ckpt, ev, res in rows:
        r = res.ruler if res else None
        if not r or not r.get("average"):
            continue
        name = f"{stage} step {_step_of(ckpt)}" + ("" if r["complete"] else " (partial)")
        curves.append((name, r["average"]))
        table.append([stage, str(_step_of(ckpt)), ", ".join(
            f"{int(n):,}: {v:.1f}" for n, v in r["average"].items()), r["label"]])
    return table, curves


def _collect(run_dir: Path) -> list[tuple[str, str, EvalEntry, EvalResults | None]]:
    """(stage, checkpoint path, ledger entry, results) in stage order, then step order."""
    ledger = Ledger(run_dir)
    doc = ledger.read()
    rows = []
    for stage, entry in doc.stages.items():
        found = []
        for ckpt, ev in entry.eval.items():
            res = None
            path = (ledger.resolve(ev.results, f"stages.{stage}.eval.{ckpt}.results")
                    if ev.results else None)
            if path is not None and (path.is_file() or path.is_symlink()):
                res = load_results(path)  # refuses a symlink
            found.append((stage, ckpt, ev, res))
        found.sort(key=lambda r: r[1])  # step-NNNNNN sorts by step
        rows += found
    return rows


def _step_of(ckpt: str) -> int:
    return parse_checkpoint_name(Path(ckpt).name) or 0


def render_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write <run>/eval/report.md and report.html with score-vs-step plots and the heatmaps."""
    run_dir = Path(run_dir)
    if not (run_dir / "ledger.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no ledger.json; pass a run directory "
                                "(<storage.path>/<run name>/)")
    rows = _collect(run_dir)  # before writing anything: a bad ledger or results file stops here
    out = contained(run_dir, REPORT_DIR, "the report folder")  # eval/ may not link elsewhere
    out.mkdir(parents=True, exist_ok=True)
    tasks = sorted({t for *_, r in rows if r for t in r.scores})
    lengths_not_scores = [t for t in tasks if t == "ruler_effective_length"]
    stages = list(dict.fromkeys(s for s, *_ in rows))
    # Steps restart in each stage: offset every stage by the last step seen before it.
    offsets, total = {}, 0
    for stage in stages:
        offsets[stage] = total
        total += max(_step_of(c) for s, c, *_ in rows if s == stage)
    plots = []
    for task in (t for t in tasks if t not in lengths_not_scores):
        name = check_name(f"score_vs_step_{task.replace('@', '_at_')}.png", "plot file name")
        _plot_scores(rows, task, offsets, _fresh(out / name))
        plots.append((task, name))
    header = ["stage", "step", "status", "attempts"] + tasks
    table = []
    for stage, ckpt, ev, res in rows:
        scores = [("-" if t not in ev.scores else f"{ev.scores[t]:,.0f}"
                   if t in lengths_not_scores else f"{ev.scores[t]:.3f}") for t in tasks]
        status = ev.status + (f" ({ev.error})" if ev.error else "")
        table.append([stage, str(_step_of(ckpt)), status, str(ev.attempts)] + scores)
    heatmaps = []
    for stage, ckpt, ev, res in rows:
        if res and ev.results:
            folder = Path(os.path.relpath(run_dir / ev.results, out)).parent
            for key, file in res.files.items():
                if key.startswith("heatmap_"):
                    heatmaps.append((f"{stage} step {_step_of(ckpt)}: {key[8:]}",
                                     (folder / file).as_posix()))
    title = f"Evaluation report: run {run_dir.name}"
    md = [f"# {title}", "", f"{len(rows)} checkpoint evaluations; scores are fractions of "
          "expected answers found (NIAH grid: the first number of the answer, exact).", "",
          _md_table(header, table), "", "## Score vs step", ""]
    md += [f"![{t}]({p})" for t, p in plots] + [""]
    ruler_rows = [[stage, str(_step_of(ckpt)), f"{r['length']:,}", f"{r['score']:.1f}",
                   f"+/- {r['ci95']:.1f}", str(r["samples"])]
                  for stage, ckpt, ev, res in rows if res and res.ruler
                  for r in res.ruler["rows"]]
    if ruler_rows:
        md += ["## RULER per length (lm-eval's tasks, mean over tasks x 100)", "",
               _md_table(["stage", "step", "length", "RULER", "95% CI", "samples"], ruler_rows),
               "", "Each checkpoint's tables.md lists the tasks, per-task scores and what could "
               "not run.", ""]
    from ray_jobs.eval.lm_eval.effective_length import (
        REFERENCE_CURVES,
        THRESHOLD,
        THRESHOLD_SOURCE,
    )

    headline, curves = _ruler_headline(rows)
    refs = [f"{c.model}: " + ", ".join(f"{n // 1024}K {v}" for n, v in zip(c.lengths, c.scores))
            + f"; effective length {c.effective_length // 1024}K (source: {c.source})"
            for c in REFERENCE_CURVES]
    if curves:
        _plot_ruler_curves(curves, _fresh(out / RULER_CURVES_PNG))
        md += ["## RULER average per length and effective length", "",
               _md_table(["stage", "step", "average per length (x 100)", "effective length"],
                         headline), "",
               f"Effective length: the longest length whose average over RULER's 13 tasks stays "
               f"above {THRESHOLD} ({THRESHOLD_SOURCE}); fewer tasks: partial, not comparable.",
               "", f"![RULER against published curves]({RULER_CURVES_PNG})", "",
               "Reference curves (dashed):", ""] + [f"- {r}" for r in refs] + [""]
    babilong_rows = [[stage, str(_step_of(ckpt)), r["config"], f"{r['score']:.1f}",
                      str(r["samples"])]
                     for stage, ckpt, ev, res in rows if res and res.babilong
                     for r in res.babilong["rows"]]
    if babilong_rows:
        md += ["## BABILong per config (lm-eval's tasks, mean accuracy x 100)", "",
               _md_table(["stage", "step", "config", "BABILong", "samples"], babilong_rows), ""]
    md += ["## Heatmaps (context length x depth)", ""]
    md += [f"### {cap}\n\n![{cap}]({p})\n" for cap, p in heatmaps]
    md_path = out / "report.md"
    atomic_write(md_path, "\n".join(md) + "\n")
    e = html.escape
    body = [f"<h1>{e(title)}</h1>", "<table border='1' cellspacing='0' cellpadding='3'>",
            "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table]
    body += ["</table>", "<h2>Score vs step</h2>"]
    body += [f"<img src='{e(p)}' alt='{e(t)}'>" for t, p in plots]
    if ruler_rows:
        body += ["<h2>RULER per length (lm-eval's tasks, mean over tasks x 100)</h2>",
                 "<table border='1' cellspacing='0' cellpadding='3'><tr>"
                 + "".join(f"<th>{h}</th>" for h in ("stage", "step", "length", "RULER",
                                                      "95% CI", "samples")) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in ruler_rows]
        body += ["</table>"]
    if curves:
        body += ["<h2>RULER average per length and effective length</h2>",
                 "<table border='1' cellspacing='0' cellpadding='3'><tr>"
                 + "".join(f"<th>{h}</th>" for h in ("stage", "step",
                                                      "average per length (x 100)",
                                                      "effective length")) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in headline]
        body += ["</table>", f"<p>Effective length: the longest length whose average over "
                 f"RULER's 13 tasks stays above {THRESHOLD} ({e(THRESHOLD_SOURCE)}); fewer "
                 "tasks: partial, not comparable.</p>",
                 f"<img src='{RULER_CURVES_PNG}' alt='RULER against published curves'>",
                 "<p>Reference curves (dashed):</p><ul>"]
        body += [f"<li>{e(r)}</li>" for r in refs] + ["</ul>"]
    if babilong_rows:
        body += ["<h2>BABILong per config (lm-eval's tasks, mean accuracy x 100)</h2>",
                 "<table border='1' cellspacing='0' cellpadding='3'><tr>"
                 + "".join(f"<th>{h}</th>" for h in ("stage", "step", "config", "BABILong",
                                                      "samples")) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                 for r in babilong_rows] + ["</table>"]
    body += ["<h2>Heatmaps (context length x depth)</h2>"]
    body += [f"<figure><img src='{e(p)}' alt='{e(c)}'><figcaption>{e(c)}</figcaption></figure>"
             for c, p in heatmaps]
    html_path = out / "report.html"
    atomic_write(html_path, "<!doctype html><html><head><meta charset='utf-8'><title>"
                 f"{e(title)}</title></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return md_path, html_path


def _fresh(path: Path) -> Path:
    """`path`, with a symlink there removed first: matplotlib writes through links, and a
    report must never write outside its folder."""
    if path.is_symlink():
        path.unlink()
    return path


def _plot_scores(rows, task: str, offsets: dict[str, int], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    for stage, offset in offsets.items():
        pts = sorted((offset + _step_of(c), ev.scores[task]) for s, c, ev, _ in rows
                     if s == stage and task in ev.scores)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=stage)
        if offset:
            ax.axvline(offset, color="grey", linestyle=":", linewidth=0.8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("optimizer step (stages one after another)")
    ax.set_ylabel("score")
    ax.set_title(task)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_results(results: EvalResults, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in results.tasks:
        if task in DEPTH_TASKS and any(c.task == task for c in results.cells):
            name = check_name(f"heatmap_{task}.png", "heatmap file name")
            render_heatmap(results, task, _fresh(out_dir / name))
            results.files[f"heatmap_{task}"] = name
    atomic_write(out_dir / TABLES_FILE, render_checkpoint_tables(results))
    results.files["tables"] = TABLES_FILE
    return atomic_write(out_dir / RESULTS_FILE,
                        json.dumps(results.model_dump(mode="json"), indent=1) + "\n")
