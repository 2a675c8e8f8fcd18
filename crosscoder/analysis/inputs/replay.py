"""Activations for analysing an exported dictionary, re-created from the run configuration in its metadata.

- planted sources (`sources.kind=planted`): fresh draws from the planted problem, from a generator seeded apart
  from the training stream's blocks, so they are held out;
- snapshots that read text (hf, toy): every snapshot re-run inline (no workers) on the run's own token stream,
  as the top contexts do (`contexts.run_config_of`), valid (non-BOS, non-padding) tokens only;
- activation files (`sources.kind=files`): the folder's first rows, re-read (not held out: the files are all
  there is), once its fingerprint shows it still holds what the run trained on.

Batches are raw activations [B, S, d], what an exported (folded) dictionary takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from crosscoder.config import MODEL_KINDS
from crosscoder.data.kinds import source_kind
from crosscoder.dictionary.io import DictionaryMeta
from crosscoder.dictionary.provenance import dictionary_sources, run_config_of
from crosscoder.errors import ConfigError


def has_activations(meta: DictionaryMeta) -> str | None:
    """Why this dictionary's activations cannot be re-created (None when they can)."""
    sources = meta.training.get("sources")
    if not isinstance(sources, dict):
        return "the dictionary's config.json holds no run configuration (training.sources): snapshots unknown"
    try:
        run_config_of(meta, need_text=_reads_text(sources))
    except ConfigError as error:
        return str(error)
    return None


def _reads_text(sources: dict) -> bool:
    return sources.get("kind", "hf") in MODEL_KINDS


def activation_batches(meta: DictionaryMeta, n_tokens: int, device: str | torch.device = "cpu",
                       log: Callable[[str], None] = print) -> Iterator[torch.Tensor]:
    """Raw activation batches [B, S, d] for the dictionary described by `meta` (module docstring): its sources
    described again and checked to be the ones it trained on, then re-read by their kind
    (crosscoder.data.kinds); ConfigError when they cannot give any (`has_activations` says why)."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens} must be > 0")
    reason = has_activations(meta)
    if reason is not None:
        raise ConfigError(reason)
    cfg, info = dictionary_sources(meta, log, need_text=_reads_text(meta.training["sources"]))
    return source_kind(cfg.sources.kind).activations(cfg.sources, cfg.data, info, n_tokens, torch.device(device), log)
