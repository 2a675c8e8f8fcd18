"""Activation functions of the crosscoder, by name (the architecture registry).

Each maps pre-activations [B, F] and a per-latent weight w_i = sum_s ||W_dec[i, s]|| to codes [B, F].
TopK variants rank latents by f_i * w_i (a latent with a large decoder contributes more to the
reconstruction) but keep the ReLU'd pre-activation as the code value, so the gradient reaches the encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from crosscoder.sparse import batch_top, sorted_flat, sorted_pairs


class Activation(nn.Module):
    penalised: bool = False
    """True when the loss adds lambda * sum_i f_i w_i (ReLU); TopK controls sparsity by construction."""
    uses_aux_loss: bool = False
    """True when dead latents get the AuxK loss."""
    ranks_by_decoder_norm: bool = False
    """True when codes depend on the latent weights (TopK selection): split by snapshot, they are all-reduced."""

    def __init__(self, k: int, dict_size: int) -> None:
        super().__init__()
        if dict_size <= 0:
            raise ValueError(f"dict_size={dict_size} must be > 0")
        self.k = k
        self.dict_size = dict_size

    def forward(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ReLU(Activation):
    penalised = True

    def forward(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        return pre.relu()


class TopK(Activation):
    """Keep the k largest f_i * w_i per token."""

    uses_aux_loss = True
    ranks_by_decoder_norm = True

    def __init__(self, k: int, dict_size: int) -> None:
        super().__init__(k, dict_size)
        if not 0 < k <= dict_size:
            raise ValueError(f"k={k} must be in [1, dict_size={dict_size}]")

    def forward(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        values = pre.relu()
        flat = self._select(values.detach(), latent_weight)
        return torch.zeros_like(values).view(-1).scatter(0, flat, values.view(-1).gather(0, flat)).view_as(values)

    def select(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        """The active (token, latent) pairs of a training step as sorted flat indices b·F + i, unique (what the
        dense forward scatters and the sparse path decodes; crosscoder.sparse)."""
        with torch.no_grad():  # one [B, F] temporary: the scores are ReLU'd in place
            return self._top(pre.relu().mul_(latent_weight))

    @torch.no_grad()
    def _select(self, values: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        """`select` from ReLU(pre) (the dense forward has it already)."""
        return self._top(values * latent_weight.detach())

    def _top(self, scores: torch.Tensor) -> torch.Tensor:
        """Sorted flat indices of the selected scores f_i * w_i [B, F]."""
        return sorted_pairs(scores.topk(self.k, dim=-1).indices, scores.shape[1])


class BatchTopK(TopK):
    """Keep the k * B largest f_i * w_i over the whole batch (Bussmann et al. 2024).

    In training the selection is per batch; in eval mode a fixed score threshold (a running mean of the smallest
    selected score) replaces it, so one token's code does not depend on the rest of its batch.
    """

    def __init__(self, k: int, dict_size: int, threshold_momentum: float = 0.01) -> None:
        super().__init__(k, dict_size)
        self.threshold_momentum = threshold_momentum
        self.register_buffer("threshold", torch.full((), -1.0))

    def forward(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        values = pre.relu()
        if not self.training and self.threshold >= 0:
            return values * (values * latent_weight.detach() > self.threshold)
        mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
        return values * mask.scatter(0, self._select(values.detach(), latent_weight), True).view_as(values)

    def _top(self, scores: torch.Tensor) -> torch.Tensor:
        """The k·B largest scores of the batch as sorted flat indices; in training also moves the eval threshold."""
        n_keep = min(self.k * scores.shape[0], scores.numel())
        top_scores, indices = batch_top(scores, n_keep, per_row=2 * self.k)
        if self.training:
            positive = top_scores[top_scores > 0]
            if positive.numel():
                smallest = positive.min()
                if self.threshold < 0:
                    self.threshold.copy_(smallest)
                else:
                    self.threshold.lerp_(smallest, self.threshold_momentum)
        return sorted_flat(indices, scores.numel())


ACTIVATIONS: dict[str, type[Activation]] = {"relu": ReLU, "topk": TopK, "batchtopk": BatchTopK}
