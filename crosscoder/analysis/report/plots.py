"""PNG figures of feature evolution. Each function writes one PNG atomically and returns its path.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never pyplot: no global backend switch,
no figure registry to leak, safe inside a training process.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from crosscoder.analysis.features.evolution import CLASSES, DEAD, Evolution
from crosscoder.storage import temporary_sibling

MAX_HEATMAP_ROWS = 400
"""Trajectory heatmap rows; larger dictionaries are sampled evenly from the sorted order."""
MAX_TICK_LABELS = 24
CLASS_COLORS = {"persistent": "#4c72b0", "emerging": "#55a868", "vanishing": "#c44e52", "transient": "#dd8452",
                "dead": "#8c8c8c"}
DPI = 110


def snapshot_labels(names: list[str], steps: list[int | None]) -> list[str]:
    """Snapshot names, with the step appended when the name does not already show it."""
    pairs = zip(names, steps, strict=True)
    return [name if step is None or str(step) in name else f"{name} ({step})" for name, step in pairs]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render to a hidden sibling, then rename: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, "tmp")
    FigureCanvasAgg(fig)
    try:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def figure_width(n_snapshots: int) -> float:
    """Figure width in inches: grows with the snapshot count, capped so a 150-checkpoint run stays viewable."""
    return min(16.0, max(6.0, 0.35 * n_snapshots + 3))


def _ticks(positions: int) -> np.ndarray:
    """At most MAX_TICK_LABELS evenly spaced tick positions."""
    return np.unique(np.linspace(0, positions - 1, min(positions, MAX_TICK_LABELS)).round().astype(int))


def label_snapshot_axis(ax: object, labels: list[str], axis: str = "x") -> None:
    ticks = _ticks(len(labels))
    if axis == "x":
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=45 if len(labels) > 4 else 0, ha="right"
                      if len(labels) > 4 else "center")
    else:
        ax.set_yticks(ticks, [labels[t] for t in ticks])


def heatmap_order(evo: Evolution, max_rows: int = MAX_HEATMAP_ROWS) -> torch.Tensor:
    """Live latents sorted by emergence snapshot, then class, then peak norm (descending); evenly sampled to at
    most `max_rows`."""
    live = torch.nonzero(~evo.dead).flatten()
    if live.numel() == 0:
        return live
    peak = evo.norms[live].amax(dim=1)
    key = np.lexsort((-peak.numpy(), evo.classes[live].numpy(), evo.emergence[live].numpy()))
    ordered = live[torch.from_numpy(key)]
    if ordered.numel() > max_rows:
        ordered = ordered[torch.from_numpy(np.linspace(0, ordered.numel() - 1, max_rows).round().astype(np.int64))]
    return ordered


def plot_trajectory_heatmap(evo: Evolution, path: str | Path, max_rows: int = MAX_HEATMAP_ROWS) -> Path:
    """Normalised decoder-norm trajectories, one row per live latent, ordered by emergence then class."""
    order = heatmap_order(evo, max_rows)
    labels = snapshot_labels(evo.names, evo.steps)
    fig = Figure(figsize=(figure_width(len(labels)), 7.0))
    ax = fig.add_subplot()
    if order.numel() == 0:
        ax.text(0.5, 0.5, "no live latents", ha="center", va="center", transform=ax.transAxes)
    else:
        image = ax.imshow(evo.trajectories[order].numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                          vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, label="decoder norm / its max over snapshots")
        emergence = evo.emergence[order].numpy()
        for boundary in np.nonzero(np.diff(emergence))[0]:  # separate emergence groups
            ax.axhline(boundary + 0.5, color="white", linewidth=0.6, alpha=0.8)
    label_snapshot_axis(ax, labels)
    n_live = int((~evo.dead).sum())
    shown = f"{order.numel()} of {n_live}" if order.numel() < n_live else f"{n_live}"
    ax.set(xlabel=evo.noun, ylabel=f"live latents ({shown}), by emergence {evo.noun} then class",
           title="Feature trajectories")
    ax.set_yticks([])
    return save_figure(fig, path)


def plot_emergence_histogram(evo: Evolution, path: str | Path) -> Path:
    """Latents emerging at each snapshot, one bar per snapshot (in snapshot order), stacked by class."""
    labels = snapshot_labels(evo.names, evo.steps)
    fig = Figure(figsize=(figure_width(len(labels)), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for name, counts in evo.emergence_counts_by_class().items():
        counts_np = np.asarray(counts, dtype=float)
        if counts_np.any():
            ax.bar(x, counts_np, bottom=bottom, color=CLASS_COLORS[name], label=name)
            bottom += counts_np
    label_snapshot_axis(ax, labels)
    known = [s for s in evo.steps if s is not None]
    xlabel = "snapshot (training step)" if known and evo.axis == "step" else evo.noun
    ax.set(xlabel=xlabel, ylabel="latents emerging", title=f"Emergence (first {evo.noun} with n >= {evo.threshold})")
    if bottom.any():
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def plot_drift(evo: Evolution, path: str | Path) -> Path:
    """Per class, median and quartiles of the consecutive-snapshot decoder cosine at each transition, over
    latents present (n >= threshold) at both ends of the transition."""
    labels = snapshot_labels(evo.names, evo.steps)
    fig = Figure(figsize=(figure_width(len(labels)), 4.5))
    ax = fig.add_subplot()
    if len(labels) < 2:
        ax.text(0.5, 0.5, f"one {evo.noun}: no drift", ha="center", va="center", transform=ax.transAxes)
        return save_figure(fig, path)
    present = evo.trajectories >= evo.threshold
    both = (present[:, :-1] & present[:, 1:]).numpy()
    cos = evo.consecutive_cos.numpy()
    x = np.arange(len(labels) - 1)
    for index, name in enumerate(CLASSES):
        if name == DEAD:
            continue
        rows = (evo.classes == index).numpy()
        values = np.where(both[rows], cos[rows], np.nan)
        has = ~np.isnan(values).all(axis=0) if values.size else np.zeros(len(x), dtype=bool)
        if not has.any():
            continue
        q1, median, q3 = (np.nanquantile(values[:, has], q, axis=0) for q in (0.25, 0.5, 0.75))
        ax.plot(x[has], median, marker="o", markersize=3, color=CLASS_COLORS[name], label=name)
        ax.fill_between(x[has], q1, q3, color=CLASS_COLORS[name], alpha=0.2)
    transitions = [f"{labels[s]} → {labels[s + 1]}" for s in range(len(labels) - 1)]
    label_snapshot_axis(ax, transitions)
    ax.set(xlabel=f"{evo.noun} transition", ylabel="decoder cosine (median, quartiles)",
           title=f"Decoder drift between consecutive {evo.noun}s (latents present at both)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def plot_similarity(evo: Evolution, path: str | Path) -> Path:
    """The S x S snapshot similarity matrix (norm-weighted mean decoder cosine)."""
    labels = snapshot_labels(evo.names, evo.steps)
    size = min(13.0, max(4.5, 0.35 * len(labels) + 3))
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    sim = evo.similarity.numpy()
    # Colour range from the smallest value (rounded down to 0.05, at most 0.9): similar snapshots stay distinct.
    low = float(np.nanmin(sim)) if np.isfinite(sim).any() else 0.0
    image = ax.imshow(sim, cmap="magma", vmin=min(0.9, np.floor(low * 20) / 20), vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="norm-weighted mean decoder cosine")
    if len(labels) <= 12:
        for (s, t), value in np.ndenumerate(sim):
            ax.text(t, s, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > (min(0.9, low) + 1) / 2 else "white")
    label_snapshot_axis(ax, labels, "x")
    label_snapshot_axis(ax, labels, "y")
    ax.set(title="Snapshot similarity")
    return save_figure(fig, path)


def plot_recovery(cosines: torch.Tensor, threshold: float, path: str | Path) -> Path:
    """Histogram of matched planted-to-learned decoder cosines, with the recovery threshold."""
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    ax.hist(cosines.numpy(), bins=np.linspace(min(-0.1, float(cosines.min()) if cosines.numel() else 0), 1.0, 41),
            color="#4c72b0")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"recovered at >= {threshold}")
    ax.set(xlabel="decoder cosine of the matched pair", ylabel="planted features", title="Planted feature recovery")
    ax.legend(frameon=False)
    return save_figure(fig, path)


def plot_firing_frequency(frequency: torch.Tensor, dense_frequency: float, path: str | Path,
                          names: list[str] | None = None) -> Path:
    """Histogram of log10 firing frequency over the latents that fired, the dense line marked, the never-fired
    count in the title (the feature-density plot of the SAE literature); a per-snapshot frequency [S, F] draws one
    outline per snapshot (`names`), coloured early to late."""
    rows = frequency[None] if frequency.dim() == 1 else frequency
    fired_all = frequency[frequency > 0].double().log10().numpy()
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if fired_all.size:
        bins = np.histogram_bin_edges(fired_all, bins=min(60, max(10, fired_all.size // 20)))
        colors = colormaps["viridis"](np.linspace(0, 1, len(rows)))
        for index, row in enumerate(rows):
            fired = row[row > 0].double().log10().numpy()
            if len(rows) == 1:
                ax.hist(fired, bins=bins, color="#4c72b0")
            else:
                ax.hist(fired, bins=bins, histtype="step", color=colors[index], label=names[index] if names else None)
    ax.axvline(np.log10(dense_frequency), color="#c44e52", linestyle="--", label=f"dense (> {dense_frequency:g})")
    never = int((rows.amax(dim=0) == 0).sum())
    ax.set(xlabel="log10 share of tokens the latent fires on", ylabel="latents",
           title=f"Feature density ({never} of {rows.shape[1]} latents never seen firing)")
    ax.legend(frameon=False, fontsize="small")
    return save_figure(fig, path)


MAX_SCATTER_POINTS = 20000
"""(latent, snapshot) points drawn in the latent-scaling scatter beyond the flagged ones (sampled evenly)."""
NU_AXIS = (-0.25, 1.5)
"""The scatter's nu range; values outside are drawn at its edge."""


def plot_latent_scaling(norm_ratio: torch.Tensor, nu: torch.Tensor, flagged: torch.Tensor, reference: torch.Tensor,
                        thresholds: tuple[float, float, float], path: str | Path) -> Path:
    """Scatter of decoder-norm ratio n(s) against nu(s) (error target) per live (latent, snapshot) other than the
    latent's reference snapshot; shrinkage artefacts (left of the emergence threshold, above the nu bar) in red.
    `norm_ratio`, `nu`, `flagged` [F, S] (NaN nu for dead or unmeasured cells); `thresholds` (tau, nu bar, margin
    of nu over the ratio)."""
    keep = ~nu.isnan()
    keep[torch.arange(nu.shape[0]), reference] = False
    ratio, values, bad = norm_ratio[keep].numpy(), nu[keep].clamp(*NU_AXIS).numpy(), flagged[keep].numpy()
    plain = np.nonzero(~bad)[0]
    if plain.size > MAX_SCATTER_POINTS:
        plain = plain[np.linspace(0, plain.size - 1, MAX_SCATTER_POINTS).round().astype(int)]
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    ax.scatter(ratio[plain], values[plain], s=6, alpha=0.4, color="#4c72b0", linewidths=0, label="latent, snapshot")
    ax.scatter(ratio[bad], values[bad], s=14, color="#c44e52", linewidths=0,
               label=f"shrinkage artefact ({int(bad.sum())} latent-snapshot cells)")
    tau, bar, margin = thresholds
    ax.axvline(tau, color="#777", linestyle="--", linewidth=0.8)
    ax.axhline(bar, color="#777", linestyle="--", linewidth=0.8)
    ax.plot([0, 1], [margin, 1 + margin], color="#777", linestyle=":", linewidth=0.8, label="nu = ratio + margin")
    ax.set(xlim=(-0.02, 1.02), ylim=NU_AXIS, xlabel="decoder norm / its max over snapshots",
           ylabel="nu: beta / beta at the peak snapshot (error target)",
           title="Latent scaling: decoder norm against the fitted scale")
    if keep.any():
        ax.legend(frameon=False, loc="upper left", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no measured latents", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, path)


def plot_progress(progress: torch.Tensor, names: list[str], steps: list[int | None], path: str | Path) -> Path:
    """SAE-Track's progress measure per snapshot (analysis.diagnostics.progress): median and quartiles over the
    latents live at the final snapshot (rows of `progress` [F, S] that are not NaN there)."""
    labels = snapshot_labels(names, steps)
    fig = Figure(figsize=(figure_width(len(labels)), 4.5))
    ax = fig.add_subplot()
    live = progress[~progress[:, -1].isnan()].double().numpy()
    x = np.arange(len(labels))
    if live.shape[0]:
        q1, median, q3 = (np.nanquantile(live, q, axis=0) for q in (0.25, 0.5, 0.75))
        ax.plot(x, median, marker="o", markersize=3, color="#4c72b0", label=f"median ({live.shape[0]} latents)")
        ax.fill_between(x, q1, q3, color="#4c72b0", alpha=0.2, label="quartiles")
        ax.legend(frameon=False, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no latent fires at the final snapshot", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0.0, color="#777", linestyle="--", linewidth=0.8)
    label_snapshot_axis(ax, labels)
    ax.set(xlabel="snapshot", ylabel="progress (top-token code cosine - random)",
           title="Feature formation: progress of the final latents")
    return save_figure(fig, path)
