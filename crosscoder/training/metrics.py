"""Training metrics: per-source MSE and explained variance, L0, dead latents, decoder norms."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the layout imports torch.distributed; metrics need only its type
    from crosscoder.parallel.layout import Layout


@torch.no_grad()
def reconstruction_metrics(
    normalized_input: torch.Tensor, normalized_reconstruction: torch.Tensor, codes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-source [S] MSE and explained variance 1 - ||x_s - x̂_s||^2 / ||x_s - mean(x_s)||^2, and L0 (per-snapshot
    codes [B, S, F]: the mean over snapshots of each snapshot's L0)."""
    x = normalized_input.float()
    error = (x - normalized_reconstruction.float()).pow(2).sum(dim=-1)  # [B, S]
    variance = (x - x.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1)  # [B, S]
    return {
        "mse": error.mean(dim=0),
        "explained_variance": 1 - error.sum(dim=0) / variance.sum(dim=0).clamp_min(1e-12),
        "l0": (codes > 0).float().sum(dim=-1).mean(),
    }


def fired_latents(codes: torch.Tensor) -> torch.Tensor:
    """[F] bool: the latents active on some token (in some snapshot) of codes [B, F] or [B, S, F] (codes are >= 0:
    one max per column, 5x cheaper than (codes > 0).any(0))."""
    return codes.reshape(-1, codes.shape[-1]).amax(dim=0) > 0


def fired_per_snapshot(codes: torch.Tensor) -> torch.Tensor:
    """[S, F] bool: the latents active on some token of each snapshot's codes [B, S, F]."""
    return codes.amax(dim=0) > 0


class DeadLatentTracker:
    """Counts tokens since each latent last fired; a latent silent for `dead_after_tokens` is dead. Shape [F], or
    [S, F] for one dictionary per snapshot (crosscoder.dictionary.independent)."""

    def __init__(self, shape: int | tuple[int, ...], dead_after_tokens: int, device: torch.device | str = "cpu"
                 ) -> None:
        self.dead_after_tokens = dead_after_tokens
        self.tokens_since_fired = torch.zeros(shape, dtype=torch.long, device=device)

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        """fired: bool of the tracker's shape (or flat), whether each latent fired in the last `n_tokens` tokens."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device).view_as(self.tokens_since_fired)] = 0

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens

    @property
    def dead_fraction(self) -> float:
        return self.dead_mask.float().mean().item()


DENSE_FREQUENCY = 0.1
"""A latent active on more than this share of tokens counts as dense."""


class FiringFrequency:
    """Per-latent firing frequency: the share of tokens each latent is active on ([F]; [S, F], in each snapshot,
    for per-snapshot codes). Sampled on log steps (each adds its whole global batch's counts), so a run with L log
    steps estimates it over L x batch tokens at no per-step cost."""

    def __init__(self, shape: int | tuple[int, ...], device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(shape, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, counts: torch.Tensor, tokens: int) -> None:
        self.counts += counts.to(self.counts).view_as(self.counts)
        self.tokens += tokens

    def frequency(self) -> torch.Tensor:
        """[F] (or [S, F]) float32 on the host; zeros before any sample."""
        return (self.counts / max(self.tokens, 1)).float().cpu()


def density_metrics(frequency: torch.Tensor) -> dict[str, float]:
    """Dense latents (> DENSE_FREQUENCY of tokens), latents never seen firing, and the median frequency of those
    that fired. A per-snapshot frequency [S, F] counts each latent by its most frequent snapshot."""
    frequency = latent_frequency(frequency)
    fired = frequency[frequency > 0]
    return {"density/dense_latents": float((frequency > DENSE_FREQUENCY).sum()),
            "density/never_fired_fraction": float((frequency == 0).float().mean()),
            "density/median_frequency": float(fired.median()) if fired.numel() else 0.0}


def latent_frequency(frequency: torch.Tensor) -> torch.Tensor:
    """[F]: the frequency itself, or a per-snapshot one [S, F] at each latent's most frequent snapshot."""
    return frequency.amax(dim=0) if frequency.dim() == 2 else frequency


def decoder_norm_summary(decoder_norms: torch.Tensor, source_names: list[str]) -> dict[str, float]:
    """Per-source mean decoder norm, keyed by snapshot name."""
    means = decoder_norms.float().mean(dim=0)
    return {name: means[i].item() for i, name in enumerate(source_names)}


def step_metrics(
    accelerator, layout: Layout, output, l1_coeff: float, scheduler, dead: DeadLatentTracker,  # noqa: ANN001
    source_names: list[str], tokens_per_second: float, firing: FiringFrequency,
) -> dict[str, float]:
    """Loss parts and per-source quality, averaged over the data ranks. Split by snapshot, each rank's losses are
    its snapshots' share (summed over its group) and its per-source values sit in its own columns (zeros
    elsewhere), so one sum over the world divided by data_parallel gives them all. Shared codes [B, F], and so
    L0, are the same on every rank of a group: their firing counts are summed over the world and divided by
    snapshot_parallel. Per-snapshot codes [B, S, F] are each rank's own snapshots': scattered to their columns,
    so the world's sum is the global batch's count; L0 is then also given per snapshot (`l0/<snapshot>`)."""
    recon = reconstruction_metrics(output.normalized_input, output.normalized_reconstruction, output.codes)
    n = len(source_names)
    per_snapshot = output.codes.dim() == 3
    counts = (output.codes > 0).sum(dim=0).float()  # [F] or [S_j, F]
    if per_snapshot:
        snapshot_l0 = layout.scatter(counts.sum(dim=1) / output.codes.shape[0])  # [S]
        l0_part = snapshot_l0.sum().reshape(1) / n
        counts = layout.scatter(counts.t()).t()
    else:
        snapshot_l0 = counts.new_zeros(0)
        l0_part = recon["l0"].float().reshape(1) / layout.snapshot_parallel
    local = torch.cat([
        torch.stack([output.loss.detach(), output.mse_loss.detach(), output.sparsity_loss.detach(),
                     output.aux_loss.detach()]).float(), l0_part,
        layout.scatter(recon["mse"].float()), layout.scatter(recon["explained_variance"].float()),
        snapshot_l0, counts.flatten(),
    ])
    summed = accelerator.reduce(local, "sum")
    figures = 5 + (3 if per_snapshot else 2) * n
    firing.add(summed[figures:] / (1 if per_snapshot else layout.snapshot_parallel),
               output.codes.shape[0] * layout.data_parallel)
    values = (summed[:figures] / layout.data_parallel).tolist()
    loss, mse_loss, sparsity_loss, aux_loss, l0 = values[:5]
    mse, ev, l0s = values[5 : 5 + n], values[5 + n : 5 + 2 * n], values[5 + 2 * n :]
    metrics = {
        "loss/total": loss, "loss/mse": mse_loss, "loss/sparsity": sparsity_loss, "loss/aux": aux_loss,
        "l0": l0, "dead_fraction": dead.dead_fraction, "lr": scheduler.get_last_lr()[0], "l1_coeff": l1_coeff,
        "tokens_per_second": tokens_per_second, "explained_variance/mean": sum(ev) / n,
        **density_metrics(firing.frequency()),
    }
    for name, source_mse, source_ev in zip(source_names, mse, ev, strict=True):
        metrics[f"mse/{name}"] = source_mse
        metrics[f"explained_variance/{name}"] = source_ev
    for name, source_l0 in zip(source_names, l0s, strict=False):  # per-snapshot codes only
        metrics[f"l0/{name}"] = source_l0
    return metrics
