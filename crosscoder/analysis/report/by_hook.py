"""A snapshots x hooks crosscoder read one hook at a time: its sources lie on two axes (training step and hook),
and emergence, classes, drift and similarity are about one of them. Each hook's sources, in snapshot order, are a
view of the dictionary with the step axis of an ordinary crosscoder; `analyze_dictionary` writes one analysis per
view (crosscoder.analysis.report.dictionary) and an index of them.
"""

from __future__ import annotations

import dataclasses
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosscoder.analysis.report.html import PAGE_STYLE, html_table
from crosscoder.analysis.report.spliced_loss import SPLICED_TITLE, spliced_section
from crosscoder.dictionary.io import DictionaryMeta

MIXED_AXES = "source"
"""`DictionaryMeta.source_axis` of a snapshots x hooks crosscoder (crosscoder.sources.models.source_axis)."""


class MixedAxesError(ValueError):
    """An analysis that reads the sources as one axis was asked for a snapshots x hooks crosscoder."""


@dataclass(frozen=True)
class HookView:
    hook: str
    columns: list[int]
    """The hook's sources in the dictionary, in snapshot order."""
    meta: DictionaryMeta
    """The dictionary's metadata as if it held only these sources, named by snapshot, on the step axis."""

    @property
    def folder(self) -> str:
        """The hook's analysis folder name (the hook's own name, safe as a path)."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.hook)


def hook_views(meta: DictionaryMeta) -> list[HookView]:
    """One view per hook of a snapshots x hooks crosscoder, in the hooks' order; [] for any other dictionary."""
    if meta.source_axis != MIXED_AXES:
        return []
    hooks: dict[str, list[int]] = {}
    for index, source in enumerate(meta.sources):
        hooks.setdefault(str(source.get("hook") or meta.hook), []).append(index)
    views = []
    for hook, columns in hooks.items():
        sources = [{**meta.sources[i], "name": meta.sources[i].get("snapshot") or meta.sources[i]["name"]}
                   for i in columns]
        view_meta = dataclasses.replace(meta, sources=sources, hook=hook, source_axis="step",
                                        input_scale=[meta.input_scale[i] for i in columns],
                                        decoder_norm_mean={})
        views.append(HookView(hook, columns, view_meta))
    return views


def mixed_axes_message(path: object) -> str:
    return (f"{path} is a snapshots x hooks crosscoder: its sources lie on two axes (training step and hook), which "
            "one evolution cannot read as one; crosscoder-analyze analyses it one hook at a time")


def render_hook_index(dictionary_dir: Path, views: list[HookView], results: dict[str, Any],
                      spliced: dict[str, Any] | None) -> str:
    """The index page of a snapshots x hooks crosscoder's analysis: each hook's class counts and emergence
    counts, linking to its own report, then the spliced-in LM loss of every source."""
    title = f"Feature evolution by hook: {dictionary_dir.name}"
    classes = list(next(iter(results.values())).evolution.class_counts())
    rows = []
    for view in views:
        evo = results[view.hook].evolution
        link = ("raw", f'<td class="l"><a href="{view.folder}/report.html">{html.escape(view.hook)}</a></td>')
        emergence = ", ".join(f"{name}: {count}" for name, count in zip(evo.names, evo.emergence_counts.tolist(),
                                                                        strict=True) if count)
        rows.append([link, *evo.class_counts().values(), emergence])
    body = [f"<h1>{html.escape(title)}</h1>",
            "<p>The sources are snapshots x hooks: two axes. Emergence, classes, drift and similarity are read along "
            "the training steps, one hook at a time; each hook's report and features.csv are in its folder.</p>",
            html_table(["hook", *classes, "latents emerging at"], rows)]
    if spliced is not None:
        body.append(f"<h2>{html.escape(SPLICED_TITLE)}</h2>{spliced_section(spliced, None)}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body>{''.join(body)}</body></html>\n")
