"""The shuffle buffer: mixes tokens from many sequences (and documents) into every training batch.

Blocks arrive in stream order, one model batch (a few sequences) at a time; training on them in that order
would give batches drawn from a handful of documents. The buffer holds `capacity` rows. Once full, it serves
a random `refill_fraction` of its rows as batches and refills exactly those slots from the stream, so within
a pass every row is served once: none twice, none dropped. Only at the end of a finite stream (a cache) is a
remainder smaller than one batch left unserved. Memory is fixed: one [capacity, S, d] tensor, allocated once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from crosscoder.config import ConfigError
from crosscoder.data.activations import ActivationBlock

Batch = tuple[torch.Tensor, torch.Tensor]
"""(activations [batch, S, d], token ids [batch])"""


class ShuffleBuffer:
    """Turns a stream of blocks of any length into shuffled batches of exactly `batch_size` rows."""

    def __init__(self, capacity: int, batch_size: int, refill_fraction: float = 0.5, seed: int = 0) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch size {batch_size} must be > 0")
        self.batch_size = batch_size
        self.capacity = capacity
        self.serve_rows = int(capacity * refill_fraction) // batch_size * batch_size
        if capacity and self.serve_rows == 0:
            raise ConfigError(
                f"data.shuffle.buffer_tokens={capacity} x refill_fraction={refill_fraction} holds less than one "
                f"batch of {batch_size} tokens per rank; raise buffer_tokens or set it to 0 to disable shuffling"
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.next_block = 0
        """Index of the first block none of whose rows has entered the buffer: where a resumed stream starts."""
        self.rows_served = 0

    def batches(self, blocks: Iterable[ActivationBlock]) -> Iterator[Batch]:
        if self.capacity == 0:
            yield from self._in_order(blocks)
        else:
            yield from self._shuffled(blocks)

    def _shuffled(self, blocks: Iterable[ActivationBlock]) -> Iterator[Batch]:
        storage: torch.Tensor | None = None
        token_ids = torch.empty(self.capacity, dtype=torch.long)
        free = torch.arange(self.capacity)  # slots waiting for rows, filled front to back
        for block in blocks:
            # Once any row of a block is inside, resuming must start after it: its rows are never seen twice.
            self.next_block = block.index + 1
            if storage is None:
                storage = torch.empty((self.capacity, *block.activations.shape[1:]), dtype=block.activations.dtype)
            rows, ids = block.activations, block.token_ids
            while rows.shape[0]:
                n = min(rows.shape[0], free.shape[0])
                storage.index_copy_(0, free[:n], rows[:n])
                token_ids.index_copy_(0, free[:n], ids[:n])
                rows, ids, free = rows[n:], ids[n:], free[n:]
                if free.shape[0] == 0:
                    chosen = torch.randperm(self.capacity, generator=self.generator)[: self.serve_rows]
                    yield from self._serve(storage, token_ids, chosen)
                    free = chosen  # exactly the served slots are refilled
        if storage is not None:  # a finite stream ended: serve what is left, in whole batches
            occupied = torch.ones(self.capacity, dtype=torch.bool)
            occupied[free] = False
            left = occupied.nonzero().squeeze(1)
            left = left[torch.randperm(left.shape[0], generator=self.generator)]
            yield from self._serve(storage, token_ids, left[: left.shape[0] // self.batch_size * self.batch_size])

    def _serve(self, storage: torch.Tensor, token_ids: torch.Tensor, slots: torch.Tensor) -> Iterator[Batch]:
        for chunk in slots.split(self.batch_size):
            self.rows_served += chunk.shape[0]
            yield storage.index_select(0, chunk), token_ids.index_select(0, chunk)  # copies: slots get reused

    def _in_order(self, blocks: Iterable[ActivationBlock]) -> Iterator[Batch]:
        """No shuffling: re-cut blocks into batches in stream order (for debugging and comparisons)."""
        pending: list[ActivationBlock] = []
        n_pending = 0
        for block in blocks:
            self.next_block = block.index + 1
            pending.append(block)
            n_pending += block.token_ids.shape[0]
            if n_pending < self.batch_size:
                continue
            rows = torch.cat([b.activations for b in pending])
            ids = torch.cat([b.token_ids for b in pending])
            n_full = n_pending // self.batch_size * self.batch_size
            for start in range(0, n_full, self.batch_size):
                self.rows_served += self.batch_size
                yield rows[start : start + self.batch_size], ids[start : start + self.batch_size]
            rest = ActivationBlock(block.index, rows[n_full:], ids[n_full:])
            pending, n_pending = ([rest] if n_pending > n_full else []), n_pending - n_full
