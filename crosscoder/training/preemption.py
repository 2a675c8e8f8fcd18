"""SIGTERM (SLURM preemption, `scancel`, a launcher stopping its job) and Ctrl-C (SIGINT) ask the run to save
and stop.

The handler only sets a flag; the loop reduces it over all ranks with the step's other reduction, so every
rank saves the same step together, then raises `TrainingInterrupted`. A second Ctrl-C stops at once (Python's
KeyboardInterrupt), for a user who would rather not wait for the save.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs SIGTERM and SIGINT handlers for its lifetime (main thread only; elsewhere they never fire)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        """The first stop signal received, if any."""
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        if self.signum is None:
            self.signum = signum

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous = {}


