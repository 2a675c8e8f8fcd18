"""Activation workers: spawned processes that run every snapshot on the same token batches.

The trainer process owns the token stream (so its position is known and resumable) and deals batch j to
worker j mod W. Each worker runs all snapshots on it and writes the paired block into one of its own
shared-memory slots; the trainer copies the block out and hands the slot back. A worker with no free slot
waits, so memory stays at W x slots blocks whatever the speeds (back-pressure). Blocks come back in stream
order. A worker that raises sends its traceback; one that dies without a word (killed, out of memory) is
noticed by its exit code within `POLL_SECONDS`.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from crosscoder.config import SourcesConfig, WorkersConfig
from crosscoder.data.activations import ActivationBlock, paired_block
from crosscoder.data.tokens import TokenBatch
from crosscoder.sources import SnapshotSpec, load_runners

POLL_SECONDS = 0.5
"""How often a waiting trainer checks that its workers are alive."""


class WorkerError(RuntimeError):
    """An activation worker failed; the message carries its traceback or exit code."""


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to load its snapshots (picklable: it crosses a spawn)."""

    sources: SourcesConfig
    specs: list[SnapshotSpec]
    bos_id: int
    pad_id: int | None
    device: str
    threads: int
    cpus: tuple[int, ...] = ()


def resolve_worker_device(configured: str) -> str:
    """`auto`: the rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if configured != "auto":
        return configured
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def _worker_main(
    worker: int, setup: WorkerSetup, activation_slots: torch.Tensor, token_slots: torch.Tensor,
    tasks: Any, free_slots: Any, results: Any, parent_pid: int,  # noqa: ANN401 (multiprocessing queues)
) -> None:
    """A worker's life: load the snapshots, then turn token batches into blocks until told to stop."""
    try:
        torch.set_num_threads(setup.threads)
        if setup.cpus:  # cores of their own, so the workers and the trainer do not take turns on the same ones
            os.sched_setaffinity(0, setup.cpus)
        device = torch.device(setup.device)
        runners = load_runners(setup.sources, setup.specs, device)
        results.put(("ready", worker, os.getpid()))
        while True:
            try:
                task = tasks.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent_pid:  # the trainer is gone: do not outlive it
                    return
                continue
            if task is None:
                return
            index, input_ids, attention_mask = task
            batch = TokenBatch(input_ids=input_ids, attention_mask=attention_mask)
            block = paired_block(index, batch, runners, setup.bos_id, setup.pad_id, device)
            n_tokens = block.token_ids.shape[0]
            slot = free_slots.get()  # back-pressure: wait until the trainer has emptied one of our slots
            activation_slots[slot, :n_tokens].copy_(block.activations)
            token_slots[slot, :n_tokens].copy_(block.token_ids)
            results.put(("block", index, slot, n_tokens))
    except BaseException:  # noqa: BLE001 - whatever it was, the trainer must hear of it
        results.put(("error", worker, traceback.format_exc()))


class WorkerPool:
    """W spawned workers turning this rank's token batches into paired activation blocks, in order."""

    def __init__(self, cfg: WorkersConfig, setup: WorkerSetup, n_sources: int, d_model: int,
                 max_tokens: int) -> None:
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
        self.started = time.monotonic()
        for worker in range(cfg.num_workers):
            activations = torch.zeros((cfg.slots, max_tokens, n_sources, d_model)).share_memory_()
            tokens = torch.zeros((cfg.slots, max_tokens), dtype=torch.long).share_memory_()
            tasks, free_slots, results = context.Queue(), context.Queue(), context.Queue()
            for slot in range(cfg.slots):
                free_slots.put(slot)
            process = context.Process(
                target=_worker_main, name=f"crosscoder-activation-worker-{worker}", daemon=True,
                args=(worker, setup, activations, tokens, tasks, free_slots, results, os.getpid()),
            )
            process.start()
            self.processes.append(process)
            self.tasks.append(tasks)
            self.free_slots.append(free_slots)
            self.results.append(results)
            self.activation_slots.append(activations)
            self.token_slots.append(tokens)

    def iter_blocks(self, token_batches: Iterator[tuple[int, TokenBatch]]) -> Iterator[ActivationBlock]:
        """Blocks for (index, batch) pairs, in the order given. Batches are dealt round-robin, at most
        slots + 1 queued per worker, so every worker stays busy and none runs far ahead."""
        n_workers = self.cfg.num_workers
        in_flight: deque[tuple[int, int]] = deque()  # (index, worker) dealt and not yet received, in order
        for dealt, (index, batch) in enumerate(token_batches):
            worker = dealt % n_workers
            self.tasks[worker].put((index, batch.input_ids, batch.attention_mask))
            in_flight.append((index, worker))
            if len(in_flight) >= n_workers * (self.cfg.slots + 1):
                yield self._receive(*in_flight.popleft())
        while in_flight:
            yield self._receive(*in_flight.popleft())

    def _receive(self, index: int, worker: int) -> ActivationBlock:
        while True:
            try:
                message = self.results[worker].get(timeout=POLL_SECONDS)
            except queue.Empty:
                self._check_alive(worker)
                continue
            kind = message[0]
            if kind == "ready":
                self.ready[worker] = True
                continue
            if kind == "error":
                raise WorkerError(f"activation worker {worker} failed:\n{message[2]}")
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

    def _check_alive(self, worker: int) -> None:
        process = self.processes[worker]
        if not process.is_alive():
            try:  # it may have sent its traceback just before exiting
                message = self.results[worker].get(timeout=POLL_SECONDS)
                if message[0] == "error":
                    raise WorkerError(f"activation worker {worker} failed:\n{message[2]}")
            except queue.Empty:
                pass
            raise WorkerError(
                f"activation worker {worker} (pid {process.pid}) died with exit code {process.exitcode} "
                "and no traceback (killed? out of memory?)"
            )
        waited = time.monotonic() - self.started
        if not self.ready[worker] and waited > self.cfg.start_timeout_s:
            raise WorkerError(
                f"activation worker {worker} did not load its snapshots within data.workers.start_timeout_s="
                f"{self.cfg.start_timeout_s:g}s"
            )

    def close(self) -> None:
        """Stop the workers (politely, then firmly) and drop their queues without waiting on unread items."""
        for tasks, process in zip(self.tasks, self.processes, strict=True):
            if process.is_alive():
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
