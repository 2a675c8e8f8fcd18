"""The activation stream the trainer iterates: blocks (from a source set, crosscoder.data.source_sets: workers,
inline snapshots, planted draws, a cache or the user's files) -> shuffle buffer -> batches of exactly the rank's
micro batch, with a position that a resumed run restarts from.

Data rank r of N reads disjoint tokens: online, its own document shards (one per worker); from a cache or files,
its own row range of every shard. Split by snapshot, a rank reads (or runs) only its own snapshots' columns;
the ranks of one snapshot group share a data rank and so read the same tokens in the same order.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from crosscoder.config import DataConfig, SourcesConfig
from crosscoder.data.activations import ActivationBlock
from crosscoder.data.kinds import open_source_set, source_kind
from crosscoder.data.shuffle import ShuffleBuffer
from crosscoder.errors import ConfigError
from crosscoder.sources.spec import SourceInfo


@dataclass
class StreamPosition:
    """Where a rank's stream stands: blocks before `next_block` have been (at least partly) consumed."""

    kind: str
    """`online` (blocks are token batches of this rank), `cache` or `files` (blocks are shards)."""
    next_block: int
    rank: int
    world_size: int
    document_shards: int = 1
    """Online: workers per rank, each reading its own document shard (the token order depends on it)."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StreamPosition:
        return cls(**{key: raw[key] for key in ("kind", "next_block", "rank", "world_size", "document_shards")})


class ActivationStream:
    """An endless (online) or finite (cache) iterator of [micro_batch, S, d] float32 batches."""

    def __init__(self, kind: str, blocks: Callable[[int], Iterator[ActivationBlock]], buffer: ShuffleBuffer,
                 rank: int, world_size: int, start: int = 0, close: Callable[[], None] | None = None,
                 available_tokens: int | None = None, document_shards: int = 1,
                 check_alive: Callable[[], None] | None = None) -> None:
        """`check_alive` raises (WorkerError) when what makes the blocks has died; it is called before every batch,
        so a dead worker stops the next batch rather than the first one its queued blocks and the shuffle buffer
        no longer cover."""
        self.kind, self.rank, self.world_size, self.document_shards = kind, rank, world_size, document_shards
        self.available_tokens = available_tokens
        """Tokens left for this rank in a finite (cache) stream; None for an endless one."""
        self.buffer = buffer
        if not buffer.rows_served:
            buffer.next_block = start
        self._batches = buffer.batches(blocks(start))
        self._lookahead: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self._close = close
        self._check_alive = check_alive
        self.wait_seconds = 0.0
        """Time spent inside `next()`: the trainer waiting for data."""
        self.last_token_ids: torch.Tensor | None = None
        """Token ids of the rows of the last batch (the snapshot group's token check, tests, debugging)."""
        self.snapshots_loaded: list[str] = []
        """Names of the snapshots this rank's workers (or inline runners) loaded; empty when none run."""

    def __iter__(self) -> ActivationStream:
        return self

    def __next__(self) -> torch.Tensor:
        started = time.perf_counter()
        try:
            if self._check_alive is not None:  # before taking anything: a state saved after the error resumes here
                self._check_alive()
            activations, self.last_token_ids = self._lookahead.popleft() if self._lookahead else next(self._batches)
        finally:
            self.wait_seconds += time.perf_counter() - started
        return activations

    def peek(self, n: int) -> list[torch.Tensor]:
        """The next `n` batches, which `next()` will still serve (e.g. to estimate input scales before training)."""
        while len(self._lookahead) < n:
            batch = next(self._batches, None)
            if batch is None:  # a finite set too small for what start-up reads (checked earlier where it can be)
                raise ConfigError(f"the activations ended after {len(self._lookahead)} batches; {n} are needed "
                                  "before training starts (crosscoder.norm_estimation_batches)")
            self._lookahead.append(batch)
        return [activations for activations, _ in list(self._lookahead)[:n]]

    def unread(self, activations: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Put back the batch `next()` just served (a step that did not train on it), so it is served again and
        a state saved now still holds it."""
        self._lookahead.appendleft((activations, token_ids))

    def position(self) -> StreamPosition:
        """Restart point: a stream built from it skips every block this one has touched (rows still in the
        shuffle buffer are dropped, never served twice)."""
        return StreamPosition(self.kind, self.buffer.next_block, self.rank, self.world_size, self.document_shards)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.position())

    def full_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(scalars, tensors) for an exact resume: the position, the shuffle buffer's contents and any peeked
        batches. `build_activation_stream(..., state=...)` continues with exactly the batches that were next."""
        buffer_scalars, tensors = self.buffer.state_dict()
        for index, (activations, token_ids) in enumerate(self._lookahead):
            tensors[f"lookahead_{index}_activations"] = activations
            tensors[f"lookahead_{index}_token_ids"] = token_ids
        scalars = {**self.state_dict(), "buffer": buffer_scalars, "lookahead": len(self._lookahead)}
        return scalars, tensors

    def _restore_lookahead(self, scalars: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        for index in range(int(scalars["lookahead"])):
            self._lookahead.append((tensors[f"lookahead_{index}_activations"], tensors[f"lookahead_{index}_token_ids"]))

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> ActivationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def online_block_source(
    sources: SourcesConfig, data: DataConfig, info: SourceInfo, rank: int, world_size: int,
    log: Callable[[str], None] = print, share: range | None = None,
    on_loaded: Callable[[list[str]], None] | None = None,
) -> tuple[Callable[[int], Iterator[ActivationBlock]], Callable[[], None]]:
    """(blocks_from(start), close) of the sources' own activations (the snapshots run online, the planted draws)
    for the sources in `share`, whatever `data.cache.dir` says (what a cache is built from); `on_loaded` hears
    the loaded snapshots' names."""
    share = range(len(info.specs)) if share is None else share
    opened = source_kind(sources.kind).open(sources, data, info, rank, world_size, share, 0, log, on_loaded)
    return opened.blocks, opened.close


def build_activation_stream(
    sources: SourcesConfig, data: DataConfig, info: SourceInfo, rank: int, world_size: int, micro_batch: int,
    position: StreamPosition | None = None, log: Callable[[str], None] = print,
    state: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None, share: range | None = None,
) -> ActivationStream:
    """The stream of the source set the config asks for (crosscoder.data.kinds.open_source_set): a cache
    when `data.cache.dir` is set, else the snapshots run online, planted draws or the user's activation files.
    `rank` / `world_size` are the data rank and data-parallel size; `share` the sources this rank reads.

    `position` restarts after every block the saved stream touched (rows it held are skipped); `state` (from
    `ActivationStream.full_state()`) restores the shuffle buffer too, so the batches are exactly the ones that
    would have come next."""
    source_set = open_source_set(sources, data, info, rank, world_size, micro_batch, share, log)
    kind, shards = source_set.position_kind, source_set.document_shards
    if state is not None:
        position = StreamPosition.from_dict(state[0])
    start = 0
    if position is not None:
        saved = (position.kind, position.rank, position.world_size, position.document_shards)
        if saved != (kind, rank, world_size, shards):
            source_set.close()
            raise ConfigError(
                f"saved stream position is for a {position.kind} stream on rank {position.rank} of "
                f"{position.world_size} with {position.document_shards} document shard(s) per rank; this run is "
                f"a {kind} stream on rank {rank} of {world_size} with {shards} (data.workers.num_workers decides "
                "the shards of an online stream: resume with the same value)"
            )
        start = position.next_block
    shuffle = data.shuffle
    buffer = ShuffleBuffer(shuffle.buffer_tokens, micro_batch, shuffle.refill_fraction,
                           seed=shuffle.seed * 1_000_003 + rank * 7919 + start)
    if state is not None:
        buffer.load_state_dict(state[0]["buffer"], state[1])
    stream = ActivationStream(kind, source_set.blocks, buffer, rank, world_size, start, source_set.close,
                              available_tokens=source_set.tokens_from(start), document_shards=shards,
                              check_alive=source_set.check_alive)
    stream.snapshots_loaded = source_set.snapshots_loaded
    if state is not None:
        stream._restore_lookahead(*state)
    return stream
