"""Activation workers: spawned processes that each read their own document shard, tokenize it, run every
snapshot on the same tokens and hand paired activation blocks to the trainer through shared memory.

Worker w of W on rank r of N reads document shard r*W + w of N*W (`data.tokens`), so the trainer process never
tokenizes and no two workers read the same document. Worker w makes blocks w, w + W, w + 2W, ... of the
rank's stream; the trainer takes them round-robin, so the order is fixed by (N, W) and a position (the next
block index) says where every worker resumes. Each worker writes a block into one of its own shared-memory
slots and waits for a free slot before the next: memory stays at W x slots blocks whatever the speeds
(back-pressure). A worker that raises sends its traceback; one that dies without a word (killed, out of
memory) is noticed by its exit code at the trainer's next batch (`WorkerPool.check_alive`, which the stream calls
before serving each one), or within `POLL_SECONDS` while the trainer waits for a block.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from crosscoder.config import DataConfig, SourcesConfig, WorkersConfig
from crosscoder.data.activations import ActivationBlock, paired_block
from crosscoder.data.tokens import iter_token_batches
from crosscoder.errors import ConfigError, WorkerError
from crosscoder.sources.hooks import SnapshotRunner
from crosscoder.sources.models import load_runners, load_tokenizer
from crosscoder.sources.spec import SnapshotSpec

POLL_SECONDS = 0.5
"""How often a waiting trainer checks that its workers are alive (and a blocked worker that it should stop)."""


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to read its shard and run the snapshots (picklable: it crosses a spawn)."""

    sources: SourcesConfig
    data: DataConfig
    specs: list[SnapshotSpec]
    bos_id: int
    pad_id: int | None
    device: str
    threads: int
    rank: int = 0
    world_size: int = 1
    cpus: tuple[int, ...] = ()


def resolve_worker_device(configured: str) -> str:
    """`auto`: the rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if configured != "auto":
        return configured
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def produce_blocks(
    setup: WorkerSetup, tokenizer: Any, runners: list[SnapshotRunner], worker: int,  # noqa: ANN401 (HF tokenizer)
    n_workers: int, start: int,
) -> Iterator[ActivationBlock]:
    """Blocks worker, worker + W, ... of the rank's stream, from the first one >= `start` on."""
    local_start = max(0, (start - worker + n_workers - 1) // n_workers)
    shard, n_shards = setup.rank * n_workers + worker, setup.world_size * n_workers
    batches = iter_token_batches(setup.data, tokenizer, shard=shard, n_shards=n_shards, start=local_start)
    device = torch.device(setup.device)
    for local, batch in enumerate(batches, start=local_start):
        yield paired_block(local * n_workers + worker, batch, runners, setup.bos_id, setup.pad_id, device)


def _worker_main(
    worker: int, n_workers: int, setup: WorkerSetup, activation_slots: torch.Tensor, token_slots: torch.Tensor,
    tasks: Any, free_slots: Any, results: Any, stop: Any, parent_pid: int,  # noqa: ANN401 (multiprocessing)
) -> None:
    """A worker's life: load tokenizer and snapshots, wait for the start position, then make blocks until
    stopped; wait for a free slot before writing each one."""
    # A SIGTERM to the job (SLURM preemption, a launcher stopping it) or a Ctrl-C in the terminal (SIGINT, sent to
    # the whole foreground process group) is the trainer's to handle: it saves its training state and stops the
    # workers; a worker dying first would only turn that into a data error.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        torch.set_num_threads(setup.threads)
        if setup.cpus:  # cores of their own, so the workers and the trainer do not take turns on the same ones
            os.sched_setaffinity(0, setup.cpus)
        tokenizer = load_tokenizer(setup.specs[0], setup.sources.trust_remote_code)
        runners = load_runners(setup.sources, setup.specs, torch.device(setup.device))
        results.put(("ready", worker, os.getpid(), [runner.name for runner in runners]))
        while True:  # wait for the start position, unless the trainer goes away first
            if os.getppid() != parent_pid:
                return
            try:
                start = tasks.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                continue
        if start is None:
            return
        for block in produce_blocks(setup, tokenizer, runners, worker, n_workers, start):
            n_tokens = block.token_ids.shape[0]
            while True:  # back-pressure: wait until the trainer has emptied one of our slots
                if stop.is_set() or os.getppid() != parent_pid:  # told to stop, or the trainer is gone
                    return
                try:
                    slot = free_slots.get(timeout=POLL_SECONDS)
                    break
                except queue.Empty:
                    continue
            activation_slots[slot, :n_tokens].copy_(block.activations)
            token_slots[slot, :n_tokens].copy_(block.token_ids)
            results.put(("block", block.index, slot, n_tokens))
        results.put(("end", worker))
    except ConfigError as error:  # bad input (a snapshot refused at load, a bad data file): one line will do
        results.put(("error", worker, traceback.format_exc(), str(error)))
    except BaseException:  # noqa: BLE001 - whatever it was, the trainer must hear of it
        results.put(("error", worker, traceback.format_exc(), None))


def _raise_worker_error(worker: int, message: tuple) -> None:
    """A worker's ("error", worker, traceback, config_message) report as the trainer's exception: bad input as a
    one-line ConfigError, anything else with the worker's traceback."""
    if message[3] is not None:
        raise ConfigError(f"activation worker {worker}: {message[3]}")
    raise WorkerError(f"activation worker {worker} failed:\n{message[2]}")


def _died_without_a_word(worker: int, process: Any) -> str:  # noqa: ANN401 (a multiprocessing Process)
    code = process.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else \
        f"exited with code {code}"
    return (f"activation worker {worker} (pid {process.pid}) {how} without a word "
            "(out of memory? killed by hand or by the OOM killer?)")


class WorkerPool:
    """W spawned workers making this rank's paired activation blocks; the trainer reads them in order."""

    def __init__(self, cfg: WorkersConfig, setup: WorkerSetup, n_sources: int, d_model: int,
                 max_tokens: int, on_loaded: Callable[[list[str]], None] | None = None) -> None:
        """`on_loaded` hears the names of the snapshots each worker loaded, once it is ready."""
        if cfg.num_workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {cfg.num_workers}")
        self.cfg, self.setup = cfg, setup
        context = mp.get_context("spawn")  # fork would copy the trainer's threads and process-group state
        self.processes: list[Any] = []
        self.tasks: list[Any] = []
        self.free_slots: list[Any] = []
        self.results: list[Any] = []
        self.activation_slots: list[torch.Tensor] = []
        self.token_slots: list[torch.Tensor] = []
        self.ready = [False] * cfg.num_workers
        self.on_loaded = on_loaded
        self.started = time.monotonic()
        self.stop = context.Event()
        self.blocks_received = 0
        """Blocks received so far (this rank)."""
        self._iterating = False
        for worker in range(cfg.num_workers):
            activations = torch.zeros((cfg.slots, max_tokens, n_sources, d_model)).share_memory_()
            tokens = torch.zeros((cfg.slots, max_tokens), dtype=torch.long).share_memory_()
            tasks, free_slots, results = context.Queue(), context.Queue(), context.Queue()
            for slot in range(cfg.slots):
                free_slots.put(slot)
            process = context.Process(
                target=_worker_main, name=f"crosscoder-activation-worker-{worker}", daemon=True,
                args=(worker, cfg.num_workers, setup, activations, tokens, tasks, free_slots, results, self.stop,
                      os.getpid()),
            )
            process.start()
            self.processes.append(process)
            self.tasks.append(tasks)
            self.free_slots.append(free_slots)
            self.results.append(results)
            self.activation_slots.append(activations)
            self.token_slots.append(tokens)

    def iter_blocks(self, start: int = 0) -> Iterator[ActivationBlock]:
        """The rank's blocks from index `start` on, in order (block j comes from worker j mod W). Once per pool."""
        if self._iterating:
            raise RuntimeError("a worker pool streams once; build a new one to restart from another position")
        self._iterating = True
        for tasks in self.tasks:
            tasks.put(start)
        index = start
        while True:
            self.check_alive()  # before taking a block a dead worker left queued
            block = self._receive(index, index % self.cfg.num_workers)
            if block is None:  # a finite corpus ran out in this worker's shard
                return
            self.blocks_received += 1
            yield block
            index += 1

    def _receive(self, index: int, worker: int) -> ActivationBlock | None:
        while True:
            try:
                message = self.results[worker].get(timeout=POLL_SECONDS)
            except queue.Empty:
                self._check_alive(worker)
                continue
            kind = message[0]
            if kind == "ready":
                self.ready[worker] = True
                if self.on_loaded is not None:
                    self.on_loaded(message[3])
                continue
            if kind == "error":
                _raise_worker_error(worker, message)
            if kind == "end":
                return None
            _, got_index, slot, n_tokens = message
            if got_index != index:
                raise WorkerError(f"activation worker {worker} returned block {got_index}, expected {index}")
            block = ActivationBlock(
                index,
                self.activation_slots[worker][slot, :n_tokens].clone(),
                self.token_slots[worker][slot, :n_tokens].clone(),
            )
            self.free_slots[worker].put(slot)
            return block

    def check_alive(self) -> None:
        """WorkerError now if any worker died by a signal or a non-zero exit (one non-blocking waitpid each).
        Called before every batch, so a death is noticed at once, not after the blocks the worker left in its
        slots and the rows already in the shuffle buffer are used up. A worker only exits 0 after its last
        message ("end" or its error), which `_receive` reads in stream order."""
        for worker, process in enumerate(self.processes):
            if process.exitcode:  # None while it runs
                raise WorkerError(_died_without_a_word(worker, process))

    def _check_alive(self, worker: int) -> None:
        process = self.processes[worker]
        if not process.is_alive():
            try:  # it may have sent its traceback just before exiting
                message = self.results[worker].get(timeout=POLL_SECONDS)
                if message[0] == "error":
                    _raise_worker_error(worker, message)
            except queue.Empty:
                pass
            raise WorkerError(_died_without_a_word(worker, process))
        waited = time.monotonic() - self.started
        if not self.ready[worker] and waited > self.cfg.start_timeout_s:
            raise WorkerError(
                f"activation worker {worker} did not load its snapshots within data.workers.start_timeout_s="
                f"{self.cfg.start_timeout_s:g}s"
            )

    def close(self) -> None:
        """Stop the workers (politely, then firmly) and drop their queues without waiting on unread items."""
        self.stop.set()
        if not self._iterating:  # workers still waiting for their start position
            for tasks in self.tasks:
                tasks.put(None)
        deadline = time.monotonic() + 5.0
        for process in self.processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=2.0)
        for channel in (*self.tasks, *self.free_slots, *self.results):
            channel.cancel_join_thread()
            channel.close()
        self.processes, self.tasks, self.free_slots, self.results = [], [], [], []
        self.activation_slots, self.token_slots = [], []
