"""Training metrics: per-source MSE and explained variance, L0, dead latents, decoder norms."""

from __future__ import annotations

import torch


@torch.no_grad()
def reconstruction_metrics(
    normalized_input: torch.Tensor, normalized_reconstruction: torch.Tensor, codes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-source [S] MSE and explained variance 1 - ||x_s - x̂_s||^2 / ||x_s - mean(x_s)||^2, and L0."""
    x = normalized_input.float()
    error = (x - normalized_reconstruction.float()).pow(2).sum(dim=-1)  # [B, S]
    variance = (x - x.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1)  # [B, S]
    return {
        "mse": error.mean(dim=0),
        "explained_variance": 1 - error.sum(dim=0) / variance.sum(dim=0).clamp_min(1e-12),
        "l0": (codes > 0).float().sum(dim=-1).mean(),
    }


class DeadLatentTracker:
    """Counts tokens since each latent last fired; a latent silent for `dead_after_tokens` is dead."""

    def __init__(self, dict_size: int, dead_after_tokens: int, device: torch.device | str = "cpu") -> None:
        self.dead_after_tokens = dead_after_tokens
        self.tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        """fired: [F] bool, whether each latent fired anywhere in the last `n_tokens` tokens."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device)] = 0

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens

    @property
    def dead_fraction(self) -> float:
        return self.dead_mask.float().mean().item()


def decoder_norm_summary(decoder_norms: torch.Tensor, source_names: list[str]) -> dict[str, float]:
    """Per-source mean decoder norm, keyed by snapshot name."""
    means = decoder_norms.float().mean(dim=0)
    return {name: means[i].item() for i, name in enumerate(source_names)}
