"""The self-contained HTML report: figures as base64 data URIs, inline CSS, no external assets."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import torch
from matplotlib import colormaps
from matplotlib.colors import to_hex

from crosscoder.analysis.features.evolution import CLASSES, DEAD, Evolution
from crosscoder.analysis.features.matching import Recovery
from crosscoder.analysis.report.plots import CLASS_COLORS, snapshot_labels
from crosscoder.dictionary.io import DictionaryMeta

LEADING_PER_CLASS = 10
"""Latents listed per class, largest peak decoder norm first."""

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
td.traj { width: 2.6em; font-size: 0.75em; text-align: center; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
div.scroll { overflow-x: auto; }
code { background: #f5f5f5; padding: 0 3px; } .muted { color: #777; font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def html_table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """An HTML table; the first `left` columns are left-aligned (labels), cells are escaped unless pre-rendered
    (tuples ("raw", html))."""
    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="l"' if i < left else ""
        if isinstance(value, tuple) and value[0] == "raw":
            return value[1]
        return f"<{tag}{cls}>{_e(value)}</{tag}>"
    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _trajectory_cells(values: list[float]) -> list[tuple[str, str]]:
    """One viridis-coloured cell per snapshot, so a row reads as a small heat strip."""
    cmap = colormaps["viridis"]
    cells = []
    for v in values:
        text_color = "#000" if v > 0.55 else "#fff"
        cells.append(("raw", f'<td class="traj" style="background:{to_hex(cmap(v))};color:{text_color}">{v:.2f}</td>'))
    return cells


def _fmt(value: float) -> str:
    return "" if value != value else f"{value:.3f}"  # NaN -> empty


def metadata_section(meta: DictionaryMeta, dictionary_dir: Path) -> str:
    facts = [["folder", str(dictionary_dir)], ["hook", meta.hook], ["d_model", meta.d_model],
             ["latents (F)", meta.dict_size], ["sources (S)", len(meta.sources)], ["source axis", meta.source_axis],
             ["activation", meta.activation],
             ["k", meta.k], ["train step", meta.train_step], ["tokens seen", f"{meta.tokens_seen:,}"]]
    sources = [[s.get("name"), s.get("path"), s.get("revision"), s.get("step"), s.get("hook") or meta.hook,
                _fmt(meta.decoder_norm_mean.get(s.get("name"), float("nan")))] for s in meta.sources]
    return ("<h2>Dictionary</h2>" + html_table(["", "value"], facts) +
            html_table(["source", "path", "revision", "step", "hook", "mean decoder norm"], sources, left=4))


def counts_section(evo: Evolution) -> str:
    counts = evo.class_counts()
    total = sum(counts.values())
    class_rows = [[name, counts[name], f"{100 * counts[name] / max(total, 1):.1f}%"] for name in CLASSES]
    labels = snapshot_labels(evo.names, evo.steps)
    by_class = evo.emergence_counts_by_class()
    emerging = evo.emergence_counts.tolist()
    live_present = (evo.trajectories >= evo.threshold) & ~evo.dead[:, None]
    present_count = live_present.sum(dim=0).tolist()
    to_last = evo.similarity[:, -1].tolist()
    drift_in = [float("nan"), *evo.median_drift()]
    rows = [[label, emerging[s], *[by_class[c][s] for c in by_class], present_count[s], _fmt(drift_in[s]),
             _fmt(to_last[s])] for s, label in enumerate(labels)]
    noun = evo.noun
    rule = (f"<p class='muted'>Trajectory n(s) = decoder norm at {noun} s / its maximum over {noun}s "
            f"(normalised-activation space). A latent emerges at the first {noun} with n &ge; {evo.threshold}; "
            f"its class comes from presence at the first and last {noun}s only. Drift = decoder cosine between "
            f"consecutive {noun}s over latents present at both. Similarity = norm-weighted mean decoder "
            "cosine.</p>")
    return ("<h2>Classes</h2>" + html_table(["class", "latents", "share"], class_rows) +
            f"<h2>Per {noun}</h2>" + rule +
            html_table([noun, "emerging here", *[f"of which {c}" for c in by_class], "present",
                    "median drift in", "similarity to last"], rows))


def leading_features(evo: Evolution, per_class: int = LEADING_PER_CLASS) -> dict[str, list[int]]:
    """Per live class with members (CLASSES order), its `per_class` latents of largest peak decoder norm, largest
    first: the latents the report lists, and that other analyses (e.g. top contexts) look at."""
    peak = evo.norms.amax(dim=1)
    leading = {}
    for index, name in enumerate(CLASSES):
        members = torch.nonzero(evo.classes == index).flatten()
        if name != DEAD and members.numel() > 0:
            leading[name] = members[peak[members].argsort(descending=True)][:per_class].tolist()
    return leading


def leading_section(evo: Evolution, per_class: int = LEADING_PER_CLASS, flags: dict[int, str] | None = None) -> str:
    """Per class, its leading latents with their trajectories; `flags` (latent -> snapshots it is flagged at, from
    latent scaling) adds a shrinkage-artefact column."""
    labels = snapshot_labels(evo.names, evo.steps)
    peak = evo.norms.amax(dim=1)
    parts = ["<h2>Leading features per class</h2><p class='muted'>Largest peak decoder norm first; cells are "
             "n(s)." + (" Shrinkage artefact: the snapshots where latent scaling finds the direction present "
                        "though the decoder norm says absent." if flags is not None else "") + "</p>"]
    flag_header = ["shrinkage artefact at"] if flags is not None else []
    for name, members in leading_features(evo, per_class).items():
        index = CLASSES.index(name)
        rows = [[i, evo.names[int(evo.emergence[i])], _fmt(float(peak[i])), _fmt(float(evo.lifetime_cos[i])),
                 *([flags.get(i, "")] if flags is not None else []), *_trajectory_cells(evo.trajectories[i].tolist())]
                for i in members]
        color = CLASS_COLORS[name]
        parts.append(f'<h3 style="color:{color}">{_e(name)} ({int((evo.classes == index).sum())})</h3>')
        parts.append(html_table(["latent", "emerges at", "peak norm", "lifetime cos", *flag_header, *labels], rows,
                            left=2))
    return "".join(parts)


def recovery_section(result: Recovery, figure: Path | None) -> str:
    summary = result.summary()
    mean_cos = summary["mean_matched_cosine"]
    rows = [["planted features", summary["n_true"]],
            [f"recovered (cosine >= {result.threshold})", f"{summary['fraction_recovered']:.3f}"],
            ["emergence snapshot exact", f"{summary['emergence_accuracy']:.3f}"],
            ["mean matched cosine", "" if mean_cos is None else _fmt(mean_cos)]]
    by_snapshot = []
    for s in sorted(set(result.true_emergence.tolist())):
        planted = result.true_emergence == s
        by_snapshot.append([s, int(planted.sum()), int((result.recovered & planted).sum()),
                            int((result.emergence_correct & planted).sum())])
    return ("<h2>Planted ground truth</h2>" + html_table(["", "value"], rows) +
            html_table(["planted emergence", "planted", "recovered", "emergence exact"], by_snapshot) +
            (image_tag(figure, "recovery") if figure is not None else ""))


def render_report(
    evo: Evolution,
    meta: DictionaryMeta,
    dictionary_dir: Path,
    figures: dict[str, Path],
    *,
    recovery: Recovery | None = None,
    recovery_figure: Path | None = None,
    extra_sections: list[tuple[str, str]] | None = None,
    latent_flags: dict[int, str] | None = None,
) -> str:
    """The whole page. `figures` maps a caption to a PNG; `extra_sections` are (title, trusted html) pairs;
    `latent_flags` (latent -> text) adds a shrinkage-artefact column to the per-latent tables."""
    title = f"Feature evolution: {dictionary_dir.name}"
    body = [f"<h1>{_e(title)}</h1>", metadata_section(meta, dictionary_dir), counts_section(evo)]
    body += [f"<h2>{_e(caption)}</h2>{image_tag(path, caption)}" for caption, path in figures.items()]
    body.append(leading_section(evo, flags=latent_flags))
    if recovery is not None:
        body.append(recovery_section(recovery, recovery_figure))
    # ---- extension hook: extra sections (e.g. top-activating contexts) supplied by other modules ----
    for section_title, section_html in extra_sections or []:
        body.append(f"<h2>{_e(section_title)}</h2>{section_html}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body>{''.join(body)}</body></html>\n")
