"""The `deepspeed` and `parallel` groups: how DeepSpeed shards the crosscoder, and how ranks split the snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crosscoder.config.values import one_of, positive
from crosscoder.errors import ConfigError


@dataclass
class DeepSpeedConfig:
    """The parallelism plan: how DeepSpeed shards the crosscoder and its optimiser state."""

    zero_stage: int | None = None
    """ZeRO stage 0-3; None takes the accelerate launch config's stage, else 2 (0 with one data-parallel rank)."""
    offload_optimizer: str = "none"
    """none or cpu: keep Adam state in host memory."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged verbatim into the DeepSpeed JSON config (expert knobs)."""

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value of this group."""
        one_of("deepspeed.offload_optimizer", self.offload_optimizer, ("none", "cpu"))
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")


@dataclass
class ParallelConfig:
    """How the ranks of a launch split the work: world = data_parallel x snapshot_parallel (parallel.layout)."""

    snapshot_parallel: int = 1
    """Ranks that share one token stream and split the snapshots between them (each loads and runs only its own
    snapshots and holds only their slice of the crosscoder); the world size divided by it is the data-parallel
    size, over which ZeRO shards. 1: every rank runs every snapshot."""
    token_check_every: int = 1
    """Steps between checks that a snapshot group's ranks train on the same tokens (one tiny all-reduce;
    0 disables)."""
    sparse_topk_gradient: bool = True
    """TopK / BatchTopK: the backward sums only the active entries of d pre over the snapshot group (their
    codes are k-sparse and the same on every rank) instead of all B x F; identical result, less traffic."""

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value of this group."""
        positive("parallel.snapshot_parallel", self.snapshot_parallel)
        if self.token_check_every < 0:
            raise ConfigError(f"parallel.token_check_every={self.token_check_every} must be >= 0 (0: off)")
