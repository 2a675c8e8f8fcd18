"""The activation stream as the trainer sees it: online and cached activations agree, ranks read disjoint
tokens, a cache of other sources is refused, and a stream restarted from its saved position serves no row
twice."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from crosscoder.cli.cache import build_cache
from crosscoder.config import DataConfig, RunConfig, SourcesConfig
from crosscoder.data.activations import ActivationBlock, valid_token_mask
from crosscoder.data.cache_reader import CacheReader
from crosscoder.data.kinds import describe_sources
from crosscoder.data.shuffle import ShuffleBuffer
from crosscoder.data.stream import ActivationStream, StreamPosition, build_activation_stream, online_block_source
from crosscoder.data.tokens import iter_token_batches, special_token_ids
from crosscoder.errors import ConfigError, WorkerError
from crosscoder.sources.spec import SourceInfo
from tests.helpers import tiny_toy_config

BATCH = 96


def quiet(_: str) -> None:
    pass


def stream_config(toy_cache: Path, cache_dir: Path | None = None, shuffle_tokens: int = 0) -> RunConfig:
    """The tiny toy snapshots, snapshots run inline (worker processes have their own tests)."""
    cfg = tiny_toy_config(toy_cache, model_batch_size=4, toy_documents=150)
    cfg.data.workers.num_workers = 0
    cfg.data.shuffle.buffer_tokens = shuffle_tokens
    cfg.data.cache.dir = str(cache_dir) if cache_dir else None
    cfg.data.cache.shard_batches = 3
    cfg.trainer.batch_size, cfg.trainer.total_tokens = BATCH, BATCH * 20
    return cfg


def _groups(cfg: RunConfig) -> tuple[SourcesConfig, DataConfig]:
    """The two config groups a stream reads."""
    return cfg.sources, cfg.data


@pytest.fixture(scope="module")
def info(tiny_snapshots: list, toy_cache: Path) -> SourceInfo:
    return describe_sources(stream_config(toy_cache).sources, log=quiet)


@pytest.fixture(scope="module")
def cache_dir(info: SourceInfo, toy_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("acts") / "cache"
    cfg = stream_config(toy_cache, folder)
    cfg.data.cache.tokens = 5000  # room for two shuffled runs of a resume test
    build_cache(cfg, log=quiet)
    return folder


def rows(stream: ActivationStream, n: int) -> torch.Tensor:
    batches = list(itertools.islice(stream, n))
    assert len(batches) == n and all(b.shape == (BATCH, 3, 32) for b in batches)
    return torch.cat(batches)


def test_cache_reads_equal_online_activations(info: SourceInfo, toy_cache: Path, cache_dir: Path) -> None:
    with build_activation_stream(*_groups(stream_config(toy_cache)), info, 0, 1, BATCH, log=quiet) as online, \
         build_activation_stream(*_groups(stream_config(toy_cache, cache_dir)), info, 0, 1, BATCH, log=quiet) as cached:
        online_rows = rows(online, 15)
        cached_rows = rows(cached, 15)
    assert torch.equal(online_rows, cached_rows)


def test_a_finite_cache_ends_and_holds_what_was_asked(info: SourceInfo, toy_cache: Path, cache_dir: Path) -> None:
    cfg = stream_config(toy_cache, cache_dir, shuffle_tokens=512)
    with build_activation_stream(cfg.sources, cfg.data, info, 0, 1, BATCH, log=quiet) as stream:
        assert stream.available_tokens >= cfg.trainer.total_tokens
        served = sum(batch.shape[0] for batch in stream)
    assert cfg.trainer.total_tokens <= served <= stream.available_tokens


def test_two_ranks_read_their_own_document_shards(info: SourceInfo, toy_cache: Path) -> None:
    """Online (snapshots inline: one document shard per rank), rank r of 2 reads document shard r of 2."""
    cfg = stream_config(toy_cache)
    bos, pad = special_token_ids(info.tokenizer)
    for rank in (0, 1):
        blocks_from, close = online_block_source(cfg.sources, cfg.data, info, rank, 2, log=quiet)
        blocks = list(itertools.islice(blocks_from(0), 4))
        close()
        shard = list(itertools.islice(iter_token_batches(cfg.data, info.tokenizer, shard=rank, n_shards=2), 4))
        for j, (block, batch) in enumerate(zip(blocks, shard, strict=True)):
            assert block.index == j
            assert torch.equal(block.token_ids, batch.input_ids[valid_token_mask(batch, bos, pad)])


def test_two_ranks_split_every_cache_shard(cache_dir: Path) -> None:
    """From a cache, rank 0's rows then rank 1's rows of each shard are exactly that shard."""
    whole = list(CacheReader(cache_dir).iter_blocks())
    parts = [list(CacheReader(cache_dir, rank, 2).iter_blocks()) for rank in (0, 1)]
    for shard, first, second in zip(whole, *parts, strict=True):
        assert first.token_ids.shape[0] > 0 and second.token_ids.shape[0] > 0
        assert torch.equal(torch.cat([first.activations, second.activations]), shard.activations)
        assert torch.equal(torch.cat([first.token_ids, second.token_ids]), shard.token_ids)


def tagged(blocks_from: Callable[[int], Iterator[ActivationBlock]], pulled: list[int]
           ) -> Callable[[int], Iterator[ActivationBlock]]:
    """The same blocks with each row's token id replaced by a unique coordinate (block, row), recording which
    blocks were pulled: token ids repeat, coordinates do not."""
    def wrapped(start: int) -> Iterator[ActivationBlock]:
        for block in blocks_from(start):
            pulled.append(block.index)
            n = block.token_ids.shape[0]
            yield ActivationBlock(block.index, block.activations, block.index * 100_000 + torch.arange(n))
    return wrapped


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cache"])
def test_resumed_stream_serves_no_token_twice(info: SourceInfo, toy_cache: Path, cache_dir: Path,
                                             cached: bool) -> None:
    """Serve some shuffled batches, save the position, restart from it: the two runs share no token, and the
    restart begins right after the last block the first run touched."""
    cfg = stream_config(toy_cache, cache_dir if cached else None, shuffle_tokens=1024)
    source: Callable[[int], Iterator[ActivationBlock]]
    if cached:
        source, close = CacheReader(cache_dir).iter_blocks, (lambda: None)
    else:
        source, close = online_block_source(cfg.sources, cfg.data, info, 0, 1, log=quiet)
    served: list[set[int]] = []
    pulled: list[list[int]] = [[], []]
    position: StreamPosition | None = None
    for run in (0, 1):
        start = position.next_block if position else 0
        buffer = ShuffleBuffer(1024, BATCH, 0.5, seed=run)
        stream = ActivationStream("cache" if cached else "online", tagged(source, pulled[run]), buffer, 0, 1, start)
        ids = []
        for _ in range(6):
            next(stream)
            ids += stream.last_token_ids.tolist()
        assert len(ids) == len(set(ids)) == 6 * BATCH
        served.append(set(ids))
        position = StreamPosition.from_dict(stream.state_dict())
    close()
    assert served[0].isdisjoint(served[1])
    assert pulled[1][0] == max(pulled[0]) + 1


def test_a_position_from_another_stream_is_refused(info: SourceInfo, toy_cache: Path) -> None:
    position = StreamPosition(kind="cache", next_block=3, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="for a cache stream on rank 0 of 1 .* this run is a online stream"):
        build_activation_stream(*_groups(stream_config(toy_cache)), info, 0, 1, BATCH, position=position, log=quiet)
    cfg = stream_config(toy_cache)
    cfg.data.workers.num_workers = 2
    position = StreamPosition(kind="online", next_block=3, rank=0, world_size=1, document_shards=1)
    with pytest.raises(ConfigError, match="resume with the same value"):
        build_activation_stream(cfg.sources, cfg.data, info, 0, 1, BATCH, position=position, log=quiet)


def test_a_cache_of_another_hook_is_refused(toy_cache: Path, cache_dir: Path) -> None:
    cfg = stream_config(toy_cache, cache_dir)
    cfg.sources.hook = "blocks.0.hook_resid_post"
    other = describe_sources(cfg.sources, log=quiet)
    with pytest.raises(ConfigError, match=r"hook='blocks.1.hook_resid_pre'.*blocks.0.hook_resid_post"):
        build_activation_stream(cfg.sources, cfg.data, other, 0, 1, BATCH, log=quiet)


def _worker_process(name: str) -> multiprocessing.process.BaseProcess:
    return next(process for process in multiprocessing.active_children() if process.name == name)


def test_a_killed_worker_stops_the_next_batch(info: SourceInfo, toy_cache: Path) -> None:
    """Issue 23, case 15: SIGKILL to one of the workers while blocks it made still wait in its slots and rows in
    the shuffle buffer: once it is dead, the very next batch raises WorkerError naming it and its signal (not
    after the queued blocks and the buffer run dry), and the stream's position still resumes from there."""
    cfg = stream_config(toy_cache, shuffle_tokens=1024)
    cfg.data.workers.num_workers, cfg.data.workers.slots = 2, 4
    with build_activation_stream(cfg.sources, cfg.data, info, 0, 1, BATCH, log=quiet) as stream:
        rows(stream, 3)
        time.sleep(2)  # the workers fill every slot meanwhile
        victim = _worker_process("crosscoder-activation-worker-1")
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        position = stream.state_dict()
        with pytest.raises(WorkerError, match=r"^activation worker 1 \(pid \d+\) was killed by SIGKILL"):
            next(stream)
        assert stream.state_dict() == position  # nothing was consumed: a state saved now resumes exactly
