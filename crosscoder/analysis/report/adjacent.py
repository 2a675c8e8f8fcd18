"""The adjacent-source statistics (analysis.diagnostics.adjacent) of an exported crosscoder or stack on activations
re-created from its run configuration, and their place in `crosscoder-analyze`'s report: `adjacent.csv` (one row per
source and latent: its best match in the next source and back in the previous one), `adjacent` in summary.json,
and a section with a table and `adjacent.png` (per transition, the pass-through / disappear shares of s's live
latents and the appear share of s+1's, at each threshold)."""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from crosscoder.analysis.diagnostics.adjacent import (
    DEFAULT_MAX_DENSE,
    DEFAULT_TOP_K,
    AdjacentStatistics,
    adjacent_statistics,
    crosscoder_codes,
    stack_codes,
)
from crosscoder.analysis.inputs.compare_replay import load_replay_source, replay_meta
from crosscoder.analysis.inputs.replay import activation_batches, has_activations
from crosscoder.analysis.report.html import image_tag
from crosscoder.analysis.report.plots import save_figure, snapshot_labels
from crosscoder.analysis.report.stack import stack_meta
from crosscoder.dictionary.io import load_dictionary, read_meta
from crosscoder.dictionary.stack import is_stack, read_stack
from crosscoder.errors import ConfigError

ADJACENT_TITLE = "Adjacent sources: features passing through, appearing, disappearing"
ADJACENT_FIGURE = "adjacent.png"
ADJACENT_FILE = "adjacent.csv"
ADJACENT_COLUMNS = ["source", "latent", "live", "best_next", "next_corr", "best_prev", "prev_corr"]
DEFAULT_ADJACENT_TOKENS = 20000
"""Tokens `crosscoder-analyze` replays for the adjacent statistics unless `--adjacent-tokens` says otherwise."""
CHUNK_ELEMENTS = 1 << 24
"""Bound on rows x S x F of one encode call."""
CODES_NOTE = {
    "stack": "each source's own dictionary's codes on that source's activations",
    "per_snapshot": "the crosscoder's per-snapshot codes",
    "shared": "the per-source contribution code<sub>i</sub> &middot; &Vert;W<sub>dec</sub>[i, s]&Vert; of the "
              "crosscoder's one shared code: degenerate but honest, a latent is its own match (correlation 1) "
              "wherever its decoder norm is non-zero at both sources",
}


def dictionary_adjacent(path: str | Path, n_tokens: int = DEFAULT_ADJACENT_TOKENS, device: str | torch.device = "cpu",
                        log: Callable[[str], None] = print, *, max_dense: int = DEFAULT_MAX_DENSE,
                        top_k: int = DEFAULT_TOP_K) -> AdjacentStatistics:
    """The statistics of the exported crosscoder or stack (aligned or not: matching needs no alignment) at `path`
    over `n_tokens` tokens re-created from its run configuration; ConfigError when they cannot be (or when it has
    fewer than 2 sources)."""
    path = Path(path)
    if is_stack(path):
        manifest, metas = read_stack(path)
        meta = replay_meta(path, stack_meta(manifest, metas), stack=True)
        models, kind = [], "stack"
    else:
        model, meta = load_dictionary(path, device)
        models, kind = [model], "per_snapshot" if model.codes_per_snapshot else "shared"
    if len(meta.sources) < 2:
        raise ConfigError(f"{path} has {len(meta.sources)} source: no adjacent pairs")
    reason = has_activations(meta)
    if reason is not None:
        raise ConfigError(reason)
    models = models or load_replay_source(path, True, device).models
    codes_of = stack_codes(models) if kind == "stack" else crosscoder_codes(models[0])
    rows = max(1, CHUNK_ELEMENTS // sum(model.n_sources * model.dict_size for model in models))
    log(f"adjacent statistics: {len(meta.sources) - 1} transitions of {meta.dict_size} latents over {n_tokens:,} "
        f"tokens ({kind} codes)")

    def batches() -> Iterable[list[torch.Tensor]]:
        for batch in activation_batches(meta, n_tokens, device, log):
            for piece in batch.to(device=device, dtype=torch.float32).split(rows):
                yield codes_of(piece)

    result = adjacent_statistics(batches(), meta.source_names, max_dense=max_dense, top_k=top_k, codes=kind)
    shares = [t.shares(0.5)["pass_through"] for t in result.transitions]
    log("adjacent statistics: pass-through at 0.5 " + ", ".join("-" if v is None else f"{v:.1%}" for v in shares))
    return result


def adjacent_or_none(dictionary: Path, n_tokens: int, device: str, log: Callable[[str], None]
                     ) -> AdjacentStatistics | None:
    """The statistics, or None (with one `skipping adjacent statistics: <reason>` line) when the activations cannot
    be re-created (no run configuration, snapshots no longer where the run found them, a single source), or the
    dictionary is a crosscoder with one shared code (a latent is then its own match wherever its decoder norm is
    non-zero: the decoder norms already say it, and a replay would only cost time; `dictionary_adjacent` still
    computes it when asked)."""
    try:
        if not is_stack(dictionary) and read_meta(dictionary).activation != "snapshot_jumprelu":
            log("skipping adjacent statistics: this crosscoder's latents share one code across sources, so each is "
                "its own match wherever its decoder norm is non-zero; they are computed for stacks and per-snapshot "
                "gates (crosscoder=snapshot_jumprelu)")
            return None
        return dictionary_adjacent(dictionary, n_tokens, device, log)
    except ConfigError as error:
        log(f"skipping adjacent statistics: {error}")
        return None


def adjacent_csv(result: AdjacentStatistics) -> str:
    """One row per (source, latent): live, its best match in the next source and back in the previous one, with
    their correlations (empty where there is none: the last / first source, a dead latent, no co-active partner)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ADJACENT_COLUMNS)
    transitions = result.transitions

    def cells(match: torch.Tensor, corr: torch.Tensor, i: int) -> list[Any]:
        value = float(corr[i])
        return ["", ""] if int(match[i]) < 0 or math.isnan(value) else [int(match[i]), round(value, 6)]

    for s, name in enumerate(result.names):
        live = transitions[s].live_source if s < len(transitions) else transitions[-1].live_target
        for i in range(len(live)):
            forward = cells(transitions[s].forward_match, transitions[s].forward_corr, i) \
                if s < len(transitions) else ["", ""]
            backward = cells(transitions[s - 1].backward_match, transitions[s - 1].backward_corr, i) if s else ["", ""]
            writer.writerow([name, i, bool(live[i]), *forward, *backward])
    return buffer.getvalue()


def plot_adjacent(result: AdjacentStatistics, steps: list[int | None], path: Path) -> Path:
    """Per threshold a panel; per transition two bars: s's live latents split into pass-through and disappear,
    s+1's into matched back and appear."""
    labels = snapshot_labels(result.names, steps)
    ticks = [f"{a} -> {b}" for a, b in zip(labels[:-1], labels[1:], strict=True)]
    x = np.arange(len(ticks))
    fig = Figure(figsize=(min(16.0, max(6.0, 0.7 * len(ticks) + 3)), 3.2 * len(result.thresholds)))
    for row, tau in enumerate(result.thresholds):
        ax = fig.add_subplot(len(result.thresholds), 1, row + 1)
        shares = [t.shares(tau) for t in result.transitions]
        through = np.array([s["pass_through"] or 0.0 for s in shares])
        appear = np.array([s["appear"] or 0.0 for s in shares])
        ax.bar(x - 0.2, through, 0.38, color="#4c72b0", label="pass through (of s)")
        ax.bar(x - 0.2, 1 - through, 0.38, bottom=through, color="#c44e52", label="disappear (of s)")
        ax.bar(x + 0.2, 1 - appear, 0.38, color="#a6bddb", label="matched back (of s+1)")
        ax.bar(x + 0.2, appear, 0.38, bottom=1 - appear, color="#55a868", label="appear (of s+1)")
        ax.set(ylim=(0, 1), ylabel="share of live latents", title=f"best-match correlation threshold {tau}")
        ax.set_xticks(x, ticks if row == len(result.thresholds) - 1 else [""] * len(ticks), rotation=30, ha="right")
        if row == 0:
            ax.legend(frameon=False, fontsize="small", ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.12))
    return save_figure(fig, path)


def adjacent_section(result: AdjacentStatistics, steps: list[int | None], figure: Path) -> str:
    """HTML: what was measured, a table per transition and threshold, the plot."""
    labels = snapshot_labels(result.names, steps)
    head = "".join(f"<th>pass &ge; {tau}</th><th>disappear</th><th>appear</th>" for tau in result.thresholds)

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.1f}%"

    rows = []
    for s, t in enumerate(result.transitions):
        cells = "".join(f"<td>{pct(v['pass_through'])}</td><td>{pct(v['disappear'])}</td><td>{pct(v['appear'])}</td>"
                        for v in (t.shares(tau) for tau in result.thresholds))
        rows.append(f"<tr><td class='l'>{html.escape(labels[s])} &rarr; {html.escape(labels[s + 1])}</td>"
                    f"<td>{int(t.live_source.sum())} / {int((~t.live_source).sum())}</td>"
                    f"<td>{int(t.live_target.sum())} / {int((~t.live_target).sum())}</td>{cells}"
                    f"<td>{'dense' if t.exact else f'top-{result.top_k}'}</td></tr>")
    return (f"<p class='muted'>Balcells et al.'s adjacent-layer statistic over {result.n_tokens:,} replayed tokens, "
            f"on {CODES_NOTE[result.codes]}. For consecutive sources s, s+1, the Pearson correlation of every latent "
            "of s with every latent of s+1 over the tokens; a latent of s <i>passes through</i> when its best "
            "correlation forward reaches the threshold and <i>disappears</i> otherwise (shares of s's live latents); "
            "a latent of s+1 <i>appears</i> when its best correlation back stays below it (share of s+1's live "
            "latents). Latents never active (or constant) over the tokens are dead: excluded, counted as live / dead. "
            f"Pairs wider than {result.max_dense:,} entries keep each latent's {result.top_k} co-active partners of "
            "largest cross-product mass (top-k): a never co-active pair correlates &le; 0 and cannot pass a positive "
            f"threshold. {ADJACENT_FILE}: per source and latent, <code>best_next</code>, <code>next_corr</code>, "
            "<code>best_prev</code>, <code>prev_corr</code>.</p>"
            "<table><tr><th class='l'>transition</th><th>s live / dead</th><th>s+1 live / dead</th>"
            f"{head}<th>pairs</th></tr>{''.join(rows)}</table>{image_tag(figure, 'adjacent statistics')}")


def add_adjacent(summary: dict[str, Any], result: AdjacentStatistics, steps: list[int | None], out_dir: Path
                 ) -> tuple[str, str]:
    """`adjacent` in summary.json, adjacent.csv and adjacent.png under `out_dir`; returns the report section."""
    summary["adjacent"] = result.summary()
    (out_dir / ADJACENT_FILE).write_text(adjacent_csv(result))
    return ADJACENT_TITLE, adjacent_section(result, steps, plot_adjacent(result, steps, out_dir / ADJACENT_FIGURE))
