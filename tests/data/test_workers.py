"""Activation workers: spawned processes give exactly the inline activations, in stream order, with memory
bounded by their slots; a worker that fails or is killed surfaces as an error, not a hang."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoTokenizer

from crosscoder.config import DataConfig, SourcesConfig, WorkersConfig
from crosscoder.data.activations import paired_block
from crosscoder.data.tokens import TokenBatch, iter_token_batches, special_token_ids
from crosscoder.data.workers import WorkerError, WorkerPool, WorkerSetup
from crosscoder.sources import SnapshotSpec, load_runners

HOOK = "blocks.1.hook_resid_pre"
DATA = DataConfig(kind="toy", seq_len=16, model_batch_size=4, toy_documents=150)
MAX_TOKENS = DATA.model_batch_size * (DATA.seq_len - 1)


def setup_for(paths: list[str], threads: int = 1) -> WorkerSetup:
    sources = SourcesConfig(paths=paths, hook=HOOK)
    specs = [SnapshotSpec(name=f"s{i}", path=p) for i, p in enumerate(paths)]
    tokenizer = AutoTokenizer.from_pretrained(paths[0])
    bos, pad = special_token_ids(tokenizer)
    return WorkerSetup(sources=sources, specs=specs, bos_id=bos, pad_id=pad, device="cpu", threads=threads)


def token_batches(paths: list[str], n: int) -> list[tuple[int, TokenBatch]]:
    tokenizer = AutoTokenizer.from_pretrained(paths[0])
    return list(enumerate(itertools.islice(iter_token_batches(DATA, tokenizer), n)))


@pytest.fixture(scope="module")
def paths(tiny_snapshots: list) -> list[str]:
    return [str(s.path) for s in tiny_snapshots]


@pytest.fixture(scope="module")
def pool(paths: list[str]) -> Iterator[WorkerPool]:
    """Two workers with two slots each, shared by the tests that leave them healthy (spawning costs seconds)."""
    pool = WorkerPool(WorkersConfig(num_workers=2, slots=2), setup_for(paths), len(paths), 32, MAX_TOKENS)
    yield pool
    processes = list(pool.processes)
    pool.close()
    assert all(not p.is_alive() for p in processes)


def test_workers_match_inline_activations_in_order(paths: list[str], pool: WorkerPool) -> None:
    """Blocks from 2 workers equal the inline paired activations of the same token batches, in stream order,
    and carry the ids of exactly the tokens they belong to."""
    setup = pool.setup
    batches = token_batches(paths, 9)
    runners = load_runners(setup.sources, setup.specs, torch.device("cpu"))
    blocks = list(pool.iter_blocks(iter(batches)))
    assert [b.index for b in blocks] == list(range(9))
    for (index, batch), block in zip(batches, blocks, strict=True):
        expected = paired_block(index, batch, runners, setup.bos_id, setup.pad_id, torch.device("cpu"))
        assert torch.equal(block.token_ids, expected.token_ids)
        torch.testing.assert_close(block.activations, expected.activations, rtol=0, atol=1e-6)
    assert not torch.allclose(blocks[0].activations[:, 0], blocks[0].activations[:, 2])


def test_one_snapshot_twice_is_aligned_through_workers(paths: list[str]) -> None:
    """The same snapshot as two sources: every row is the same token, so both slices are identical."""
    setup = setup_for([paths[1], paths[1]])
    pool = WorkerPool(WorkersConfig(num_workers=1, slots=2), setup, 2, 32, MAX_TOKENS)
    try:
        blocks = list(pool.iter_blocks(iter(token_batches(paths, 5))))
    finally:
        pool.close()
    for block in blocks:
        assert torch.equal(block.activations[:, 0], block.activations[:, 1])
        assert block.activations.abs().sum() > 0


def test_back_pressure_bounds_the_batches_in_flight(paths: list[str], pool: WorkerPool) -> None:
    """A slow consumer never has more than workers x (slots + 1) token batches dealt and not yet received."""
    pulled = 0

    def counting(batches: list[tuple[int, TokenBatch]]) -> Iterator[tuple[int, TokenBatch]]:
        nonlocal pulled
        for item in batches:
            pulled += 1
            yield item

    received = 0
    for _ in pool.iter_blocks(counting(token_batches(paths, 20))):
        received += 1
        assert pulled - received < pool.cfg.num_workers * (pool.cfg.slots + 1)
        time.sleep(0.05)  # the trainer is the slow side
    assert received == 20


def test_a_killed_worker_raises_within_seconds(paths: list[str]) -> None:
    """SIGKILL leaves no traceback; the trainer still raises, naming the worker and its exit code."""
    pool = WorkerPool(WorkersConfig(num_workers=1, slots=2), setup_for(paths), len(paths), 32, MAX_TOKENS)
    processes = list(pool.processes)
    try:
        blocks = pool.iter_blocks(iter(token_batches(paths, 200)))
        next(blocks)  # the worker is up and working
        os.kill(pool.processes[0].pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker 0 .*exit code -9"):
            for _ in blocks:
                pass
        assert time.monotonic() - started < 30  # seconds, not a hang
    finally:
        pool.close()
    assert all(not p.is_alive() for p in processes)


def test_a_failing_worker_sends_its_traceback(paths: list[str], tmp_path: object) -> None:
    """A worker whose snapshot cannot load reports the loader's error text to the trainer."""
    setup = setup_for(paths)
    broken = WorkerSetup(sources=setup.sources, specs=[SnapshotSpec("gone", f"{tmp_path}/missing")],
                         bos_id=setup.bos_id, pad_id=setup.pad_id, device="cpu", threads=1)
    pool = WorkerPool(WorkersConfig(num_workers=1, slots=1), broken, 1, 32, MAX_TOKENS)
    try:
        with pytest.raises(WorkerError, match=r"(?s)worker 0 failed.*Traceback.*missing"):
            list(pool.iter_blocks(iter(token_batches(paths, 3))))
    finally:
        pool.close()
