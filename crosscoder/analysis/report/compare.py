"""The crosscoder-compare report: report.html (figures embedded), compare.json (every figure in it) and the PNGs,
each written under a temporary name and renamed, report.html last."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from crosscoder.analysis.alignment.compare import Comparison
from crosscoder.analysis.features.evolution import CLASSES
from crosscoder.analysis.report.dictionary import jsonable
from crosscoder.analysis.report.html import PAGE_STYLE, html_table, image_tag
from crosscoder.analysis.report.plots import figure_width, label_snapshot_axis, save_figure, snapshot_labels
from crosscoder.constants import ANALYSIS_REPORT_FILE
from crosscoder.storage import write_text_atomic

COMPARE_JSON = "compare.json"
EMERGENCE_FIGURE, EV_FIGURE, L0_FIGURE = "emergence.png", "explained_variance.png", "l0.png"


def input_colors(n_inputs: int) -> list[str]:
    """One colour per input (tab10, cycled)."""
    palette = colormaps["tab10"].colors
    return [palette[i % len(palette)] for i in range(n_inputs)]


def plot_emergence_comparison(comparison: Comparison, path: Path) -> Path:
    """Emergence counts per snapshot, one group of bars per snapshot, one bar (colour) per input."""
    first = comparison.inputs[0].evolution
    labels = snapshot_labels(first.names, first.steps)
    n_inputs = len(comparison.inputs)
    fig = Figure(figsize=(figure_width(len(labels) * max(1, n_inputs // 2)), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / n_inputs
    for index, (item, color) in enumerate(zip(comparison.inputs, input_colors(n_inputs), strict=True)):
        counts = item.evolution.emergence_counts.numpy()
        ax.bar(x - 0.4 + width * (index + 0.5), counts, width=width, color=color, label=item.name)
    label_snapshot_axis(ax, labels)
    ax.set(xlabel="snapshot", ylabel="latents emerging",
           title=f"Emergence per snapshot (first snapshot with n >= {first.threshold})")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def plot_per_snapshot(comparison: Comparison, values: list[list[float]], ylabel: str, title: str, path: Path
                      ) -> Path:
    """One line per input over the snapshots (`values` [inputs][S])."""
    first = comparison.inputs[0].evolution
    labels = snapshot_labels(first.names, first.steps)
    fig = Figure(figsize=(figure_width(len(labels)), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    for item, row, color in zip(comparison.inputs, values, input_colors(len(values)), strict=True):
        ax.plot(x, np.asarray(row, dtype=float), marker="o", markersize=4, color=color, label=item.name)
    label_snapshot_axis(ax, labels)
    ax.set(xlabel="snapshot", ylabel=ylabel, title=title)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None or value != value else f"{value:.{digits}f}"


def inputs_section(comparison: Comparison) -> str:
    header = ["input", "kind", "method", "dict_size", "live latents", *CLASSES, "tokens", "wall seconds", "folder"]
    rows = []
    for item in comparison.inputs:
        counts = item.evolution.class_counts()
        rows.append([item.name, item.kind, item.method, item.meta.dict_size, item.live,
                     *[counts[name] for name in CLASSES], "" if item.tokens is None else f"{item.tokens:,}",
                     _fmt(item.wall_seconds, 1), str(item.path)])
    return "<h2>Inputs</h2>" + html_table(header, rows, left=3)


def agreement_section(comparison: Comparison) -> str:
    if not comparison.agreements:
        return ("<h2>Agreement</h2><p class='muted'>No (crosscoder, aligned stack) pair among the inputs: agreement "
                "compares each aligned stack with each crosscoder.</p>")
    rule = ("<p class='muted'>Similarity of crosscoder latent i and stack latent j: the mean, over the snapshots "
            "where both are present (n &ge; the emergence threshold), of the cosine of their decoder vectors there "
            "(0 if never both present). A linear assignment maximises the total similarity; a pair is matched at "
            f"similarity &ge; {comparison.threshold}. Shares of emergence agreement are among matched pairs.</p>")
    rows = []
    for result in comparison.agreements:
        summary = result.summary()
        rows.append([result.crosscoder, result.stack, summary["crosscoder_live"], summary["matched"],
                     _fmt(summary["matched_share"]), _fmt(summary["mean_matched_similarity"]),
                     _fmt(summary["same_emergence_share"]), _fmt(summary["emergence_within_one_share"])])
    header = ["crosscoder", "stack", "crosscoder live", "matched", "matched share", "mean matched similarity",
              "same emergence", "emergence within 1 snapshot"]
    return "<h2>Agreement</h2>" + rule + html_table(header, rows, left=2)


def replay_section(comparison: Comparison, figures: dict[str, Path]) -> str:
    replay = comparison.replay
    if replay.reason is not None:
        return ("<h2>Explained variance and L0</h2><p class='muted'>Skipped: "
                f"{html.escape(replay.reason)}.</p>")
    first = comparison.inputs[0].evolution
    labels = snapshot_labels(first.names, first.steps)
    header = ["input", *[f"EV {label}" for label in labels], *[f"L0 {label}" for label in labels]]
    rows = [[item.name, *[_fmt(v) for v in ev], *[_fmt(v, 1) for v in l0]]
            for item, ev, l0 in zip(comparison.inputs, replay.explained_variance, replay.l0, strict=True)]
    note = (f"<p class='muted'>On the same {replay.n_tokens:,} replayed tokens for every input. EV = 1 - "
            "&Sigma;||x - x&#770;||&sup2; / &Sigma;||x - mean x||&sup2; per snapshot; L0 = non-zero codes per token "
            "(a crosscoder with one shared code has the same L0 in every snapshot).</p>")
    images = "".join(f"<h3>{html.escape(caption)}</h3>{image_tag(path, caption)}" for caption, path in figures.items())
    return "<h2>Explained variance and L0</h2>" + note + html_table(header, rows) + images


def render_compare(comparison: Comparison, figures: dict[str, Path]) -> str:
    """The whole page; `figures` maps a caption to a PNG (the emergence figure first, then replay figures)."""
    first = comparison.inputs[0]
    title = "Comparison: " + ", ".join(item.name for item in comparison.inputs)
    facts = html_table(["", "value"], [["snapshots", ", ".join(first.evolution.names)], ["hook", first.meta.hook],
                                   ["d_model", first.meta.d_model],
                                   ["emergence threshold", first.evolution.threshold]])
    captions = list(figures)
    emergence = captions[0]
    body = [f"<h1>{html.escape(title)}</h1>", facts, inputs_section(comparison),
            f"<h2>{html.escape(emergence)}</h2>{image_tag(figures[emergence], emergence)}",
            agreement_section(comparison), replay_section(comparison, {c: figures[c] for c in captions[1:]})]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_compare_report(comparison: Comparison, out_dir: str | Path) -> Path:
    """Write the PNGs, compare.json and report.html into `out_dir` (created; files there other than these are left
    alone, an earlier run's replay figures removed when this one has none); returns report.html's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"Emergence per snapshot": plot_emergence_comparison(comparison, out / EMERGENCE_FIGURE)}
    replay = comparison.replay
    if replay.reason is None:
        figures["Explained variance per snapshot"] = plot_per_snapshot(
            comparison, replay.explained_variance, "explained variance", "Explained variance per snapshot",
            out / EV_FIGURE)
        figures["L0 per snapshot"] = plot_per_snapshot(comparison, replay.l0, "L0 (non-zero codes per token)",
                                                       "L0 per snapshot", out / L0_FIGURE)
    else:  # an earlier run's replay figures would no longer match compare.json
        for name in (EV_FIGURE, L0_FIGURE):
            (out / name).unlink(missing_ok=True)
    write_text_atomic(out / COMPARE_JSON, json.dumps(jsonable(comparison.to_json()), indent=2))
    report = out / ANALYSIS_REPORT_FILE
    write_text_atomic(report, render_compare(comparison, figures))
    return report
