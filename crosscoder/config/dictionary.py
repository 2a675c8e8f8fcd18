"""The `crosscoder` group: the dictionary, its family (activation) and the family's options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from crosscoder.config.values import one_of, positive
from crosscoder.errors import ConfigError

Family = Literal["relu", "topk", "batchtopk", "jumprelu", "snapshot_jumprelu"]
ACTIVATION_NAMES: tuple[str, ...] = get_args(Family)

JUMPRELU_FAMILIES = ("jumprelu", "snapshot_jumprelu")


InitScheme = Literal["matched_filter", "anthropic_2025"]
INIT_SCHEMES: tuple[str, ...] = get_args(InitScheme)


@dataclass
class JumpReLUConfig:
    """The JumpReLU families (dictionary.activations): a learned threshold per latent; `jumprelu` gates once for
    every snapshot with a tanh penalty, `snapshot_jumprelu` gates each snapshot with a tanh-quad one."""

    bandwidth: float | None = None
    """eps of the straight-through threshold gradient's rectangle kernel, in normalised pre-activation units
    (None: the family's recipe, crosscoder.config.recipes)."""
    initial_threshold: float | None = None
    """theta every latent starts with (normalised units: inputs have E||x_s||^2 = d; None: the recipe's)."""
    tanh_scale: float = 4.0
    """c in the penalty sum_i tanh(c f_i w_i) (scaled by crosscoder.l1_coeff, warmed up over l1_warmup_steps)."""
    preact_coeff: float | None = None
    """lambda_P of the pre-activation loss sum_i ReLU(theta_i - pre_i) w_i (0 turns it off; None: the recipe's)."""
    frequency_scale: float = 0.01
    """snapshot_jumprelu: the tanh-quad penalty sum_i p_i (1 + p_i / frequency_scale) turns quadratic in a latent's
    firing frequency p_i above about this."""


@dataclass
class CrosscoderConfig:
    """The dictionary: F latents shared by all snapshots, a decoder vector per latent and snapshot."""

    dict_size: int = 1024
    """F, the number of latents."""
    activation: str = "relu"
    """relu (with L1 of decoder norms), topk, batchtopk, jumprelu (a learned threshold, tanh penalty), or
    snapshot_jumprelu (the threshold applied per snapshot, a code per snapshot; tanh-quad penalty)."""
    k: int = 16
    """Active latents per token for topk / batchtopk (batchtopk keeps k * batch over the batch)."""
    l1_coeff: float | None = None
    """lambda of the sparsity penalty: ReLU's lambda * sum_i f_i * sum_s ||W_dec[i, s]||, JumpReLU's tanh one.
    None: the family's recipe (crosscoder.config.recipes: relu 0.5, jumprelu 5, snapshot_jumprelu 3)."""
    l1_warmup_steps: int | None = None
    """lambda rises linearly from 0 over these steps (ReLU and JumpReLU); None: the recipe's 5% of the steps."""
    jumprelu: JumpReLUConfig = field(default_factory=JumpReLUConfig)
    aux_k: int = 0
    """Dead latents used by the AuxK loss (topk / batchtopk); 0 means d/2 as in Gao et al."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss."""
    sparse_topk: bool = True
    """topk / batchtopk: decode and back-propagate through the active latents only (crosscoder/sparse.py), the
    dense path's loss and gradients at a fraction of its work; false takes the dense path."""
    dead_after_tokens: int = 200_000
    """A latent that has not fired in this many tokens counts as dead."""
    init: str | None = None
    """None: the family's recipe (anthropic_2025 for both JumpReLU families, else matched_filter).
    `matched_filter`: decoder rows of norm init_decoder_norm per snapshot, encoder = decoder transpose;
    `anthropic_2025` (Anthropic's January 2025 recipe): W_dec ~ U(+-1/sqrt(n)), W_enc = (n/F) W_dec^T with
    n = S * d, and b_enc set from the first batches so each latent fires on init_firing_fraction of tokens."""
    init_from: str = ""
    """An exported dictionary folder whose weights start this run (unfolded into normalised space; the optimizer
    and schedule start fresh): SAE-Track's warm start. Its activation, dict_size, width and snapshot count must
    match this run's. Replaces `init`."""
    init_firing_fraction: float = 0.0
    """anthropic_2025: the share of tokens each latent starts firing on; 0 means the published 10000 / F, capped at
    0.1 (a small dictionary would otherwise start dense)."""
    init_decoder_norm: float = 0.1
    """matched_filter: per-snapshot norm of each decoder row at init."""
    normalize_inputs: bool = True
    """Scale each snapshot to E||x_s||^2 = d (estimated once, saved, folded out at export)."""
    norm_estimation_batches: int = 8
    """Batches used to estimate the per-snapshot scale."""

    def activation_options(self) -> dict[str, Any]:
        """Keyword arguments of the activation's class beyond k (crosscoder.dictionary.crosscoder.Crosscoder)."""
        if self.activation not in JUMPRELU_FAMILIES:
            return {}
        options = asdict(self.jumprelu)
        if self.activation == "jumprelu":
            del options["frequency_scale"]
        return options

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value of this group."""
        one_of("crosscoder.activation", self.activation, ACTIVATION_NAMES)
        positive("crosscoder.dict_size", self.dict_size)
        positive("crosscoder.norm_estimation_batches", self.norm_estimation_batches)
        if self.activation in ("topk", "batchtopk"):
            positive("crosscoder.k", self.k)
            if self.k > self.dict_size:
                raise ConfigError(f"crosscoder.k={self.k} is larger than crosscoder.dict_size={self.dict_size}")
            if self.aux_k < 0 or self.aux_k > self.dict_size:
                raise ConfigError(f"crosscoder.aux_k={self.aux_k} must be in [0, dict_size={self.dict_size}]")
        if self.init is not None and self.init not in INIT_SCHEMES:
            raise ConfigError(f"crosscoder.init={self.init!r} is not one of {list(INIT_SCHEMES)}")
        if not 0 <= self.init_firing_fraction < 1:
            raise ConfigError(f"crosscoder.init_firing_fraction={self.init_firing_fraction} must be in [0, 1)")
        if self.activation in JUMPRELU_FAMILIES:
            j = self.jumprelu
            for key in ("bandwidth", "initial_threshold", "tanh_scale", "frequency_scale"):
                if getattr(j, key) is not None and not getattr(j, key) > 0:
                    raise ConfigError(f"crosscoder.jumprelu.{key}={getattr(j, key)} must be > 0")
            if j.preact_coeff is not None and j.preact_coeff < 0:
                raise ConfigError(f"crosscoder.jumprelu.preact_coeff={j.preact_coeff} must be >= 0")
        if self.l1_warmup_steps is not None and self.l1_warmup_steps < 0:
            raise ConfigError(f"crosscoder.l1_warmup_steps={self.l1_warmup_steps} must be >= 0")
        if self.l1_coeff is not None and self.l1_coeff < 0:
            raise ConfigError(f"crosscoder.l1_coeff={self.l1_coeff} must be >= 0")

    def firing_fraction(self) -> float:
        """init_firing_fraction, its 0 resolved to the published min(10000 / F, 0.1)."""
        return self.init_firing_fraction or min(10_000 / self.dict_size, 0.1)
