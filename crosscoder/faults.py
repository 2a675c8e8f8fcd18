"""Faults that stop a run, and the per-step health flags every rank must agree on before it updates.

A run either finishes or stops with one line naming the cause. Each fault here carries the training state the
run can resume from (`state_dir`), so the entry point can print the exact resume command; its exit status
says what kind of stop it was (see README, "When things go wrong").

The health flags ride in the step's one reduction, taken after the forward and before the backward: a
non-finite batch or loss, or a rank whose activation stream failed, stops every rank together before a bad
update reaches the weights.
"""

from __future__ import annotations

import errno
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from crosscoder.layout import Layout

EXIT_FAULT = 1
"""The run stopped on a fault (a dead worker, non-finite values, drifting ranks): see the message."""
EXIT_BAD_INPUT = 2
"""A value, file or folder was refused (at start-up, or when the run reached it)."""

_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "a file-size limit was reached",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


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


LOW_SPACE_BYTES = 64 * 2**20
"""A write that failed with this little space left on its file system is taken to have failed for lack of it."""


def exit_bad_input(prog: str, message: str) -> NoReturn:
    """A command-line tool's refusal of its input: one line on stderr (`prog: message`, newlines folded) and exit
    status EXIT_BAD_INPUT, no usage text (the arguments parsed; their content is what is wrong)."""
    print(f"{prog}: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def exit_if_storage_failed(prog: str, error: OSError, fallback: str | Path) -> None:
    """A command-line tool's write that failed for want of storage (a full disk, read-only, no permission): one
    line naming the file, exit EXIT_BAD_INPUT. Returns for any other error, which the caller re-raises."""
    reason = write_failure_reason(error, Path(error.filename or fallback))
    if reason is not None:
        exit_bad_input(prog, f"cannot write {error.filename}: {reason}")


def write_failure_reason(error: BaseException, path: Path) -> str | None:
    """Why a write to `path` failed, in words, when the cause is the storage (None for anything else). torch's
    and safetensors' writers lose the errno (`enforce fail at inline_container.cc`), so a failure on a file
    system with almost no space left is put down to that."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _WRITE_ERRNOS:
            return f"{_WRITE_ERRNOS[seen.errno]} ([Errno {seen.errno}] {seen.strerror})"
        seen = seen.__cause__ or seen.__context__
    if "No space left" in str(error):
        return "no space left on the device"
    free, folder = _free_space(path)
    if free is not None and free < LOW_SPACE_BYTES:
        return f"no space left on the device ({free / 2**20:,.1f} MiB free on {folder})"
    return None


def _free_space(path: Path) -> tuple[int | None, Path | None]:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free, folder
    return None, None


@contextmanager
def writing(what: str, path: Path, state_dir: Path | None = None, hint: str = "") -> Iterator[None]:
    """Turn a storage failure while writing `what` at `path` into one StorageError line; other errors pass."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        reason = write_failure_reason(error, Path(path))
        if reason is None:
            raise
        raise StorageError(f"cannot write {what} {path}: {reason}{hint}", state_dir) from error


@dataclass
class StepHealth:
    """What the step's reduction told every rank, besides which latents fired."""

    nonfinite_sources: list[str]
    """Snapshots whose activations held NaN/inf in this step's batch, on any rank."""
    nonfinite_loss: bool
    data_failed: bool
    """Some rank's activation stream failed this step (its batch was zeros; nothing may be updated)."""
    stop_signal: int | None
    """SIGINT or SIGTERM when any rank was asked to stop (SIGINT wins: a person is waiting)."""

    @property
    def healthy(self) -> bool:
        return not (self.nonfinite_sources or self.nonfinite_loss or self.data_failed)


HEALTH_FLAGS = 4
"""Flags after the per-snapshot ones: non-finite loss, data failed, SIGTERM, SIGINT."""


def local_health(layout: Layout, batch: torch.Tensor, loss: torch.Tensor, data_failed: bool,
                 stop_signal: int | None) -> torch.Tensor:
    """This rank's [S + HEALTH_FLAGS] flags (snapshots outside its share are zeros, so a sum over the world
    counts the ranks that raised each flag)."""
    # [S_j]: a NaN/inf anywhere makes its snapshot's sum NaN/inf (one pass, 15x cheaper than isfinite per
    # element); a finite batch overflows float32 only with values ~1e31, which are as broken.
    nonfinite = (~torch.isfinite(batch.sum(dim=(0, 2), dtype=torch.float32))).float()
    loss_flag = (~torch.isfinite(loss.detach())).float().reshape(1)
    flags = torch.tensor([float(data_failed), float(stop_signal == signal.SIGTERM),
                          float(stop_signal == signal.SIGINT)], device=batch.device)
    return torch.cat([layout.scatter(nonfinite), loss_flag, flags])


def read_health(values: list[float], source_names: list[str]) -> StepHealth:
    """The summed flags of `local_health`, read back to the host (the trainer's one transfer per step)."""
    n = len(source_names)
    sources, (loss, data, sigterm, sigint) = values[:n], values[n : n + HEALTH_FLAGS]
    stop = signal.SIGINT if sigint > 0 else signal.SIGTERM if sigterm > 0 else None
    return StepHealth([name for name, flag in zip(source_names, sources, strict=True) if flag > 0],
                      loss > 0, data > 0, stop)


def nonfinite_message(health: StepHealth, step: int, normalized: bool) -> str:
    """The one line for a step that met NaN/inf, naming the snapshots (or the loss) and what to try."""
    if health.nonfinite_sources:
        names = ", ".join(repr(name) for name in health.nonfinite_sources)
        return (f"snapshot(s) {names} gave NaN/inf activations at step {step}: the snapshot's weights overflow at "
                "this hook (try sources.dtype=float32), or the activation cache holds bad values; stopped before "
                "the update, nothing exported")
    advice = "lower trainer.lr or keep trainer.grad_clip > 0" + ("" if normalized else
                                                                 ", or set crosscoder.normalize_inputs=true")
    return (f"the loss became NaN/inf at step {step}: the crosscoder diverged ({advice}); stopped before the "
            "update, nothing exported")
