"""What a run trains on its snapshots (`method`): the module for this rank's share, the snapshots the run covers,
and how its export is laid out (one dictionary, or a stack of one per snapshot). The loop stays method-blind:
it asks the module (`dictionaries_per_snapshot`, `codes_per_snapshot`, `decoder_parameters`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from crosscoder.config import RunConfig
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.independent import IndependentDictionaries
from crosscoder.dictionary.stack import StackEntry, StackManifest, entry_folder
from crosscoder.errors import ConfigError
from crosscoder.parallel.layout import Layout
from crosscoder.sources.spec import SourceInfo


def snapshot_window(cfg: RunConfig, sources: SourceInfo) -> range:
    """The snapshots (of those the sources describe) this run trains: all, or `method.snapshot` alone."""
    names = [spec.name for spec in sources.specs]
    wanted = cfg.method.snapshot
    if not wanted:
        return range(len(names))
    if wanted not in names:
        raise ConfigError(f"method.snapshot={wanted!r} is not one of the sources' snapshots {names}")
    index = names.index(wanted)
    return range(index, index + 1)


def restrict_sources(sources: SourceInfo, window: range) -> SourceInfo:
    return dataclasses.replace(sources, specs=sources.specs[window.start : window.stop])


def build_module(cfg: RunConfig, n_sources: int, d_model: int, layout: Layout) -> nn.Module:
    """This rank's share of what the method trains: a crosscoder (slice) or its snapshots' dictionaries."""
    c = cfg.crosscoder
    options = dict(activation=c.activation, k=c.k, aux_k=c.aux_k, aux_coeff=c.aux_coeff,
                   init_decoder_norm=c.init_decoder_norm, sparse_topk=c.sparse_topk,
                   activation_options=c.activation_options(), init=c.init)
    if cfg.method.name == "independent":
        return IndependentDictionaries(n_sources, d_model, c.dict_size, seed=cfg.trainer.seed,
                                       snapshot_share=layout.share, **options)
    return Crosscoder(n_sources=n_sources, d_model=d_model, dict_size=c.dict_size, snapshot_share=layout.share,
                      reduction=layout.reduction, **options)


def dead_shape(module: nn.Module, n_snapshots: int, dict_size: int) -> tuple[int, ...]:
    """What the dead-latent count tracks: [S, F] with one dictionary per snapshot, [F] for a crosscoder."""
    return (n_snapshots, dict_size) if module.dictionaries_per_snapshot else (dict_size,)


def dead_mask_for(module: nn.Module, dead_mask: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The part of the run's dead mask this rank's module takes: its share's rows for per-snapshot dictionaries."""
    if not module.dictionaries_per_snapshot:
        return dead_mask
    return dead_mask[layout.share.start : layout.share.stop]


def independent_manifest(sources: SourceInfo, train_steps: int) -> StackManifest:
    """The stack a `method=independent` run exports: one entry per snapshot, latents unaligned."""
    entries = [StackEntry(name=spec.name, dictionary=entry_folder(index, spec.name), step=spec.step,
                          train_steps=train_steps) for index, spec in enumerate(sources.specs)]
    return StackManifest(method="independent", aligned="none", entries=entries, hook=sources.hook)
