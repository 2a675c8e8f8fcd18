"""The report's spliced-in LM loss: a per-snapshot table and a CE-recovered plot from the dictionary's eval.json.

eval.json is written by `crosscoder-eval` or by the trainer at each export (crosscoder.evaluation.spliced); this module
only reads it, so the analysis needs no snapshot to be loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from crosscoder.analysis.report.html import html_table, image_tag
from crosscoder.analysis.report.plots import figure_width, label_snapshot_axis, save_figure, snapshot_labels
from crosscoder.constants import EVAL_FILE

SPLICED_TITLE = "Spliced-in LM loss"
SPLICED_FIGURE = "ce_recovered.png"
COLUMNS = (("ce_clean", "CE clean"), ("ce_spliced", "CE spliced"), ("ce_zero", "CE zero-ablated"),
           ("ce_mean", "CE mean-ablated"), ("ce_recovered", "CE recovered (vs zero)"),
           ("ce_recovered_mean", "CE recovered (vs mean)"), ("kl", "KL(clean ‖ spliced)"))


def read_eval(dictionary_dir: str | Path) -> dict[str, Any] | None:
    """The eval.json of a dictionary folder, or None when it has none or an unusable one (the report then just
    leaves the section out)."""
    path = Path(dictionary_dir) / EVAL_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("per_snapshot"), dict) or not raw.get("snapshots"):
        return None
    return raw


def _value(results: dict[str, Any], name: str, key: str) -> float:
    value = results["per_snapshot"].get(name, {}).get(key)
    return math.nan if value is None else float(value)


def plot_ce_recovered(results: dict[str, Any], path: str | Path) -> Path:
    """Fraction of CE recovered per snapshot, against zero and against mean ablation (1 = as good as clean)."""
    names = results["snapshots"]
    labels = snapshot_labels(names, results.get("steps") or [None] * len(names))
    fig = Figure(figsize=(figure_width(len(labels)), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    for key, label, color in (("ce_recovered", "vs zero ablation", "#4c72b0"),
                              ("ce_recovered_mean", "vs mean ablation", "#dd8452")):
        ax.plot(x, [_value(results, name, key) for name in names], marker="o", color=color, label=label)
    ax.axhline(1.0, color="#8c8c8c", linewidth=0.8, linestyle="--")
    label_snapshot_axis(ax, labels)
    ax.set(xlabel="snapshot", ylabel="fraction of CE recovered", title="Spliced-in LM loss recovered per snapshot")
    ax.legend(frameon=False)
    return save_figure(fig, path)


def spliced_section(results: dict[str, Any], figure: Path | None) -> str:
    """HTML: what the figures mean, one row per snapshot, and the plot."""
    names = results["snapshots"]
    labels = snapshot_labels(names, results.get("steps") or [None] * len(names))
    rows = [[label, *("" if math.isnan(v := _value(results, name, key)) else f"{v:.4f}" for key, _ in COLUMNS)]
            for name, label in zip(names, labels, strict=True)]
    caveat = "" if results.get("held_out", True) else " <b>Not fully held out: the stream reached trained text.</b>"
    note = (f"<p class='muted'>Over {results.get('n_positions', 0):,} positions of held-out text "
            f"({_escape(results.get('tokens_from', ''))}).{caveat} Each snapshot runs with its hooked activation "
            "replaced by the crosscoder's reconstruction (spliced), by zero, or by its mean over these tokens; CE in "
            "nats. CE recovered = (CE ablated &minus; CE spliced) / (CE ablated &minus; CE clean): 1 is as good as "
            "the real activation, 0 no better than ablating it. BOS and padding positions stay clean and are not "
            "scored.</p>")
    return note + html_table(["snapshot", *(title for _, title in COLUMNS)], rows) + \
        (image_tag(figure, "CE recovered") if figure is not None else "")


def _escape(text: str) -> str:
    import html

    return html.escape(str(text))
