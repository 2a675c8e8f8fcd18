"""Analyse an exported dictionary folder: metrics, figures, features.csv, summary.json and report.html.

Norms and trajectories come from decoder_norms.safetensors (normalised-activation space, comparable across
snapshots); cosines come from the W_dec directions in weights.safetensors, whose folded-in per-snapshot input
scale changes norms but not directions. The output folder is built under a hidden temporary name and renamed
into place, so a folder with the final name always holds a complete report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crosscoder.analysis.diagnostics.adjacent import AdjacentStatistics
from crosscoder.analysis.diagnostics.progress import ProgressResult
from crosscoder.analysis.diagnostics.scaling import LatentScaling
from crosscoder.analysis.features.evolution import Evolution, FeatureTable, analyze_evolution, feature_table
from crosscoder.analysis.features.matching import Recovery
from crosscoder.analysis.features.planted import planted_recovery
from crosscoder.analysis.report.adjacent import add_adjacent
from crosscoder.analysis.report.by_hook import (
    MIXED_AXES,
    HookView,
    MixedAxesError,
    hook_views,
    mixed_axes_message,
    render_hook_index,
)
from crosscoder.analysis.report.html import render_report
from crosscoder.analysis.report.plots import (
    MAX_HEATMAP_ROWS,
    plot_drift,
    plot_emergence_histogram,
    plot_firing_frequency,
    plot_recovery,
    plot_similarity,
    plot_trajectory_heatmap,
)
from crosscoder.analysis.report.progress import PROGRESS_TITLE, add_progress_columns, progress_section
from crosscoder.analysis.report.scaling import (
    SCALING_FIGURE,
    SCALING_TITLE,
    plot_scaling,
    scaling_flags,
    scaling_section,
)
from crosscoder.analysis.report.spliced_loss import (
    SPLICED_FIGURE,
    SPLICED_TITLE,
    plot_ce_recovered,
    read_eval,
    spliced_section,
)
from crosscoder.analysis.report.stack import (
    add_stack_details,
    load_stack_chains,
    load_stack_evolution,
    stack_evolution,
    stack_firing_frequency,
)
from crosscoder.constants import (
    ANALYSIS_DIR,
    ANALYSIS_FEATURES_FILE,
    ANALYSIS_REPORT_FILE,
    ANALYSIS_SUMMARY_FILE,
    CONFIG_FILE,
    DECODER_NORMS_FILE,
    WEIGHTS_FILE,
)
from crosscoder.dictionary.io import DictionaryMeta, load_decoder_norms, load_firing_frequency, read_meta, read_tensors
from crosscoder.dictionary.stack import is_stack
from crosscoder.storage import building_dir
from crosscoder.training.metrics import DENSE_FREQUENCY, density_metrics, latent_frequency

FIGURES = {
    "trajectories.png": "Feature trajectories",
    "emergence.png": "Emergence per snapshot",
    "drift.png": "Decoder drift",
    "similarity.png": "Snapshot similarity",
}
RECOVERY_FIGURE = "recovery.png"
DENSITY_FIGURE = "Feature density"


class NotADictionaryError(FileNotFoundError):
    """The folder is not an exported dictionary (missing files)."""


@dataclass
class AnalysisResult:
    out_dir: Path
    report: Path
    evolution: Evolution
    table: FeatureTable
    summary: dict[str, Any]
    meta: DictionaryMeta
    files: list[Path] = field(default_factory=list)
    recovery: Recovery | None = None
    by_hook: dict[str, AnalysisResult] = field(default_factory=dict)
    """A snapshots x hooks crosscoder's analysis of each hook (crosscoder.analysis.report.by_hook); {} otherwise."""


def check_dictionary_dir(path: str | Path) -> Path:
    """`path` if it holds an exported dictionary, else NotADictionaryError naming it and what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise NotADictionaryError(f"{path} is not an exported dictionary: no such folder")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, DECODER_NORMS_FILE) if not (path / name).is_file()]
    if missing:
        raise NotADictionaryError(f"{path} is not an exported dictionary: missing {', '.join(missing)}")
    return path


def load_evolution(dictionary_dir: str | Path, dead_mask: torch.Tensor | None = None
                   ) -> tuple[Evolution, DictionaryMeta]:
    """Evolution metrics of an exported dictionary (see the module docstring for which file gives what), or of an
    aligned stack of single-snapshot dictionaries (crosscoder.analysis.report.stack), read as one crosscoder."""
    if is_stack(dictionary_dir):
        return load_stack_evolution(dictionary_dir, dead_mask)
    path = check_dictionary_dir(dictionary_dir)
    meta = read_meta(path)
    if hook_views(meta):
        raise MixedAxesError(mixed_axes_message(path))
    norms = load_decoder_norms(path)
    w_dec = read_tensors(path / WEIGHTS_FILE, ["W_dec"])["W_dec"]  # W_dec only: W_enc is as large
    if w_dec.shape[:2] != norms.shape:
        raise ValueError(f"{path}: W_dec {list(w_dec.shape)} and decoder norms {list(norms.shape)} disagree")
    evo = analyze_evolution(w_dec, norms, names=meta.source_names, steps=meta.source_positions,
                            dead_mask=dead_mask, axis=meta.source_axis)
    return evo, meta


def jsonable(value: Any) -> Any:
    """JSON-safe: NaN/inf floats become null (json would write bare NaN, which is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def build_summary(evo: Evolution, meta: DictionaryMeta, dictionary_dir: Path, recovery: Recovery | None
                  ) -> dict[str, Any]:
    summary = {
        "dictionary": str(dictionary_dir), "hook": meta.hook, "dict_size": meta.dict_size, "d_model": meta.d_model,
        "train_step": meta.train_step, "tokens_seen": meta.tokens_seen, "snapshots": meta.source_names,
        "steps": evo.steps, "emergence_threshold": evo.threshold, "class_counts": evo.class_counts(),
        "emergence_counts": evo.emergence_counts.tolist(),
        "emergence_counts_by_class": evo.emergence_counts_by_class(),
        "median_consecutive_cosine": evo.median_drift(), "snapshot_similarity": evo.similarity.tolist(),
    }
    if recovery is not None:
        summary["recovery"] = recovery.summary()
    return jsonable(summary)


def _add_frequency(table: FeatureTable, summary: dict[str, Any], frequency: torch.Tensor, names: list[str]) -> None:
    """A firing_frequency column in features.csv (a per-snapshot frequency [S, F]: the most frequent snapshot's,
    then one `freq@<snapshot>` column each) and the density figures in summary.json."""
    per_snapshot = frequency.dim() == 2
    table.columns.extend(["firing_frequency", *([f"freq@{name}" for name in names] if per_snapshot else [])])
    columns = torch.cat([latent_frequency(frequency)[:, None], *([frequency.t()] if per_snapshot else [])], dim=1)
    values = columns.tolist()
    for row in table.rows:
        row.extend(values[row[0]])  # row[0] is the latent index
    summary.update({key.replace("density/", "firing_"): value for key, value in density_metrics(frequency).items()})


def _csv(table: FeatureTable) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(["" if cell is None else cell for cell in row] for row in table.rows)
    return buffer.getvalue()


def analyze_export(dictionary_dir: Path, dead_mask: torch.Tensor) -> AnalysisResult:
    """The analysis a training run logs at each export (crosscoder.training.build.AfterExport.analyze): the report,
    with the run's dead latents and, for planted sources, the recovery of the planted features."""
    return analyze_dictionary(dictionary_dir, dead_mask=dead_mask, recovery=planted_recovery(dictionary_dir))


def analyze_dictionary(
    dictionary_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    recovery: Recovery | None = None,
    extra_sections: list[tuple[str, str]] | None = None,
    dead_mask: torch.Tensor | None = None,
    max_heatmap_rows: int = MAX_HEATMAP_ROWS,
    evolution: tuple[Evolution, DictionaryMeta] | None = None,
    log: Callable[[str], None] = lambda _: None,
    scaling: LatentScaling | None = None,
    progress: ProgressResult | None = None,
    adjacent: AdjacentStatistics | None = None,
    view: HookView | None = None,
) -> AnalysisResult:
    """Analyse the dictionary at `dictionary_dir` and write the report folder (default `<dir>/analysis`); an
    aligned stack folder is analysed as one crosscoder of its snapshots (crosscoder.analysis.report.stack).

    `recovery`: planted ground-truth recovery (from `matching.recovery`) to show in the report.
    `extra_sections`: (title, html) pairs appended to the report, for other analyses (e.g. top contexts).
    `dead_mask` [F]: latents known dead from activation statistics, on top of the norm floor.
    `evolution`: `load_evolution(dictionary_dir, dead_mask)` when the caller already has it (W_dec is read once).
    `scaling`: latent scaling (`scaling_report.dictionary_scaling`): columns, a flag per latent, a section.
    `progress`: an aligned stack's progress measure (`progress.stack_progress`): columns, summary, a section.
    `adjacent`: adjacent-source statistics (`adjacent_report.dictionary_adjacent`): adjacent.csv, summary, a section.
    `view`: the one hook of a snapshots x hooks crosscoder this analysis is of (`evolution` is that hook's).

    A snapshots x hooks crosscoder is analysed one hook at a time (crosscoder.analysis.report.by_hook): a folder
    per hook and an index; `AnalysisResult.by_hook` holds each hook's result.
    """
    if not is_stack(dictionary_dir) and view is None and evolution is None and \
            (views := hook_views(read_meta(check_dictionary_dir(dictionary_dir)))):
        return _analyze_by_hook(Path(dictionary_dir), out_dir, views, dead_mask, max_heatmap_rows, log)
    # An aligned stack reads as one crosscoder (crosscoder.analysis.report.stack): its chains, read once here.
    stack = load_stack_chains(dictionary_dir) if is_stack(dictionary_dir) else None
    dictionary_dir = Path(dictionary_dir) if stack else check_dictionary_dir(dictionary_dir)
    out = Path(out_dir) if out_dir is not None else dictionary_dir / ANALYSIS_DIR
    if evolution is None:
        log(f"loading {dictionary_dir}")
        evolution = stack_evolution(stack, dead_mask) if stack else load_evolution(dictionary_dir, dead_mask)
    evo, meta = evolution
    log(f"{evo.trajectories.shape[0]} latents x {len(evo.names)} snapshots: {evo.class_counts()}")

    with building_dir(out) as tmp:
        log("plotting")
        figures = {
            FIGURES["trajectories.png"]: plot_trajectory_heatmap(evo, tmp / "trajectories.png", max_heatmap_rows),
            FIGURES["emergence.png"]: plot_emergence_histogram(evo, tmp / "emergence.png"),
            FIGURES["drift.png"]: plot_drift(evo, tmp / "drift.png"),
            FIGURES["similarity.png"]: plot_similarity(evo, tmp / "similarity.png"),
        }
        recovery_png = (plot_recovery(recovery.cosine, recovery.threshold, tmp / RECOVERY_FIGURE)
                        if recovery is not None else None)
        table = feature_table(evo)
        summary = build_summary(evo, meta, dictionary_dir, recovery)
        frequency = stack_firing_frequency(stack) if stack else load_firing_frequency(dictionary_dir)
        if view is not None and frequency is not None and frequency.dim() == 2:  # per source: the hook's
            frequency = frequency[view.columns]
        if frequency is not None:  # exports from before any log step have none
            figures[DENSITY_FIGURE] = plot_firing_frequency(frequency, DENSE_FREQUENCY, tmp / "density.png",
                                                            evo.names)
            _add_frequency(table, summary, frequency, evo.names)
        if stack:  # the drift to the final snapshot (SAE-Track's measure) and the stack's provenance
            extra_sections = [add_stack_details(table, summary, evo, stack), *(extra_sections or [])]
        if stack and progress is not None:  # needs activations, which only the caller can re-create
            add_progress_columns(table, summary, progress, stack.chains)
            extra_sections = [(PROGRESS_TITLE, progress_section(progress, evo.steps, tmp)), *(extra_sections or [])]
        if scaling is not None:  # needs activations, which only the caller can re-create
            scaling.add_columns(table)
            summary["latent_scaling"] = jsonable(scaling.summary())
            section = scaling_section(scaling, evo, plot_scaling(scaling, tmp / SCALING_FIGURE))
            extra_sections = [(SCALING_TITLE, section), *(extra_sections or [])]
        if adjacent is not None:  # needs activations, which only the caller can re-create
            extra_sections = [add_adjacent(summary, adjacent, evo.steps, tmp), *(extra_sections or [])]
        spliced = read_eval(dictionary_dir) if view is None else None  # per source: in the index of the hooks
        if spliced is not None:  # by crosscoder-eval or by the trainer at export (evaluation.spliced)
            summary["spliced_eval"] = spliced
            section = spliced_section(spliced, plot_ce_recovered(spliced, tmp / SPLICED_FIGURE))
            extra_sections = [(SPLICED_TITLE, section), *(extra_sections or [])]
        (tmp / ANALYSIS_FEATURES_FILE).write_text(_csv(table))
        (tmp / ANALYSIS_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        log("writing the report")
        page = render_report(evo, meta, dictionary_dir, figures, recovery=recovery, recovery_figure=recovery_png,
                             extra_sections=extra_sections,
                             latent_flags=scaling_flags(scaling) if scaling is not None else None)
        (tmp / ANALYSIS_REPORT_FILE).write_text(page, encoding="utf-8")
    files = sorted(path for path in out.iterdir() if path.is_file())
    return AnalysisResult(out_dir=out, report=out / ANALYSIS_REPORT_FILE, evolution=evo, table=table,
                          summary=summary, meta=meta, files=files, recovery=recovery)


def _analyze_by_hook(dictionary_dir: Path, out_dir: str | Path | None, views: list[HookView],
                     dead_mask: torch.Tensor | None, max_heatmap_rows: int, log: Callable[[str], None]
                     ) -> AnalysisResult:
    """A snapshots x hooks crosscoder: one full analysis per hook (its sources on the step axis) in
    `<out>/<hook>/`, and at `<out>` an index page, summary.json (each hook's summary) and features.csv (each hook's
    rows, a `hook` column first). The result is the first hook's, with every hook's in `by_hook`."""
    path = check_dictionary_dir(dictionary_dir)
    out = Path(out_dir) if out_dir is not None else path / ANALYSIS_DIR
    norms = load_decoder_norms(path)
    w_dec = read_tensors(path / WEIGHTS_FILE, ["W_dec"])["W_dec"]
    by_hook: dict[str, AnalysisResult] = {}
    with building_dir(out) as tmp:
        for view in views:
            log(f"hook {view.hook}: {len(view.columns)} snapshots")
            evo = analyze_evolution(w_dec[:, view.columns], norms[:, view.columns], names=view.meta.source_names,
                                    steps=view.meta.source_positions, dead_mask=dead_mask, axis="step")
            by_hook[view.hook] = analyze_dictionary(path, tmp / view.folder, dead_mask=dead_mask,
                                                    max_heatmap_rows=max_heatmap_rows, evolution=(evo, view.meta),
                                                    log=log, view=view)
        first = next(iter(by_hook.values()))
        table = FeatureTable(["hook", *first.table.columns],
                             [[hook, *row] for hook, result in by_hook.items() for row in result.table.rows])
        summary: dict[str, Any] = {"dictionary": str(path), "source_axis": MIXED_AXES,
                                   "by_hook": {hook: result.summary for hook, result in by_hook.items()}}
        spliced = read_eval(path)
        if spliced is not None:
            summary["spliced_eval"] = spliced
        (tmp / ANALYSIS_FEATURES_FILE).write_text(_csv(table))
        (tmp / ANALYSIS_SUMMARY_FILE).write_text(json.dumps(jsonable(summary), indent=2))
        (tmp / ANALYSIS_REPORT_FILE).write_text(render_hook_index(path, views, by_hook, spliced), encoding="utf-8")
    results = {hook: dataclasses.replace(result, out_dir=out / view.folder, report=out / view.folder /
                                         ANALYSIS_REPORT_FILE,
                                         files=[out / view.folder / f.name for f in result.files])
               for view, (hook, result) in zip(views, by_hook.items(), strict=True)}
    return dataclasses.replace(next(iter(results.values())), out_dir=out, report=out / ANALYSIS_REPORT_FILE,
                               table=table, summary=summary, by_hook=results)
