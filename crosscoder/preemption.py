"""SIGTERM (SLURM preemption, `scancel`, a launcher stopping its job) asks the run to save and stop.

The handler only sets a flag; the loop reduces it over all ranks with the step's other reduction, so every
rank saves the same step together, then raises `TrainingInterrupted`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType


class StopRequest:
    """Installs a SIGTERM handler for its lifetime (main thread only; elsewhere it never fires)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]
            self._previous = None


class TrainingInterrupted(RuntimeError):
    """SIGTERM stopped the run after its training state was saved; `trainer.resume=auto` continues it."""

    def __init__(self, step: int, state_dir: Path) -> None:
        super().__init__(f"stopped by SIGTERM at step {step}; training state saved in {state_dir}")
        self.step, self.state_dir = step, state_dir
