"""Paired activations: the same token batch through every snapshot, stacked to [n_tokens, S, d].

BOS and padding positions are dropped with one mask shared by all snapshots, so row j of every source is
the same token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosscoder.data.tokens import TokenBatch
from crosscoder.sources.hooks import SnapshotRunner


@dataclass
class ActivationBlock:
    """One unit of the activation stream: the valid tokens of one model batch (or of one cache shard)."""

    index: int
    """Position of the block in its stream (token batch of this rank, or cache shard); resuming counts these."""
    activations: torch.Tensor
    """[n_tokens, S, d] paired activations (row j of every source is the same token)."""
    token_ids: torch.Tensor
    """[n_tokens] int64 token id of each row: what alignment and cache hashes are checked against."""


def valid_token_mask(batch: TokenBatch, bos_id: int, pad_id: int | None) -> torch.Tensor:
    """[B, T] True where a position is trained on: not BOS, not padding."""
    mask = batch.attention_mask.bool() & (batch.input_ids != bos_id)
    if pad_id is not None:
        mask &= batch.input_ids != pad_id
    return mask


@torch.no_grad()
def paired_activations(
    batch: TokenBatch,
    runners: list[SnapshotRunner],
    bos_id: int,
    pad_id: int | None,
    device: torch.device,
) -> torch.Tensor:
    """[n_valid_tokens, S, d] float32 activations of every source at the same positions: each runner's hooks in
    turn (one forward per snapshot), so S is the number of (snapshot, hook) sources."""
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    mask = valid_token_mask(batch, bos_id, pad_id).to(device)
    per_source = [activation[mask].float() for runner in runners for activation in runner.capture(input_ids,
                                                                                                   attention_mask)]
    return torch.stack(per_source, dim=1)


def paired_block(
    index: int, batch: TokenBatch, runners: list[SnapshotRunner], bos_id: int, pad_id: int | None,
    device: torch.device,
) -> ActivationBlock:
    """The block of one token batch: its paired activations and the ids of the tokens they belong to."""
    token_ids = batch.input_ids[valid_token_mask(batch, bos_id, pad_id)]
    return ActivationBlock(index, paired_activations(batch, runners, bos_id, pad_id, device), token_ids)
