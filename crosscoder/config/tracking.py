"""The `tracking` group: Weights & Biases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from crosscoder.config.values import one_of

TrackingMode = Literal["online", "offline", "disabled"]
TRACKING_MODES: tuple[str, ...] = get_args(TrackingMode)


@dataclass
class TrackingConfig:
    """Weights & Biases."""

    mode: str = "offline"
    """online, offline (sync later with `wandb sync`) or disabled."""
    project: str = "crosscoder"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_artifacts: bool = True
    """Log each exported dictionary as a W&B artifact."""
    log_analysis: bool = True
    """Analyse each exported dictionary (report in <dictionary>/analysis) and log its feature table and plots."""

    def validate(self) -> None:
        one_of("tracking.mode", self.mode, TRACKING_MODES)
