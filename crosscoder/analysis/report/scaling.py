"""Latent scaling of an exported dictionary, on activations re-created from its run configuration, and its
report section (the rule, the counts, the scatter, the flagged latents)."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import torch

from crosscoder.analysis.diagnostics.scaling import LatentScaling, latent_scaling
from crosscoder.analysis.features.evolution import Evolution
from crosscoder.analysis.inputs.replay import activation_batches
from crosscoder.analysis.report.html import image_tag
from crosscoder.analysis.report.plots import plot_latent_scaling, snapshot_labels
from crosscoder.dictionary.io import load_dictionary

SCALING_TITLE = "Latent scaling: shrinkage artefacts"
SCALING_FIGURE = "scaling.png"
DEFAULT_SCALING_TOKENS = 20000
"""Tokens `crosscoder-analyze` fits latent scaling on unless `--scaling-tokens` says otherwise."""
FLAGGED_SHOWN = 30
"""Flagged latents listed in the report (largest peak decoder norm first); features.csv has them all."""


def dictionary_scaling(dictionary_dir: str | Path, evo: Evolution, n_tokens: int = DEFAULT_SCALING_TOKENS,
                       device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> LatentScaling:
    """Latent scaling of the dictionary at `dictionary_dir` over `n_tokens` re-created tokens; the reference
    snapshots and the norm ratios come from `evo`'s normalised decoder norms, its dead latents are not flagged.
    ConfigError when the dictionary's sources cannot give activations."""
    model, meta = load_dictionary(dictionary_dir, device)
    batches = activation_batches(meta, n_tokens, device, log)
    log(f"latent scaling: {meta.dict_size} latents x {len(meta.sources)} snapshots over {n_tokens:,} tokens")
    result = latent_scaling(model, batches, meta.source_names, norms=evo.norms, dead=evo.dead)
    summary = result.summary()
    log(f"latent scaling: {summary['latents_flagged']} of {summary['live_latents']} live latents flagged as "
        "shrinkage artefacts")
    return result


def scaling_flags(scaling: LatentScaling) -> dict[int, str]:
    """Per flagged latent, the snapshots it is flagged at (for the report's per-latent tables)."""
    return {i: ", ".join(scaling.flagged_snapshots(i)) for i in torch.nonzero(scaling.artefact).flatten().tolist()}


def plot_scaling(scaling: LatentScaling, path: Path) -> Path:
    thresholds = tuple(scaling.thresholds[key] for key in ("emergence_threshold", "nu_present", "shrinkage_margin"))
    return plot_latent_scaling(scaling.norm_ratio, scaling.nu_error, scaling.flagged, scaling.reference, thresholds,
                               path)


def scaling_section(scaling: LatentScaling, evo: Evolution, figure: Path | None) -> str:
    """HTML: the rule, the per-snapshot counts, the scatter and the leading flagged latents (all text generated
    here from numbers and snapshot names, escaped)."""
    summary = scaling.summary()
    labels = snapshot_labels(evo.names, evo.steps)
    share = summary["share_flagged"]
    tau, bar, margin, least = (summary[key] for key in ("emergence_threshold", "nu_present", "shrinkage_margin",
                                                        "min_active_tokens"))
    parts = [
        "<p class='muted'>For each latent i and snapshot s, &beta;<sub>i,s</sub> is the least-squares scale with "
        "which the latent's code reconstructs, along its decoder direction at its peak snapshot s*, snapshot s's "
        "crosscoder reconstruction error with the latent's own contribution added back (Minder et al. 2025); "
        f"&nu; = &beta;<sub>s</sub> / &beta;<sub>s*</sub>. Flagged: decoder norm below {tau} of its "
        f"maximum (absent by the emergence rule) while &nu; &ge; {bar} (the direction is there) and &nu; exceeds "
        f"the norm ratio by at least {margin}, with at least {least} firing tokens at s and s*. Over "
        f"{scaling.n_tokens:,} tokens. features.csv: "
        "<code>beta@</code>, <code>nu@</code> (error target), <code>beta_act@</code>, <code>nu_act@</code> "
        "(activation target), <code>nu_own@</code> (the latent's own snapshot direction), "
        "<code>shrinkage_artefact</code>, <code>shrinkage_snapshots</code>.</p>",
        f"<p><b>{summary['latents_flagged']}</b> of {summary['live_latents']} live latents flagged"
        + ("" if share is None else f" ({100 * share:.1f}%)") + ".</p>",
        "<table><tr><th class='l'>snapshot</th><th>flagged here</th><th>measured</th></tr>"
        + "".join(f"<tr><td class='l'>{html.escape(label)}</td><td>{flagged}</td><td>{measured}</td></tr>"
                  for label, flagged, measured in zip(labels, summary["flagged_per_snapshot"],
                                                      summary["measured_per_snapshot"], strict=True))
        + "</table>",
    ]
    if figure is not None:
        parts.append(image_tag(figure, "latent scaling"))
    flagged = torch.nonzero(scaling.artefact).flatten()
    if flagged.numel():
        peak = evo.norms.amax(dim=1)
        order = flagged[peak[flagged].argsort(descending=True)][:FLAGGED_SHOWN].tolist()
        rows = "".join(
            f"<tr><td class='l'>{i}</td><td class='l'>{html.escape(evo.names[int(scaling.reference[i])])}</td>"
            f"<td class='l'>{html.escape(', '.join(scaling.flagged_snapshots(i)))}</td>"
            f"<td>{float(scaling.nu_error[i][scaling.flagged[i]].min()):.2f}</td></tr>" for i in order)
        parts.append(f"<h3>Flagged latents ({flagged.numel()}, largest peak norm first)</h3>"
                     "<table><tr><th class='l'>latent</th><th class='l'>peak snapshot</th>"
                     f"<th class='l'>flagged at</th><th>smallest flagged &nu;</th></tr>{rows}</table>")
    return "".join(parts)
