"""The shuffle buffer: mixes tokens from many sequences (and documents) into every training batch.

Blocks arrive in stream order, one model batch (a few sequences) at a time; training on them in that order
would give batches drawn from a handful of documents. The buffer holds `capacity` rows. Once full, it serves
a random `refill_fraction` of its rows as batches, refilling each batch's slots from the stream, so within a
pass every row is served once: none twice, none dropped. Only at the end of a finite stream (a cache) is a
remainder smaller than one batch left unserved. Memory is fixed: one [capacity, S, d] tensor, allocated once.

Between two batches the buffer's whole state (rows held, the round being served, the generator, the rows of
the current block not yet inside) is in `state_dict()`, so a resumed run serves exactly the batches an
uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from crosscoder.data.activations import ActivationBlock
from crosscoder.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
"""(activations [batch, S, d], token ids [batch])"""

_EMPTY_IDS = torch.empty(0, dtype=torch.long)


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
        self._storage: torch.Tensor | None = None
        self._token_ids = torch.empty(capacity, dtype=torch.long)
        self._round = _EMPTY_IDS  # slots of the current round, served in this order
        self._round_position = 0
        self._draining = False  # a finite stream ended: serve what is held, refill nothing
        self._started = False
        # Rows taken from the stream but not yet in the buffer (the rest of the current block; in order: the
        # rows short of a whole batch).
        self._rows: torch.Tensor | None = None
        self._row_ids = _EMPTY_IDS
        self._blocks: Iterator[ActivationBlock] = iter(())

    def batches(self, blocks: Iterable[ActivationBlock]) -> Iterator[Batch]:
        self._blocks = iter(blocks)
        next_batch = self._next_in_order if self.capacity == 0 else self._next_shuffled
        while (batch := next_batch()) is not None:
            yield batch

    # ---- shuffled -----------------------------------------------------------------------------------
    def _next_shuffled(self) -> Batch | None:
        if not self._started:
            self._started = True
            unfilled = self._fill(torch.arange(self.capacity))
            if self._storage is None:
                return None  # an empty stream
            if unfilled.numel():
                self._start_draining(unfilled)
        if self._round_position >= self._round.shape[0]:
            if self._draining:
                return None
            # A new round: a random `serve_rows` of the slots, served batch by batch. Each batch's slots are
            # refilled before the next batch is drawn, so the stream is asked for one batch of rows per step
            # (smooth demand the workers' slots can absorb) rather than half a buffer at once. New rows wait
            # for the next round: the rest of this round's slots are distinct from the ones refilled.
            self._round = torch.randperm(self.capacity, generator=self.generator)[: self.serve_rows]
            self._round_position = 0
        if not self._draining:
            # Fetch the refill's rows before taking the batch: a block source that fails (a dead worker, a corrupt
            # shard) then leaves the buffer exactly between two batches, so a state saved after it resumes exactly.
            self._prefetch(self.batch_size)
        chunk = self._round[self._round_position : self._round_position + self.batch_size]
        self._round_position += self.batch_size
        batch = self._take(chunk)
        if not self._draining:
            # Refilled now rather than on the next call, so the state between two batches is always whole.
            unfilled = self._fill(chunk)
            if unfilled.numel():
                self._start_draining(unfilled)
        return batch

    def _start_draining(self, unfilled: torch.Tensor) -> None:
        """A finite stream ended: the rest of the held rows, in random order and whole batches, is all that is left."""
        occupied = torch.ones(self.capacity, dtype=torch.bool)
        occupied[unfilled] = False
        left = occupied.nonzero().squeeze(1)
        left = left[torch.randperm(left.shape[0], generator=self.generator)]
        self._round = left[: left.shape[0] // self.batch_size * self.batch_size]
        self._round_position = 0
        self._draining = True

    def _next_block(self) -> bool:
        block = next(self._blocks, None)
        if block is None:
            return False
        # Once any row of a block is taken, a resumed stream starts after it: no row is seen twice.
        self.next_block = block.index + 1
        if self._rows is not None and self._rows.shape[0]:
            self._rows = torch.cat([self._rows, block.activations])
            self._row_ids = torch.cat([self._row_ids, block.token_ids])
        else:
            self._rows, self._row_ids = block.activations, block.token_ids
        return True

    def _prefetch(self, n_rows: int) -> None:
        """Take whole blocks from the stream until `n_rows` rows are pending (or the stream ends)."""
        while (self._rows is None or self._rows.shape[0] < n_rows) and self._next_block():
            pass

    def _fill(self, slots: torch.Tensor) -> torch.Tensor:
        """Write stream rows into `slots`; return the slots left empty because the stream ended."""
        while slots.numel():
            if (self._rows is None or self._rows.shape[0] == 0) and not self._next_block():
                return slots
            assert self._rows is not None
            if self._storage is None:
                self._storage = torch.empty((self.capacity, *self._rows.shape[1:]), dtype=self._rows.dtype)
            n = min(self._rows.shape[0], slots.shape[0])
            self._storage.index_copy_(0, slots[:n], self._rows[:n])
            self._token_ids.index_copy_(0, slots[:n], self._row_ids[:n])
            self._rows, self._row_ids, slots = self._rows[n:], self._row_ids[n:], slots[n:]
        return slots

    def _take(self, slots: torch.Tensor) -> Batch:
        assert self._storage is not None
        self.rows_served += slots.shape[0]
        return self._storage.index_select(0, slots), self._token_ids.index_select(0, slots)  # copies

    # ---- in order -----------------------------------------------------------------------------------
    def _next_in_order(self) -> Batch | None:
        """No shuffling: re-cut blocks into batches in stream order (for debugging and exact comparisons)."""
        while self._rows is None or self._rows.shape[0] < self.batch_size:
            if not self._next_block():
                return None
        assert self._rows is not None
        batch = self._rows[: self.batch_size], self._row_ids[: self.batch_size]
        self._rows, self._row_ids = self._rows[self.batch_size :], self._row_ids[self.batch_size :]
        self.rows_served += self.batch_size
        return batch

    # ---- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(scalars, tensors) between two batches: enough to serve exactly the batches that would have come next."""
        scalars = {"next_block": self.next_block, "rows_served": self.rows_served, "started": self._started,
                   "draining": self._draining, "round_position": self._round_position,
                   "capacity": self.capacity, "batch_size": self.batch_size, "serve_rows": self.serve_rows}
        tensors = {"generator": self.generator.get_state(), "round": self._round.clone(),
                   "pending_token_ids": self._row_ids.clone()}
        if self._rows is not None:
            tensors["pending_rows"] = self._rows.clone()
        if self._storage is not None:
            tensors["storage"] = self._storage
            tensors["storage_token_ids"] = self._token_ids
        return scalars, tensors

    def load_state_dict(self, scalars: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()` into a buffer built with the same capacity, batch size and refill fraction."""
        for key in ("capacity", "batch_size", "serve_rows"):
            if scalars[key] != getattr(self, key):
                raise ConfigError(
                    f"the saved shuffle buffer has {key}={scalars[key]}, this run {getattr(self, key)}; resume with "
                    "the same data.shuffle settings, trainer.batch_size and number of ranks"
                )
        self.next_block, self.rows_served = int(scalars["next_block"]), int(scalars["rows_served"])
        self._started, self._draining = bool(scalars["started"]), bool(scalars["draining"])
        self._round_position = int(scalars["round_position"])
        self.generator.set_state(tensors["generator"])
        self._round = tensors["round"].long()
        self._rows = tensors.get("pending_rows")
        self._row_ids = tensors["pending_token_ids"].long()
        if "storage" in tensors:
            self._storage = tensors["storage"]
            self._token_ids = tensors["storage_token_ids"].long()
