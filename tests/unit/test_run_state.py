"""A run's resumable state (crosscoder.training.run_state): state_dict -> training state on disk -> load_state_dict
restores the scheduler, the dead-latent counters, the firing counts, the RNG, the step and the W&B run id, in the
format earlier versions wrote; a state of another shape is refused. Controls show the comparisons can fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from crosscoder.constants import TRAINER_STATE_FILE
from crosscoder.errors import CheckpointError
from crosscoder.sources.spec import SnapshotSpec
from crosscoder.training.metrics import DeadLatentTracker, FiringFrequency
from crosscoder.training.run_state import RunState
from crosscoder.training.schedules import lr_multiplier
from crosscoder.training.state import TrainingState, load_training_state

LEGACY_STATE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy" / "run" / "training_state" / "step_0000004"
SHAPE = (2, 16)  # [S, F]: per-snapshot counters
TOTAL_STEPS = 20


class _Stream:
    """The stream as a saved state sees it: a position and a shuffle buffer."""

    def __init__(self, next_block: int) -> None:
        self.next_block = next_block
        self.storage = torch.arange(12.0).reshape(3, 4) * next_block

    def full_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"kind": "online", "next_block": self.next_block, "lookahead": 0}, {"storage": self.storage}


def _run_state(decay_fraction: float = 0.5, shape: tuple[int, ...] = SHAPE) -> RunState:
    """A fresh run's state: LambdaLR over Adam as the trainer builds it (warm-up 4 steps, decay over the last
    `decay_fraction` of 20), zeroed counters."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, TOTAL_STEPS, 4, decay_fraction))
    specs = [SnapshotSpec(name=f"step{i}", path=f"/snapshots/{i}", step=i, fingerprint=f"sha-{i}") for i in (0, 4)]
    return RunState(scheduler, _Stream(next_block=0), DeadLatentTracker(shape, dead_after_tokens=1000),
                    FiringFrequency(shape), torch.tensor([0.5, 2.0]), specs, zero_stage=2,
                    run_config={"trainer": {"lr": 1e-3}})


def _advanced(steps: int = 10) -> RunState:
    """A run `steps` optimiser steps in (the next one decays the LR): scheduler stepped, latents firing at random,
    a W&B id."""
    state = _run_state()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        _step(state)
        state.dead.update(torch.rand(SHAPE, generator=generator) < 0.3, 64)
        state.firing.add(torch.randint(0, 64, SHAPE, generator=generator).double(), 64)
    state.step, state.wandb_run_id, state.stream = steps, "abc12345", _Stream(next_block=5)
    return state


def _step(state: RunState) -> None:
    state.scheduler.optimizer.step()  # no gradient: Adam leaves the parameter, the scheduler moves on
    state.scheduler.step()


def _lr(state: RunState) -> list[float]:
    return state.scheduler.get_last_lr()


def test_a_state_dict_loads_back_into_a_fresh_run() -> None:
    """In memory: what the trainer hands to save_training_state, laid back into a fresh run. (Through the disk and
    the real DeepSpeed engine: tests/unit/test_resume.py and test_legacy_formats.py.)"""
    source = _advanced()
    torch.manual_seed(1)
    saved = source.state_dict()  # the RNG state is taken here ...
    expected_draw = torch.rand(8)  # ... so this is the first draw of the resumed run
    target = _run_state()
    torch.manual_seed(99)
    # Controls: a fresh run differs in everything the load must restore.
    assert _lr(target) != _lr(source) and target.step == 0
    assert not torch.equal(target.dead.tokens_since_fired, source.dead.tokens_since_fired)
    assert not torch.equal(torch.rand(8), expected_draw)

    target.load_state_dict(saved)
    assert torch.equal(torch.rand(8), expected_draw)
    assert _lr(target) == _lr(source) and target.step == source.step == 10
    assert target.scheduler.state_dict()["last_epoch"] == source.scheduler.state_dict()["last_epoch"]
    for state in (source, target):  # the schedule goes on from the same point, not only the last LR
        _step(state)
    assert _lr(target) == _lr(source)
    assert torch.equal(target.dead.tokens_since_fired, source.dead.tokens_since_fired)
    assert torch.equal(target.firing.counts, source.firing.counts) and target.firing.tokens == 10 * 64
    assert target.wandb_run_id == "abc12345"
    assert saved.rank["next_block"] == 5 and torch.equal(saved.tensors["storage"], source.stream.storage)
    assert saved.trainer["input_scale"] == [0.5, 2.0] and saved.trainer["zero_stage"] == 2
    assert [spec["fingerprint"] for spec in saved.trainer["sources"]] == ["sha-0", "sha-4"]


def test_the_state_dict_keeps_the_format_earlier_versions_wrote() -> None:
    """save_training_state adds the step, the world size and the format version to the trainer part. Later
    versions only add keys (the run's wall time so far), which a load of an older state does without."""
    saved = _advanced().state_dict()
    legacy = json.loads((LEGACY_STATE / TRAINER_STATE_FILE).read_text())
    written = [*saved.trainer, "step", "world_size", "format_version"]
    assert [key for key in written if key in legacy] == list(legacy)
    assert [key for key in written if key not in legacy] == ["run_seconds"]
    assert set(saved.tensors) - {"storage"} == {"tokens_since_fired", "firing_counts", "rng_cpu"} | (
        {"rng_cuda"} if torch.cuda.is_available() else set())
    # What the stream is rebuilt from leaves the run's own tensors out.
    scalars, tensors = load_training_state(LEGACY_STATE, rank=0, world_size=1).stream_state
    assert "next_block" in scalars and not {"tokens_since_fired", "firing_counts", "rng_cpu"} & set(tensors)


def test_a_legacy_state_loads_and_an_older_one_starts_the_firing_frequency_afresh() -> None:
    """The legacy run's step-4 state (read only): its scheduler, counters and step come back. Without firing
    counts (states from before the firing frequency) the run's counts are reset, whatever they held."""
    legacy = load_training_state(LEGACY_STATE, rank=0, world_size=1)
    state = _run_state(shape=(16,))
    state.load_state_dict(legacy)
    assert state.step == 4 and state.scheduler.state_dict()["last_epoch"] == 4
    assert torch.equal(state.dead.tokens_since_fired, legacy.tensors["tokens_since_fired"])
    assert state.firing.tokens == legacy.trainer["firing_tokens"] > 0

    older = TrainingState(legacy.path, legacy.trainer, legacy.rank,
                          {key: value for key, value in legacy.tensors.items() if key != "firing_counts"})
    state.load_state_dict(older)
    assert state.firing.tokens == 0 and not state.firing.counts.any()


def test_a_state_of_another_shape_is_refused_and_another_schedule_diverges() -> None:
    saved = _advanced().state_dict()
    with pytest.raises(CheckpointError, match=r"tokens_since_fired has shape \(2, 16\), this run's has \(16,\)"):
        _run_state(shape=(16,)).load_state_dict(saved)

    tampered = _run_state()
    bad_firing = {**saved.tensors, "firing_counts": torch.zeros(3, 16)}
    with pytest.raises(CheckpointError, match="firing_counts has shape"):
        tampered.load_state_dict(type(saved)(saved.step, saved.trainer, saved.rank, bad_firing))
    assert tampered.step == 0, "a refused state must leave the run untouched"

    # The scheduler's lambda is the run's own, not saved: the same state under another decay goes elsewhere.
    same, other = _run_state(), _run_state(decay_fraction=0.9)
    for state in (same, other):
        state.load_state_dict(saved)
        _step(state)
    reference = _advanced()
    _step(reference)
    assert _lr(same) == _lr(reference) and _lr(other) != _lr(reference)
