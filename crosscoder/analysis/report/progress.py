"""The progress measure's place in `crosscoder-analyze`'s report of an aligned stack: `progress@<snapshot>`
columns in features.csv, `progress_median` (and details) in summary.json, a section with a table and a plot."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crosscoder.analysis.diagnostics.progress import ProgressResult, stack_progress
from crosscoder.analysis.features.chains import Chains
from crosscoder.analysis.features.evolution import FeatureTable
from crosscoder.analysis.report.html import image_tag
from crosscoder.analysis.report.plots import plot_progress, snapshot_labels
from crosscoder.errors import ConfigError

PROGRESS_TITLE = "Feature formation: progress measure"
PROGRESS_FIGURE = "progress.png"


def progress_or_none(stack_dir: Path, n_tokens: int, device: str, log: Callable[[str], None]
                     ) -> ProgressResult | None:
    """The aligned stack's progress measure, or None (with one `skipping progress measure: <reason>` line) when
    its activations cannot be re-created (no run configuration, snapshots no longer where the run found them)."""
    try:
        return stack_progress(stack_dir, n_tokens, device, log)
    except ConfigError as error:
        log(f"skipping progress measure: {error}")
        return None


def add_progress_columns(table: FeatureTable, summary: dict[str, Any], result: ProgressResult, chains: Chains
                         ) -> None:
    """`progress@<snapshot>` per row (a chain: its slot's progress, for chains reaching the final snapshot, whose
    feature is the final latent's; empty for chains that end earlier or latents that never fire) and
    `progress_median` [S] plus the details (`progress`) in summary.json."""
    final = len(result.names) - 1
    table.columns.extend(f"progress@{name}" for name in result.names)
    values = ((result.progress.double() * 1e6).round() / 1e6).tolist()
    for row in table.rows:  # row[0]: the chain
        chain = row[0]
        cells = values[int(chains.slot[chain])] if int(chains.last[chain]) == final else [math.nan] * len(values[0])
        row.extend(None if math.isnan(value) else value for value in cells)
    summary["progress_median"] = result.median()
    summary["progress"] = result.summary()


def progress_section(result: ProgressResult, steps: list[int | None], out_dir: Path) -> str:
    """HTML: what was measured, the per-snapshot median and baseline, the plot (written under `out_dir`)."""
    figure = plot_progress(result.progress, result.names, steps, out_dir / PROGRESS_FIGURE)
    labels = snapshot_labels(result.names, steps)
    shown = ["" if value is None else f"{value:.3f}" for value in result.median()]
    baseline = ["" if math.isnan(value) else f"{value:.3f}" for value in result.baseline.tolist()]
    cells = "".join(f"<tr><td class='l'>{html.escape(label)}</td><td>{median}</td><td>{base}</td></tr>"
                    for label, median, base in zip(labels, shown, baseline, strict=True))
    return (f"<p class='muted'>SAE-Track's progress measure (Xu et al. 2024) over {result.n_tokens:,} replayed "
            f"tokens: for each latent of the final dictionary, its {result.top} top-activating tokens there are "
            f"encoded at each snapshot by that snapshot's dictionary; progress is the mean pairwise cosine of those "
            f"code vectors minus the same for {result.top} random tokens (the baseline). A formed feature's top "
            f"tokens share a code. Median over the {int(result.live.sum())} latents firing at the final snapshot. "
            "features.csv: <code>progress@</code> (for chains reaching the final snapshot).</p>"
            "<table><tr><th class='l'>snapshot</th><th>median progress</th><th>baseline cosine</th></tr>"
            f"{cells}</table>{image_tag(figure, 'progress measure')}")
