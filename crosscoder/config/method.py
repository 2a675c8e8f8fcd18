"""The `method` group: one crosscoder, or a stack of single-snapshot dictionaries (independent, SAE-Track)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from crosscoder.config.values import one_of
from crosscoder.errors import ConfigError

MethodName = Literal["crosscoder", "independent", "sae_track"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)


@dataclass
class MethodConfig:
    """What is trained on the snapshots (issue 14): one crosscoder, or a stack of single-snapshot dictionaries of
    the `crosscoder` group's family (crosscoder.dictionary.stack)."""

    name: str = "crosscoder"
    """`crosscoder` (one dictionary over all snapshots), `independent` (one dictionary per snapshot, all trained
    at once from the same stream; split by snapshot, a rank trains its own snapshots'), or `sae_track` (a chain:
    snapshot 0 from scratch, each next one warm-started from the previous one's weights; training.sae_track)."""
    snapshot: str = ""
    """Train on this one snapshot (by name) only: a plain SAE of one checkpoint. SAE-Track's links set it."""
    first_tokens: int = 0
    """sae_track: tokens of the from-scratch first link (0: trainer.total_tokens)."""
    link_tokens: int = 0
    """sae_track: tokens of each warm-started link (0: first_tokens / 20, the paper's 300 M then 15 M)."""
    link_lr: float = 0.0
    """sae_track: learning rate of the warm-started links (0: trainer.lr / 10, the paper's 4e-4 then 4e-5)."""

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value of this group (the rules that join it with the sources
        and the layout are RunConfig's)."""
        one_of("method.name", self.name, METHOD_NAMES)
        if self.name == "sae_track":
            for key in ("first_tokens", "link_tokens"):
                if getattr(self, key) < 0:
                    raise ConfigError(f"method.{key}={getattr(self, key)} must be >= 0 (0: the default)")
            if self.link_lr < 0:
                raise ConfigError(f"method.link_lr={self.link_lr} must be >= 0 (0: trainer.lr / 10)")
        elif self.name != "crosscoder" and (self.first_tokens or self.link_tokens or self.link_lr):
            raise ConfigError(f"method.first_tokens, link_tokens and link_lr are SAE-Track's; method.name={self.name}")
