"""The per-step health flags every rank must agree on before it updates.

A run either finishes or stops with one line naming the cause (the faults and their exit statuses are
crosscoder.errors; docs/resume-and-faults.md, "When things go wrong"). The health flags ride in the step's one
reduction, taken after the forward and before the backward: a non-finite batch or loss, or a rank whose
activation stream failed, stops every rank together before a bad update reaches the weights.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch

from crosscoder.parallel.layout import Layout


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
