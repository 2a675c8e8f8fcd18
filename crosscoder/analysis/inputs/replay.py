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

from crosscoder.analysis.features.planted import planted_config
from crosscoder.data.activations import paired_activations, valid_token_mask
from crosscoder.data.tokens import iter_token_batches, special_token_ids
from crosscoder.dictionary.io import DictionaryMeta
from crosscoder.dictionary.provenance import dictionary_sources, run_config_of
from crosscoder.errors import ConfigError
from crosscoder.sources.models import load_runners

PLANTED_BATCH_TOKENS = 4096
"""Rows per planted draw."""
HELD_OUT_SEED = 0x5CA1E
"""Added to the planted seed for the analysis draws (training blocks use sha256-derived seeds of their own)."""


def has_activations(meta: DictionaryMeta) -> str | None:
    """Why this dictionary's activations cannot be re-created (None when they can)."""
    sources = meta.training.get("sources")
    if not isinstance(sources, dict):
        return "the dictionary's config.json holds no run configuration (training.sources): snapshots unknown"
    if sources.get("kind") == "planted":
        return None
    try:
        run_config_of(meta, need_text=sources.get("kind") != "files")
    except ConfigError as error:
        return str(error)
    return None


def planted_batches(meta: DictionaryMeta, n_tokens: int) -> Iterator[torch.Tensor]:
    """Held-out planted activations, `n_tokens` rows in all (ConfigError at once when the problem does not fit)."""
    from crosscoder.data.planted import planted_truth, sample_tokens

    cfg = planted_config(meta.training)
    if cfg is None:
        raise ConfigError("the dictionary was not trained on planted sources")
    if (cfg.n_snapshots, cfg.d_model) != (len(meta.sources), meta.d_model):
        raise ConfigError(f"the planted problem in the metadata ({cfg.n_snapshots} snapshots, d={cfg.d_model}) does "
                          f"not fit the dictionary ({len(meta.sources)} snapshots, d={meta.d_model})")
    truth = planted_truth(cfg)
    generator = torch.Generator().manual_seed(cfg.seed + HELD_OUT_SEED)
    sizes = [min(PLANTED_BATCH_TOKENS, n_tokens - start) for start in range(0, n_tokens, PLANTED_BATCH_TOKENS)]
    return (sample_tokens(truth, size, generator)[1] for size in sizes)


def snapshot_batches(meta: DictionaryMeta, n_tokens: int, device: torch.device,
                     log: Callable[[str], None] = print) -> Iterator[torch.Tensor]:
    """The snapshots' activations on the first `n_tokens` valid tokens of the run's token stream (ConfigError
    when the run configuration no longer gives the dictionary's snapshots)."""
    cfg, info = dictionary_sources(meta, log)
    runners = load_runners(cfg.sources, info.specs, device)
    bos, pad = special_token_ids(info.tokenizer)
    seen = 0
    for batch in iter_token_batches(cfg.data, info.tokenizer, shard=0, n_shards=1):
        keep = min(int(valid_token_mask(batch, bos, pad).sum()), n_tokens - seen)
        if keep > 0:
            yield paired_activations(batch, runners, bos, pad, device)[:keep]
            seen += keep
        if seen >= n_tokens:
            return
    if seen == 0:
        raise ConfigError(f"the token stream (data.kind={cfg.data.kind!r}) gave no tokens")


def file_batches(meta: DictionaryMeta, n_tokens: int, log: Callable[[str], None] = print) -> Iterator[torch.Tensor]:
    """The first `n_tokens` rows of the activation files the dictionary was trained on (`sources.kind=files`),
    refused (ConfigError) unless the folder still holds the files it was trained on (their fingerprint)."""
    from crosscoder.data.files import FileActivations

    cfg, _ = dictionary_sources(meta, log, need_text=False)
    seen = 0
    for block in FileActivations(cfg.sources).iter_blocks():
        keep = min(block.activations.shape[0], n_tokens - seen)
        yield block.activations[:keep]
        seen += keep
        if seen >= n_tokens:
            return


def activation_batches(meta: DictionaryMeta, n_tokens: int, device: str | torch.device = "cpu",
                       log: Callable[[str], None] = print) -> Iterator[torch.Tensor]:
    """Raw activation batches [B, S, d] for the dictionary described by `meta` (module docstring); ConfigError
    when its sources cannot give any (`has_activations` says why)."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens} must be > 0")
    reason = has_activations(meta)
    if reason is not None:
        raise ConfigError(reason)
    kind = meta.training["sources"].get("kind")
    if kind == "planted":
        return planted_batches(meta, n_tokens)
    if kind == "files":
        return file_batches(meta, n_tokens, log)
    return snapshot_batches(meta, n_tokens, torch.device(device), log)
