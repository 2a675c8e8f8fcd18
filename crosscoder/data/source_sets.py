"""Source sets: where a rank's paired activation blocks come from, behind one interface.

A source set yields `ActivationBlock`s ([n, S, d] activations of this rank's sources, row j of every source the
same token, with the tokens' ids) from a block index on, and says what a saved stream position of it is. The
stream (crosscoder.data.stream) shuffles and batches whatever set `crosscoder.data.kinds.open_source_set` picks,
and nothing past the stream knows which it was:

- `ModelSources`: the snapshots run online, by activation workers or inline (`sources.kind` hf / toy);
- `PlantedSources`: synthetic activations of a planted dictionary (`sources.kind=planted`);
- `CacheSources`: the tool's own activation cache (`data.cache.dir`);
- `FileSources`: activations the user already has (`sources.kind=files`, crosscoder.data.files).

Finite sets (a cache, files) report the tokens left for the rank; endless ones None.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from crosscoder.config import DataConfig, SourcesConfig
from crosscoder.data.activations import ActivationBlock
from crosscoder.data.tokens import special_token_ids
from crosscoder.data.workers import WorkerPool, WorkerSetup, produce_blocks, resolve_worker_device
from crosscoder.sources.models import load_runners
from crosscoder.sources.spec import SourceInfo


class SourceSet(Protocol):
    position_kind: str
    """What a saved stream position counts: `online` (token batches of this rank), `cache` or `files` (shards)."""
    document_shards: int
    """Online: workers per rank, each reading its own document shard (the token order depends on it); else 1."""
    snapshots_loaded: list[str]
    """Names of the snapshots this rank's workers (or inline runners) loaded; empty when none run."""

    def blocks(self, start: int) -> Iterator[ActivationBlock]:
        """This rank's blocks from index `start` on."""
        ...

    def tokens_from(self, start: int) -> int | None:
        """Tokens left for this rank from block `start` on; None for an endless set."""
        ...

    def check_alive(self) -> None:
        """Raise WorkerError if a process making the blocks died (cheap: the stream calls it every batch)."""
        ...

    def close(self) -> None:
        ...


def _columns(blocks: Iterator[ActivationBlock], share: range) -> Iterator[ActivationBlock]:
    """The same blocks with only the sources in `share`."""
    for block in blocks:
        yield ActivationBlock(block.index, block.activations[:, share.start : share.stop].contiguous(),
                              block.token_ids)


class PlantedSources:
    """Synthetic and cheap: every source is generated, and a snapshot rank keeps its own columns."""

    position_kind, document_shards = "online", 1

    def __init__(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, rank: int, world_size: int,
                 share: range) -> None:
        self.planted, self.rank, self.world_size = sources.planted, rank, world_size
        self.share = None if len(share) == len(info.specs) else share
        self.block_tokens = data.model_batch_size * (data.seq_len - 1)  # as many rows as a model batch
        self.snapshots_loaded: list[str] = []

    def blocks(self, start: int) -> Iterator[ActivationBlock]:
        from crosscoder.data.planted import planted_blocks

        blocks = planted_blocks(self.planted, self.rank, self.world_size, start, self.block_tokens)
        return blocks if self.share is None else _columns(blocks, self.share)

    def tokens_from(self, start: int) -> int | None:
        return None

    def check_alive(self) -> None:
        pass  # made in this process

    def close(self) -> None:
        pass


def _count(specs: list) -> str:
    snapshots = len({spec.snapshot_name for spec in specs})
    return f"{snapshots} snapshot(s)" if snapshots == len(specs) else f"{len(specs)} sources of {snapshots} snapshot(s)"


class ModelSources:
    """The snapshots of the rank's share, run on this data rank's token shards: by `data.workers.num_workers`
    spawned workers, or inline (0) as one worker would. Only the share's snapshots are loaded."""

    position_kind = "online"

    def __init__(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, rank: int, world_size: int,
                 share: range, log: Callable[[str], None], on_loaded: Callable[[list[str]], None] | None = None
                 ) -> None:
        self.on_loaded = on_loaded
        specs = info.specs[share.start : share.stop]
        bos, pad = special_token_ids(info.tokenizer)
        workers_cfg = data.workers
        self.setup = WorkerSetup(sources=sources, data=data, specs=specs, bos_id=bos, pad_id=pad,
                                 device=resolve_worker_device(workers_cfg.device), threads=workers_cfg.threads,
                                 rank=rank, world_size=world_size, cpus=tuple(workers_cfg.cpus))
        self.tokenizer = info.tokenizer
        self.document_shards = max(1, workers_cfg.num_workers)
        self.snapshots_loaded = []
        self.pool: WorkerPool | None = None
        if workers_cfg.num_workers == 0:
            self.runners = load_runners(sources, specs, torch.device(self.setup.device))
            self._record([runner.name for runner in self.runners])
            return
        max_tokens = data.model_batch_size * (data.seq_len - 1)  # BOS is never kept
        self.pool = WorkerPool(workers_cfg, self.setup, len(specs), info.d_model, max_tokens, self._record)
        log(f"started {workers_cfg.num_workers} activation worker(s) on {self.setup.device}, "
            f"{workers_cfg.slots} shared-memory slots each, running {_count(specs)}")

    def _record(self, names: list[str]) -> None:
        self.snapshots_loaded.extend(name for name in names if name not in self.snapshots_loaded)
        if self.on_loaded is not None:
            self.on_loaded(names)

    def blocks(self, start: int) -> Iterator[ActivationBlock]:
        if self.pool is not None:
            return self.pool.iter_blocks(start)
        return produce_blocks(self.setup, self.tokenizer, self.runners, 0, 1, start)

    def tokens_from(self, start: int) -> int | None:
        return None

    def check_alive(self) -> None:
        if self.pool is not None:  # inline snapshots run in this process
            self.pool.check_alive()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class _ShardReader(Protocol):
    tokens_per_rank: int

    def tokens_from(self, start: int) -> int: ...

    def iter_blocks(self, start: int = 0) -> Iterator[ActivationBlock]: ...


class ShardedSources:
    """A finite set read shard by shard (block index = shard index), each rank its own rows of every shard."""

    document_shards = 1

    def __init__(self, position_kind: str, reader: _ShardReader) -> None:
        self.position_kind, self.reader = position_kind, reader
        self.snapshots_loaded: list[str] = []

    def blocks(self, start: int) -> Iterator[ActivationBlock]:
        return self.reader.iter_blocks(start)

    def tokens_from(self, start: int) -> int | None:
        return self.reader.tokens_from(start)

    def check_alive(self) -> None:
        pass  # read in this process

    def close(self) -> None:
        pass
