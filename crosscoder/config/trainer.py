"""The `trainer` group: the optimisation loop, its schedule, checkpoints and resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from crosscoder.config.values import one_of, positive
from crosscoder.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass
class TrainerConfig:
    """The optimisation loop."""

    total_tokens: int = 600_000
    """Training tokens (all ranks together)."""
    batch_size: int = 1024
    """Tokens per optimiser step, all ranks together."""
    lr: float | None = None
    """Adam's learning rate; None: the family's recipe (crosscoder.config.recipes)."""
    lr_warmup_steps: int = 50
    lr_decay_fraction: float = 0.2
    """The LR decays linearly to 0 over this last fraction of training."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    """Gradient norm clip (0 disables)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (DeepSpeed mixed precision; bf16 on GPUs that have it)."""
    seed: int = 0
    log_every: int = 50
    """Steps between metric logs (decoder norms included)."""
    checkpoint_every: int = 0
    """Steps between exported dictionaries (0: only at the end)."""
    state_every: int = 250
    """Steps between training-state checkpoints a run can resume from (0: only when stopped by SIGTERM)."""
    keep_states: int = 2
    """Training states kept; an older one is deleted once a newer one is complete."""
    eval_tokens: int = 2048
    """Held-out tokens of the spliced-in LM loss run on each exported dictionary (crosscoder.evaluation.spliced: CE with
    each snapshot's hooked activation replaced by its reconstruction, by zero and by its mean); model sources only
    (planted ones have no LM); 0 skips it."""
    resume: str = "none"
    """`none`, `auto` (the latest complete training state under output_dir; a fresh start if there is none), or
    the path of one training-state folder."""

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value of this group."""
        one_of("trainer.precision", self.precision, PRECISIONS)
        positive("trainer.batch_size", self.batch_size)
        positive("trainer.total_tokens", self.total_tokens)
        positive("trainer.log_every", self.log_every)
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"trainer.lr={self.lr} must be > 0")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ConfigError(f"trainer.lr_decay_fraction={self.lr_decay_fraction} must be in [0, 1]")
        if self.checkpoint_every < 0:
            raise ConfigError(f"trainer.checkpoint_every={self.checkpoint_every} must be >= 0")
        if self.state_every < 0:
            raise ConfigError(f"trainer.state_every={self.state_every} must be >= 0 (0: only on SIGTERM)")
        positive("trainer.keep_states", self.keep_states)
        if self.eval_tokens < 0:
            raise ConfigError(f"trainer.eval_tokens={self.eval_tokens} must be >= 0 (0 skips the spliced-in "
                              "evaluation)")
        if not self.resume:
            raise ConfigError("trainer.resume='' must be none, auto or a training-state folder")
        if self.total_tokens < self.batch_size:  # zero steps would export the initial, untrained dictionary as final
            raise ConfigError(
                f"trainer.total_tokens={self.total_tokens} is less than one batch "
                f"(trainer.batch_size={self.batch_size}): the run would train zero steps"
            )
