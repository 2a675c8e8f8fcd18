"""Paired activations: the same token batch through every snapshot, stacked to [n_tokens, S, d].

BOS and padding positions are dropped with one mask shared by all snapshots, so row j of every source is
the same token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from crosscoder.data.tokens import TokenBatch
from crosscoder.sources import SnapshotRunner


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
    """[n_valid_tokens, S, d] float32 activations of every snapshot at the same positions."""
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    mask = valid_token_mask(batch, bos_id, pad_id).to(device)
    per_source = [runner(input_ids, attention_mask)[mask].float() for runner in runners]
    return torch.stack(per_source, dim=1)


def iter_paired_activations(
    token_batches: Iterable[TokenBatch],
    runners: list[SnapshotRunner],
    bos_id: int,
    pad_id: int | None,
    device: torch.device,
) -> Iterator[torch.Tensor]:
    for batch in token_batches:
        yield paired_activations(batch, runners, bos_id, pad_id, device)


def fixed_size_batches(blocks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Re-cut blocks of any length into batches of exactly `batch_size` rows, in order."""
    pending: list[torch.Tensor] = []
    n_pending = 0
    for block in blocks:
        pending.append(block)
        n_pending += block.shape[0]
        if n_pending < batch_size:
            continue
        joined = torch.cat(pending)
        n_full = joined.shape[0] // batch_size
        yield from joined[: n_full * batch_size].split(batch_size)
        rest = joined[n_full * batch_size :]
        pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
