"""Activation workers: spawned processes give exactly the inline activations of their document shards, in
stream order, with memory bounded by their slots; a worker that fails or is killed surfaces as an error."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from crosscoder.config import DataConfig, SourcesConfig, WorkersConfig
from crosscoder.data.activations import valid_token_mask
from crosscoder.data.tokens import iter_token_batches, special_token_ids
from crosscoder.data.workers import WorkerPool, WorkerSetup, produce_blocks
from crosscoder.errors import ConfigError, WorkerError
from crosscoder.sources.models import load_runners
from crosscoder.sources.spec import SnapshotSpec

HOOK = "blocks.1.hook_resid_pre"
DATA = DataConfig(kind="toy", seq_len=16, model_batch_size=4, toy_documents=150)
MAX_TOKENS = DATA.model_batch_size * (DATA.seq_len - 1)


def setup_for(paths: list[str], rank: int = 0, world_size: int = 1) -> WorkerSetup:
    tokenizer = AutoTokenizer.from_pretrained(paths[0])
    bos, pad = special_token_ids(tokenizer)
    return WorkerSetup(sources=SourcesConfig(paths=paths, hook=HOOK), data=DATA,
                       specs=[SnapshotSpec(name=f"s{i}", path=p) for i, p in enumerate(paths)],
                       bos_id=bos, pad_id=pad, device="cpu", threads=1, rank=rank, world_size=world_size)


def start_pool(setup: WorkerSetup, workers: int, slots: int = 2) -> WorkerPool:
    return WorkerPool(WorkersConfig(num_workers=workers, slots=slots), setup, len(setup.specs), 32, MAX_TOKENS)


@pytest.fixture(scope="module")
def paths(tiny_snapshots: list) -> list[str]:
    return [str(s.path) for s in tiny_snapshots]


def test_workers_match_inline_activations_in_order(paths: list[str]) -> None:
    """Rank 1 of 2 with 2 workers, resumed at block 3: block j is worker j mod 2's batch j // 2 of document
    shard 1*2 + j mod 2 of 4, equal to the inline activations of those tokens."""
    setup = setup_for(paths, rank=1, world_size=2)
    tokenizer = AutoTokenizer.from_pretrained(paths[0])
    runners = load_runners(setup.sources, setup.specs, torch.device("cpu"))
    pool = start_pool(setup, workers=2)
    processes = list(pool.processes)
    try:
        blocks = list(itertools.islice(pool.iter_blocks(start=3), 6))
    finally:
        pool.close()
    assert all(not p.is_alive() for p in processes)
    assert [b.index for b in blocks] == list(range(3, 9))
    inline = [list(itertools.islice(produce_blocks(setup, tokenizer, runners, w, 2, 0), 5)) for w in (0, 1)]
    for block in blocks:
        expected = inline[block.index % 2][block.index // 2]
        assert expected.index == block.index
        assert torch.equal(block.token_ids, expected.token_ids)
        torch.testing.assert_close(block.activations, expected.activations, rtol=0, atol=1e-6)
        batch = list(itertools.islice(
            iter_token_batches(DATA, tokenizer, shard=2 + block.index % 2, n_shards=4), block.index // 2 + 1))[-1]
        assert torch.equal(block.token_ids, batch.input_ids[valid_token_mask(batch, setup.bos_id, setup.pad_id)])
    assert not torch.allclose(blocks[0].activations[:, 0], blocks[0].activations[:, 2])


def test_one_snapshot_twice_is_aligned_through_a_worker(paths: list[str]) -> None:
    """The same snapshot as two sources: every row is the same token, so both slices are identical."""
    pool = start_pool(setup_for([paths[1], paths[1]]), workers=1)
    try:
        blocks = list(itertools.islice(pool.iter_blocks(), 4))
    finally:
        pool.close()
    for block in blocks:
        assert torch.equal(block.activations[:, 0], block.activations[:, 1])
        assert block.activations.abs().sum() > 0


def test_back_pressure_and_a_killed_worker(paths: list[str]) -> None:
    """A trainer that stops reading leaves at most `slots` blocks waiting per worker (memory is bounded);
    SIGKILL leaves no traceback, yet the trainer raises within seconds naming the worker and exit code."""
    pool = start_pool(setup_for(paths), workers=2, slots=2)
    try:
        blocks = pool.iter_blocks()
        next(blocks)
        time.sleep(4)  # unthrottled, the workers would make dozens of blocks meanwhile
        waiting = [results.qsize() for results in pool.results]
        # Per worker: at most one block per slot, plus worker 1's unread "ready" message.
        assert max(waiting) <= 2 + 1, f"messages waiting per worker: {waiting}"
        os.kill(pool.processes[1].pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker 1 .*killed by SIGKILL"):
            for _ in blocks:
                pass
        assert time.monotonic() - started < 30  # seconds, not a hang
    finally:
        pool.close()


def test_a_worker_refusing_its_input_reports_one_line(paths: list[str], tmp_path: Path) -> None:
    """A worker whose snapshot cannot load reports the loader's one-line error to the trainer, as bad input."""
    setup = setup_for(paths)
    broken = WorkerSetup(sources=setup.sources, data=DATA, specs=[SnapshotSpec("gone", f"{tmp_path}/missing")],
                         bos_id=setup.bos_id, pad_id=setup.pad_id, device="cpu", threads=1)
    pool = start_pool(broken, workers=1)
    try:
        with pytest.raises(ConfigError, match=r"^activation worker 0: cannot load .*missing[^\n]*$"):
            next(pool.iter_blocks())
    finally:
        pool.close()
