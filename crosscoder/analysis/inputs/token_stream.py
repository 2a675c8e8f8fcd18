"""A dictionary's own token stream, replayed: the snapshots re-run (inline, no workers) on the run's data config,
valid (non-BOS, non-padding) tokens only, each with the key that finds it again (its sequence and position).

What the top contexts and the exemplar pass stream over; their keys point into the batches' token ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from crosscoder.config import RunConfig
from crosscoder.data.activations import paired_activations, valid_token_mask
from crosscoder.data.tokens import iter_token_batches, special_token_ids
from crosscoder.errors import ConfigError
from crosscoder.sources.hooks import SnapshotRunner


@dataclass
class ReplayedBatch:
    x: torch.Tensor
    """[n, S, d] raw activations of the batch's valid tokens, in row-major (sequence, position) order."""
    keys: torch.Tensor
    """[n] sequence * seq_len + position of each row (on x's device)."""
    first_sequence: int
    """The stream index of the batch's first sequence (batch index * data.model_batch_size)."""
    input_ids: torch.Tensor
    """[B, L] the batch's token ids (CPU): sequence `first_sequence + b` is row b."""


def replayed_batches(cfg: RunConfig, tokenizer: Any, runners: list[SnapshotRunner], n_tokens: int,  # noqa: ANN401
                     device: torch.device) -> Iterator[ReplayedBatch]:
    """The first `n_tokens` valid tokens of the run's token stream (document shard 0 of 1), batch by batch;
    ConfigError when the stream gives none."""
    bos, pad = special_token_ids(tokenizer)
    seen, seq_len = 0, cfg.data.seq_len
    for batch_index, batch in enumerate(iter_token_batches(cfg.data, tokenizer, shard=0, n_shards=1)):
        where = valid_token_mask(batch, bos, pad).nonzero()  # row-major: the order of paired_activations' rows
        keep = min(len(where), n_tokens - seen)
        if keep == 0:
            continue
        x = paired_activations(batch, runners, bos, pad, device)[:keep]
        first = batch_index * batch.input_ids.shape[0]
        keys = ((first + where[:keep, 0]) * seq_len + where[:keep, 1]).to(device)
        seen += keep
        yield ReplayedBatch(x, keys, first, batch.input_ids)
        if seen >= n_tokens:
            return
    if seen == 0:
        raise ConfigError(f"the token stream (data.kind={cfg.data.kind!r}) gave no tokens")
