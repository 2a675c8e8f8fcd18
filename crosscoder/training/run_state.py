"""A run's one resumable state, beside the DeepSpeed engine's own partitions (Meta Lingua's `TrainState`).

Everything a stopped run needs to continue exactly where it was, other than the parameters and Adam's moments
(only DeepSpeed can lay those ZeRO partitions back, crosscoder.training.state.load_engine_state), is here: the
step, the LR scheduler, the activation stream's full state, the dead-latent counters, the firing frequency, the RNG,
the W&B run id, the input scales, the sources (with their fingerprints), the ZeRO stage and the run config.
`state_dict()` is what a training state on disk holds (crosscoder.training.state writes, verifies and loads it;
the format is unchanged), `load_state_dict()` puts a saved one back into the live parts.

The stream, the input scales, the sources, the ZeRO stage and the config are read from a loaded `TrainingState`
before the run's parts exist (the stream is rebuilt from its state, the scales restored before they would be
estimated, the rest checked); `load_state_dict` restores what lives in parts built by then.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from crosscoder.errors import CheckpointError
from crosscoder.sources.spec import SnapshotSpec
from crosscoder.training.metrics import DeadLatentTracker, FiringFrequency
from crosscoder.training.state import (
    DEAD_TENSOR,
    FIRING_TENSOR,
    TrainingState,
    restore_rng,
    rng_tensors,
)


class Stateful(Protocol):
    """An LR scheduler (torch's, or accelerate's wrapper of one)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class ResumableStream(Protocol):
    """The activation stream as a saved state sees it (crosscoder.data.stream.ActivationStream)."""

    def full_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...


@dataclass
class RunStateDict:
    """What `RunState.state_dict()` returns: the parts `save_training_state` writes (it adds the step, the world
    size and the format version to `trainer`). The tensors are the live ones (as a module's state_dict gives
    them), the RNG states a copy taken by the call."""

    step: int
    trainer: dict[str, Any]
    """trainer_state.json: scheduler, wandb_run_id, sources, input_scale, zero_stage, config, firing_tokens,
    input_digests, run_seconds."""
    rank: dict[str, Any]
    """This rank's scalars: the stream's position and shuffle-buffer bookkeeping."""
    tensors: dict[str, torch.Tensor]
    """This rank's tensors: the stream's buffer and peeked batches, RNG, dead counters, firing counts."""


@dataclass
class RunState:
    """Everything a resume needs beyond the engine's partitions, as references to the run's live parts: saving
    reads them, loading writes into them, so the loop keeps using the same objects."""

    scheduler: Stateful
    stream: ResumableStream
    dead: DeadLatentTracker
    firing: FiringFrequency
    input_scale: torch.Tensor
    """[S] every snapshot's input scale (restored from the state before the engine is built)."""
    sources: list[SnapshotSpec]
    zero_stage: int
    run_config: dict[str, Any]
    step: int = 0
    """The optimiser steps done: where a resumed run's loop starts."""
    wandb_run_id: str | None = None
    """The W&B run this run logs into: the saved one after a load (the tracker resumes it), then the tracker's."""
    input_digests: dict[str, str] | None = None
    """Whole-content digests of the input files (an activation folder's, local snapshots' weights): a resume is
    checked against them."""
    earlier_seconds: float | None = 0.0
    """Wall seconds the run spent in its earlier sessions (a resumed run's; None: its state is from before run
    times were kept)."""
    session_started: float = field(default_factory=time.perf_counter)
    """When this session started (time.perf_counter), so a saved state carries the run's whole time."""

    def run_seconds(self) -> float | None:
        """The run's wall time so far, all sessions together (None when an earlier session's is unknown)."""
        if self.earlier_seconds is None:
            return None
        return self.earlier_seconds + time.perf_counter() - self.session_started

    def state_dict(self) -> RunStateDict:
        stream_scalars, stream_tensors = self.stream.full_state()
        trainer = {"scheduler": self.scheduler.state_dict(), "wandb_run_id": self.wandb_run_id,
                   "sources": [asdict(spec) for spec in self.sources], "input_scale": self.input_scale.tolist(),
                   "zero_stage": self.zero_stage, "config": self.run_config, "firing_tokens": self.firing.tokens}
        if self.input_digests is not None:
            trainer["input_digests"] = self.input_digests
        run_seconds = self.run_seconds()
        if run_seconds is not None:
            trainer["run_seconds"] = run_seconds
        tensors = {**stream_tensors, **rng_tensors(), DEAD_TENSOR: self.dead.tokens_since_fired,
                   FIRING_TENSOR: self.firing.counts}
        return RunStateDict(self.step, trainer, stream_scalars, tensors)

    def load_state_dict(self, saved: TrainingState | RunStateDict) -> None:
        """Restore the scheduler, the dead-latent counters, the firing counts (a state from before the firing
        frequency has none: it starts afresh), the RNG, the step and the W&B run id. The stream was built from
        the same state already (TrainingState.stream_state). A counter of another shape is refused: copying it
        would broadcast silently."""
        where = getattr(saved, "path", "the saved run state")
        counters = saved.tensors[DEAD_TENSOR]
        _check_shape(DEAD_TENSOR, counters, self.dead.tokens_since_fired, where)
        firing = saved.tensors.get(FIRING_TENSOR)
        if firing is not None:
            _check_shape(FIRING_TENSOR, firing, self.firing.counts, where)
        self.scheduler.load_state_dict(saved.trainer["scheduler"])
        self.dead.tokens_since_fired.copy_(counters)
        self.firing.counts.copy_(firing if firing is not None else torch.zeros_like(self.firing.counts))
        self.firing.tokens = int(saved.trainer["firing_tokens"]) if firing is not None else 0
        restore_rng(saved.tensors)
        self.step = saved.step
        self.wandb_run_id = saved.trainer.get("wandb_run_id")
        self.earlier_seconds = saved.trainer.get("run_seconds")


def _check_shape(name: str, saved: torch.Tensor, live: torch.Tensor, where: object) -> None:
    if saved.shape != live.shape:
        raise CheckpointError(f"{where}: {name} has shape {tuple(saved.shape)}, this run's has {tuple(live.shape)}")
