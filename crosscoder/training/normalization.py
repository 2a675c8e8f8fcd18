"""Per-snapshot input scales c_s (x_s * c_s has E||x_s||^2 = d): estimated once at start-up over every data
rank, refused by snapshot name when they cannot be measured, restored from a training state on resume."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from crosscoder.config import RunConfig
from crosscoder.data.stream import ActivationStream
from crosscoder.dictionary.crosscoder import input_scale_from, mean_squared_norms
from crosscoder.errors import ConfigError
from crosscoder.parallel.layout import Layout
from crosscoder.sources.spec import SourceInfo
from crosscoder.training.state import TrainingState


def estimate_input_scale(
    cfg: RunConfig, accelerator, layout: Layout, stream: ActivationStream, sources: SourceInfo,  # noqa: ANN001
    resumed: TrainingState | None, log: Callable[[str], None],
) -> torch.Tensor:
    """[S] c_s of every snapshot: the saved one when resuming, ones without normalisation, else estimated from
    the first batches. Mean squared norms, not scales, are averaged over the data ranks, so the result is the
    one-rank estimate; each rank measures its own snapshots, and summed over the world the others' are zeros."""
    if resumed is not None:
        return resumed.input_scale
    if not cfg.crosscoder.normalize_inputs:
        return torch.ones(len(sources.specs))
    first = stream.peek(cfg.crosscoder.norm_estimation_batches)
    local = layout.scatter(mean_squared_norms(first)).to(accelerator.device)
    mean_sq = (accelerator.reduce(local, "sum") / layout.data_parallel).cpu()
    check_measurable(mean_sq, cfg, sources)
    input_scale = input_scale_from(mean_sq, sources.d_model)
    scales = zip(sources.specs, input_scale.tolist(), strict=True)
    log("input scales: " + ", ".join(f"{spec.name}={value:.3g}" for spec, value in scales))
    return input_scale


def check_measurable(mean_sq: torch.Tensor, cfg: RunConfig, sources: SourceInfo) -> None:
    """Refuse, naming the snapshot, activations whose scale cannot be measured: NaN/inf (bad weights, an
    overflow, a bad cache) or all zeros (a dead hook)."""
    for spec, value in zip(sources.specs, mean_sq.tolist(), strict=True):
        if math.isfinite(value) and value > 0:
            continue
        cause = "all-zero" if value == 0 else "NaN/inf"
        origin = f"the activation cache {cfg.data.cache.dir}" if cfg.data.cache.dir else "the snapshot's weights"
        raise ConfigError(
            f"snapshot {spec.name!r} gives {cause} activations at {sources.hook} in the first "
            f"{cfg.crosscoder.norm_estimation_batches} batches (mean squared norm {value}): check {origin}"
        )
