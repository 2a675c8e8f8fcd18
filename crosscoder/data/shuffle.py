"""The shuffle buffer: mixes tokens from many sequences (and documents) into every training batch.

Blocks arrive in stream order, one model batch (a few sequences) at a time; training on them in that order
would give batches drawn from a handful of documents. The buffer holds `capacity` rows. Once full, it serves
a random `refill_fraction` of its rows as batches, refilling each batch's slots from the stream, so within a
pass every row is served once: none twice, none dropped. Only at the end of a finite stream (a cache) is a
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
        self._blocks = iter(blocks)
        self._storage: torch.Tensor | None = None
        self._token_ids = torch.empty(self.capacity, dtype=torch.long)
        self._rows: torch.Tensor | None = None  # rows of the current block not yet in the buffer
        self._row_ids = torch.empty(0, dtype=torch.long)
        unfilled = self._fill(torch.arange(self.capacity))
        while unfilled.numel() == 0:
            # One round: a random `serve_rows` of the slots, batch by batch. Each served batch's slots are
            # refilled before the next batch is drawn, so the stream is asked for one batch of rows per step
            # (smooth demand the workers' slots can absorb) rather than half a buffer at once. New rows wait
            # for the next round: the rest of this round's slots are distinct from the ones refilled.
            chosen = torch.randperm(self.capacity, generator=self.generator)[: self.serve_rows]
            for chunk in chosen.split(self.batch_size):
                yield self._take(chunk)
                unfilled = self._fill(chunk)
                if unfilled.numel():
                    break
        if self._storage is None:
            return
        # A finite stream ended: serve what is left, in whole batches.
        occupied = torch.ones(self.capacity, dtype=torch.bool)
        occupied[unfilled] = False
        left = occupied.nonzero().squeeze(1)
        left = left[torch.randperm(left.shape[0], generator=self.generator)]
        for chunk in left[: left.shape[0] // self.batch_size * self.batch_size].split(self.batch_size):
            yield self._take(chunk)

    def _fill(self, slots: torch.Tensor) -> torch.Tensor:
        """Write stream rows into `slots`; return the slots left empty because the stream ended."""
        while slots.numel():
            if self._rows is None or self._rows.shape[0] == 0:
                block = next(self._blocks, None)
                if block is None:
                    return slots
                # Once any row of a block is inside, a resumed stream starts after it: no row is seen twice.
                self.next_block = block.index + 1
                if self._storage is None:
                    shape = (self.capacity, *block.activations.shape[1:])
                    self._storage = torch.empty(shape, dtype=block.activations.dtype)
                self._rows, self._row_ids = block.activations, block.token_ids
                continue
            n = min(self._rows.shape[0], slots.shape[0])
            self._storage.index_copy_(0, slots[:n], self._rows[:n])
            self._token_ids.index_copy_(0, slots[:n], self._row_ids[:n])
            self._rows, self._row_ids, slots = self._rows[n:], self._row_ids[n:], slots[n:]
        return slots

    def _take(self, slots: torch.Tensor) -> Batch:
        assert self._storage is not None
        self.rows_served += slots.shape[0]
        return self._storage.index_select(0, slots), self._token_ids.index_select(0, slots)  # copies

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
