"""Every error type the package raises on purpose, and the exit codes the entry points turn them into.

A leaf: every floor may import it. A run either finishes or stops with one line naming the cause; the exit
status says what kind of stop it was (docs/resume-and-faults.md).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

EXIT_FAULT = 1
"""The run stopped on a fault (a dead worker, non-finite values, drifting ranks): see the message."""

EXIT_BAD_INPUT = 2
"""A value, file or folder was refused (at start-up, or when the run reached it)."""


class RunFault(RuntimeError):
    """The run stopped for the reason in the message; `state_dir`, when set, is where it can resume from."""

    exit_status = EXIT_FAULT

    def __init__(self, message: str, state_dir: Path | None = None, exit_status: int | None = None) -> None:
        super().__init__(message)
        self.state_dir = state_dir
        if exit_status is not None:
            self.exit_status = exit_status


class StorageError(RunFault):
    """A write failed: the disk is full, a quota or file-size limit was hit, or the folder is not writable."""

    exit_status = EXIT_BAD_INPUT


def exit_bad_input(prog: str, message: str) -> NoReturn:
    """A command-line tool's refusal of its input: one line on stderr (`prog: message`, newlines folded) and exit
    status EXIT_BAD_INPUT, no usage text (the arguments parsed; their content is what is wrong)."""
    print(f"{prog}: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the value."""

    on_every_rank: bool = False
    """Raised by a check every rank of a launch makes alike, before the ranks talk (`same_on_every_rank`): the
    entry point prints it once, from rank 0."""


@contextmanager
def same_on_every_rank() -> Iterator[None]:
    """Mark the ConfigErrors raised inside as ones every rank raises alike (start-up checks of the config, the
    disk and the snapshots' configs, before any collective), so a launch of N ranks prints one line, not N."""
    try:
        yield
    except ConfigError as error:
        error.on_every_rank = True
        raise


class DictionaryError(ValueError):
    """An exported dictionary (or the state about to be exported) is unusable; the message names the file or the
    tensor and the cause."""


class CheckpointError(RuntimeError):
    """A training-state folder is incomplete or corrupt; the message says which file and why."""


class WorkerError(RuntimeError):
    """An activation worker failed; the message carries its traceback or exit code."""


class TrainingInterrupted(RuntimeError):
    """A stop signal stopped the run after its training state was saved; resuming continues it."""

    def __init__(self, step: int, state_dir: Path, signum: int = signal.SIGTERM) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}; training state saved in {state_dir}")
        self.step, self.state_dir, self.signum = step, state_dir, signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class TokenDriftError(RuntimeError):
    """The snapshot ranks of one data index no longer see the same tokens."""
