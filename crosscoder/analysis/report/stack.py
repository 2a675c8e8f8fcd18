"""The evolution analysis of a stack (dictionary.stack): one single-snapshot dictionary per snapshot, read as one
crosscoder's decoder would be (`stack.load_stack_decoders`: W_dec [F, S, d] and decoder norms [F, S] in each
snapshot's normalised space), provided latent i means the same feature in every dictionary (`aligned` is
warm_start or sae_match). Each slot is cut into chains where consecutive decoders stop being one feature
(crosscoder.analysis.features.chains): the analysis' latents are the chains, and features.csv names each chain's slot.
Top contexts and latent scaling are skipped; SAE-Track's progress measure, which replays activations through
each snapshot's dictionary, is analysis.diagnostics.progress. Planted recovery works when every dictionary trained
on the same planted problem of S snapshots.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crosscoder.analysis.features.chains import CHAIN_MIN_COSINE, Chains, chain_segments
from crosscoder.analysis.features.evolution import Evolution, FeatureTable, analyze_evolution
from crosscoder.analysis.features.matching import Recovery, recovery
from crosscoder.analysis.features.planted import planted_config
from crosscoder.dictionary.io import DictionaryMeta, load_firing_frequency
from crosscoder.dictionary.stack import StackManifest, load_stack_decoders, read_stack
from crosscoder.errors import DictionaryError

SKIPPED_FOR_STACKS = "a stack's dictionaries each see one snapshot: top contexts and latent scaling are skipped"
DRIFT_TO_FINAL_TITLE = "Drift to the final snapshot"


class StackNotAlignedError(DictionaryError):
    """The stack's dictionaries were trained independently and never matched."""


def check_aligned(stack_dir: Path, manifest: StackManifest) -> None:
    if manifest.aligned == "none":
        raise StackNotAlignedError(
            f"{stack_dir} is an unaligned stack (aligned: none): latent indices mean nothing across independently "
            f"trained dictionaries; run crosscoder-match {stack_dir} first and analyse the aligned stack it writes")


def stack_meta(manifest: StackManifest, metas: list[DictionaryMeta]) -> DictionaryMeta:
    """One DictionaryMeta describing the stack as a crosscoder of S snapshots: each dictionary's snapshot, input
    scale and mean decoder norm; tokens and steps summed over the dictionaries (what the whole stack cost)."""
    first = metas[0]
    sources = [{**meta.sources[0], "step": entry.step if entry.step is not None else meta.sources[0].get("step")}
               for entry, meta in zip(manifest.entries, metas, strict=True)]
    activations = sorted({meta.activation for meta in metas})
    link_steps = [entry.train_steps for entry in manifest.entries]
    return DictionaryMeta(
        sources=sources, hook=manifest.hook or first.hook, d_model=first.d_model, dict_size=first.dict_size,
        activation="/".join(activations), k=first.k, aux_k=first.aux_k,
        tokens_seen=sum(meta.tokens_seen for meta in metas),
        train_step=sum(link_steps) if all(link_steps) else sum(meta.train_step for meta in metas),
        input_scale=[meta.input_scale[0] for meta in metas],
        decoder_norm_mean={name: value for meta in metas for name, value in meta.decoder_norm_mean.items()},
        training={"stack": {"method": manifest.method, "aligned": manifest.aligned}},
    )


@dataclass
class StackChains:
    """An aligned stack read once for its analysis: its chains and what they were cut from."""

    chains: Chains
    manifest: StackManifest
    metas: list[DictionaryMeta]
    slot_frequency: torch.Tensor | None
    """[S, F] each dictionary's firing frequency per latent slot; None unless every dictionary has one."""


def load_stack_chains(stack_dir: str | Path) -> StackChains:
    """An aligned stack's chains (its slots cut where consecutive decoders part); StackNotAlignedError for an
    unaligned one. Reads every dictionary's decoder: load it once per analysis and pass it on."""
    stack_dir = Path(stack_dir)
    manifest, metas = read_stack(stack_dir)
    check_aligned(stack_dir, manifest)
    w_dec, norms, _ = load_stack_decoders(stack_dir)
    frequency = _slot_frequency(stack_dir, manifest)
    present = None if frequency is None else (frequency > 0).t()  # a latent never seen firing holds nothing there
    return StackChains(chain_segments(w_dec, norms, present=present), manifest, metas, frequency)


def _slot_frequency(stack_dir: Path, manifest: StackManifest) -> torch.Tensor | None:
    """[S, F] each dictionary's firing frequency per latent slot, or None unless every dictionary has one."""
    frequencies = [load_firing_frequency(stack_dir / entry.dictionary) for entry in manifest.entries]
    if any(frequency is None for frequency in frequencies):
        return None
    return torch.stack([frequency.reshape(-1) for frequency in frequencies])  # [1, F] or [F] each


def load_stack_evolution(stack_dir: str | Path, dead_mask: torch.Tensor | None = None
                         ) -> tuple[Evolution, DictionaryMeta]:
    """Evolution metrics of an aligned stack's chains; `dead_mask` is per chain."""
    return stack_evolution(load_stack_chains(stack_dir), dead_mask)


def stack_evolution(stack: StackChains, dead_mask: torch.Tensor | None = None) -> tuple[Evolution, DictionaryMeta]:
    meta = stack_meta(stack.manifest, stack.metas)
    evo = analyze_evolution(stack.chains.decoder, stack.chains.norms, names=stack.manifest.names,
                            steps=[source["step"] for source in meta.sources], dead_mask=dead_mask)
    return evo, meta


def stack_firing_frequency(stack: StackChains) -> torch.Tensor | None:
    """[S, F'] each chain's firing frequency in each snapshot (its slot's, zero outside the chain), or None unless
    every dictionary has one."""
    return None if stack.slot_frequency is None else stack.chains.spread(stack.slot_frequency)


def stack_planted_recovery(stack_dir: str | Path) -> Recovery | None:
    """Recovery of planted features by an aligned stack whose dictionaries all trained on one planted problem of
    S snapshots (None when they trained on real snapshots; ValueError when the problems differ or do not fit)."""
    from crosscoder.data.planted import planted_truth

    stack_dir = Path(stack_dir)
    manifest, metas = read_stack(stack_dir)
    configs = [planted_config(meta.training) for meta in metas]
    if all(cfg is None for cfg in configs):
        return None
    if any(cfg != configs[0] for cfg in configs):
        raise ValueError("the stack's dictionaries name different planted problems in their metadata")
    cfg = configs[0]
    if (cfg.n_snapshots, cfg.d_model) != (len(metas), metas[0].d_model):
        raise ValueError(f"the planted problem in the metadata ({cfg.n_snapshots} snapshots, d={cfg.d_model}) does "
                         f"not fit the stack ({len(metas)} snapshots, d={metas[0].d_model})")
    chains = load_stack_chains(stack_dir).chains
    truth = planted_truth(cfg)
    return recovery(chains.decoder, truth.decoder, truth.emergence, learned_norms=chains.norms)


def median_cosine_to_final(evo: Evolution) -> list[float]:
    """[S] median cos(W_dec[i, s], W_dec[i, final]) over live latents present at s and at the final snapshot."""
    present = evo.trajectories >= evo.threshold
    both = present & present[:, -1:] & ~evo.dead[:, None]
    return torch.where(both, evo.cos_to_last, torch.nan).nanmedian(dim=0).values.tolist()


def add_stack_details(table: FeatureTable, summary: dict[str, Any], evo: Evolution, stack: StackChains
                      ) -> tuple[str, str]:
    """The drift to the final snapshot (SAE-Track's measure: cos(W_dec_i^t, W_dec_i^final)) as `cos_final@`
    columns in features.csv and in summary.json, the stack's provenance in summary.json; returns the report
    section."""
    chains, manifest = stack.chains, stack.manifest
    rounded = ((evo.cos_to_last.double() * 1e6).round() / 1e6).tolist()
    table.columns.extend(["stack_latent", *(f"cos_final@{name}" for name in evo.names)])
    for row in table.rows:  # row[0]: the chain; its latent in the dictionaries, then its drift to the final one
        row.extend([int(chains.slot[row[0]]), *(None if math.isnan(value) else value for value in rounded[row[0]])])
    medians = median_cosine_to_final(evo)
    summary["stack"] = {"method": manifest.method, "aligned": manifest.aligned, "dictionaries":
                        [entry.dictionary for entry in manifest.entries], "skipped": SKIPPED_FOR_STACKS,
                        "slots": int(chains.slot.max()) + 1, "chains": len(chains.slot),
                        "chain_min_cosine": CHAIN_MIN_COSINE}
    if "sae_match" in manifest.details:
        summary["stack"]["sae_match"] = manifest.details["sae_match"]
    summary["median_cosine_to_final"] = [None if math.isnan(value) else value for value in medians]
    shown = ["" if math.isnan(value) else f"{value:.3f}" for value in medians]
    cells = "".join(f"<tr><td class='l'>{html.escape(name)}</td><td>{value}</td></tr>"
                    for name, value in zip(evo.names, shown, strict=True))
    section = (f"<p class='muted'>A stack of {len(manifest.entries)} single-snapshot dictionaries "
               f"(method {manifest.method}, aligned by {manifest.aligned}); its {int(chains.slot.max()) + 1} latent "
               f"slots are read as {len(chains.slot)} chains, cut where consecutive decoders' cosine is below "
               f"{CHAIN_MIN_COSINE}. Median cosine of each latent's decoder "
               "at a snapshot with its decoder at the final one, over latents present at both. "
               f"{SKIPPED_FOR_STACKS.capitalize()}.</p>"
               "<table><tr><th class='l'>snapshot</th><th>median cos to final</th></tr>"
               f"{cells}</table>")
    return DRIFT_TO_FINAL_TITLE, section

