"""Activation functions of the crosscoder (the families registry by name: crosscoder.dictionary.families).

Each maps pre-activations [B, F] and a per-latent weight w_i = sum_s ||W_dec[i, s]|| to codes [B, F]; a
per-snapshot gate (`per_snapshot`) takes the decoder norms n [F, S] themselves and gives codes [B, S, F], latent i's
code in each snapshot. TopK variants rank latents by f_i * w_i (a latent with a large decoder contributes more to the
reconstruction) but keep the ReLU'd pre-activation as the code value, so the gradient reaches the encoder.
Penalised families also say their sparsity penalty (`penalty`, scaled by the warmed-up crosscoder.l1_coeff)
and any loss on the pre-activations (`preactivation_loss`, scaled by `preact_coeff`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from crosscoder.dictionary.sparse import batch_top, sorted_flat, sorted_pairs


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

    preact_coeff: float = 0.0
    """Weight of `preactivation_loss` in the loss (0: the family has none)."""
    splits_by_snapshot: bool = True
    """False when a learned parameter's gradient would need a sum over the snapshot group that is not made yet."""
    per_snapshot: bool = False
    """True when a latent has one code per snapshot ([B, S, F]) and its latent weight is the norms [F, S]."""

    def latent_weight(self, decoder_norms: torch.Tensor) -> torch.Tensor:
        """What `forward` and the losses weigh latents by, from the decoder norms [F, S]: their sum over snapshots."""
        return decoder_norms.sum(dim=1)

    def gate_opening(self, decoder_norms: torch.Tensor) -> torch.Tensor | None:
        """[F] the pre-activation above which each latent fires, or None where that depends on the other latents
        (TopK). What `Crosscoder.initialize_encoder_bias` aims the encoder bias at."""
        return None

    def forward(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def penalty(self, codes: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        """The sparsity penalty per token, averaged over the batch (penalised families)."""
        raise NotImplementedError

    def preactivation_loss(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ReLU(Activation):
    penalised = True

    def gate_opening(self, decoder_norms: torch.Tensor) -> torch.Tensor:
        return decoder_norms.new_zeros(self.dict_size)

    def forward(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def penalty(self, codes: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        """L1 of the codes weighted by their decoder norms: sum_i f_i w_i."""
        return (codes * latent_weight).sum(dim=1).mean()


class _JumpGate(torch.autograd.Function):
    """f = pre * 1[pre > theta] with the straight-through threshold gradient of Rajamanoharan et al. (2024):
    d f / d theta := -(theta / eps) * K((pre - theta) / eps), K the rectangle 1[|u| < 1/2]; d f / d pre is the
    gate itself. Chained through theta = exp(t), the log-threshold gets -(theta^2 / eps) * K: SAELens' choice,
    a factor theta from differentiating with respect to log theta directly (Anthropic, 2025)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:  # noqa: ANN001
        gate = pre > threshold
        ctx.save_for_backward(pre, threshold, gate)
        ctx.bandwidth = bandwidth
        return pre * gate

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:  # noqa: ANN001
        pre, threshold, gate = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad_out.dtype)  # K((pre - theta) / eps)
        grad_threshold = -(threshold / ctx.bandwidth) * (grad_out * near).sum(dim=0)
        return grad_out * gate, grad_threshold, None


class JumpReLU(Activation):
    """f_i = pre_i * 1[pre_i > theta_i], theta_i = exp(t_i) learned per latent, one gate shared by every snapshot
    (Anthropic's crosscoders, January 2025). Penalty sum_i tanh(c f_i w_i); pre-activation loss
    sum_i ReLU(theta_i - pre_i) w_i, which pulls latents that never fire back towards their threshold."""

    penalised = True
    splits_by_snapshot = False  # the thresholds' gradient: each rank's share only

    def __init__(self, k: int, dict_size: int, bandwidth: float = 0.5, initial_threshold: float = 1.0,
                 tanh_scale: float = 4.0, preact_coeff: float = 3e-6) -> None:
        super().__init__(k, dict_size)
        if bandwidth <= 0 or initial_threshold <= 0 or tanh_scale <= 0 or preact_coeff < 0:
            raise ValueError(f"JumpReLU needs bandwidth={bandwidth}, initial_threshold={initial_threshold} and "
                             f"tanh_scale={tanh_scale} > 0 and preact_coeff={preact_coeff} >= 0")
        self.bandwidth, self.tanh_scale, self.preact_coeff = bandwidth, tanh_scale, preact_coeff
        self.log_threshold = nn.Parameter(torch.full((dict_size,), math.log(initial_threshold)))

    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def gate_opening(self, decoder_norms: torch.Tensor) -> torch.Tensor:
        return self.threshold().detach()

    def forward(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        return _JumpGate.apply(pre, self.threshold(), self.bandwidth)

    def penalty(self, codes: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        """sum_i tanh(c f_i w_i): about L1 for small codes, about L0 (one per active latent) for large ones."""
        return torch.tanh(self.tanh_scale * codes * latent_weight).sum(dim=1).mean()

    def preactivation_loss(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        return ((self.threshold() - pre).relu() * latent_weight).sum(dim=1).mean()


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
        dense forward scatters and the sparse path decodes; crosscoder.dictionary.sparse)."""
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
        return sorted_flat(indices)


class _SnapshotGate(torch.autograd.Function):
    """codes[b, s, i] = pre[b, i] * 1[pre[b, i] n[s, i] > theta_i]: `_JumpGate` at the gate input pre * n, divided
    by n (f = JumpReLU(pre n) / n, which is pre where the gate is open). d codes / d pre is the gate; d codes / d n
    is 0 (pre n / n does not depend on n); theta gets the theta-space estimate -(theta / eps) K at the gate input,
    reached by the upstream gradient divided by n. Nothing [B, S, F] is saved: backward recomputes the gate."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, norms: torch.Tensor, threshold: torch.Tensor,  # noqa: ANN001
                bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, norms, threshold)
        ctx.bandwidth = bandwidth
        # Laid out [S, B, F] and returned as its [B, S, F] view: the per-snapshot decode (a batched product over
        # snapshots) then reads it in place instead of copying the widest tensor of the step.
        by_snapshot = pre[None]
        return torch.where(by_snapshot * norms[:, None, :] > threshold, by_snapshot, 0.0).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:  # noqa: ANN001
        pre, norms, threshold = ctx.saved_tensors
        grad_out = grad_out.transpose(0, 1)  # [S, B, F], as the forward laid it out
        gate_input = pre[None] * norms[:, None, :]
        grad_pre = torch.where(gate_input > threshold, grad_out, 0.0).sum(dim=0)
        near = (gate_input - threshold).abs_() < ctx.bandwidth / 2  # K((pre n - theta) / eps)
        per_norm = torch.where(near, grad_out, 0.0).sum(dim=1) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        grad_threshold = -(threshold / ctx.bandwidth) * per_norm.sum(dim=0)
        return grad_pre, None, grad_threshold, None


class SnapshotJumpReLU(JumpReLU):
    """One pre-activation, gated per snapshot (Ge et al. 2025, OpenMOSS lm-saes): f[s, i] = JumpReLU(pre_i n_is;
    theta_i) / n_is with n_is = ||W_dec[i, s]||, one threshold per latent, so a latent can be on in some snapshots
    and off in others; where it is on, its code is pre_i in every snapshot. Sparsity is tanh-quad: p_i, the mean
    over batch and snapshots of tanh(c f[s, i] n_is), enters as sum_i p_i (1 + p_i / frequency_scale), about L0 for
    rare latents and quadratic in the frequency of common ones. The threshold gradient is the same theta-space
    straight-through estimate as the shared gate's (`_JumpGate`), taken at the gate's input pre_i n_is."""

    per_snapshot = True

    def __init__(self, k: int, dict_size: int, bandwidth: float = 0.5, initial_threshold: float = 1.0,
                 tanh_scale: float = 4.0, preact_coeff: float = 0.0, frequency_scale: float = 0.01) -> None:
        super().__init__(k, dict_size, bandwidth, initial_threshold, tanh_scale, preact_coeff)
        if frequency_scale <= 0:
            raise ValueError(f"frequency_scale={frequency_scale} must be > 0")
        self.frequency_scale = frequency_scale

    def latent_weight(self, decoder_norms: torch.Tensor) -> torch.Tensor:
        return decoder_norms

    def gate_opening(self, decoder_norms: torch.Tensor) -> torch.Tensor:
        """The gate opens where pre_i n_is > theta_i: at theta_i / max_s n_is in the latent's strongest snapshot."""
        return self.threshold().detach() / decoder_norms.amax(dim=1).clamp_min(torch.finfo(decoder_norms.dtype).tiny)

    def forward(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        """pre [B, F], latent_weight the norms [F, S]: codes [B, S, F] (a zero norm keeps the latent off there)."""
        return _SnapshotGate.apply(pre, latent_weight.t(), self.threshold(), self.bandwidth)

    def frequency(self, codes: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        """[F] p_i = mean over batch and snapshots of tanh(c f[s, i] n_is), a differentiable firing frequency."""
        return torch.tanh(codes * (self.tanh_scale * latent_weight.t())).mean(dim=(0, 1))

    def penalty(self, codes: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        frequency = self.frequency(codes, latent_weight)
        return (frequency * (1 + frequency / self.frequency_scale)).sum()

    def preactivation_loss(self, pre: torch.Tensor, latent_weight: torch.Tensor) -> torch.Tensor:
        """sum_s sum_i ReLU(theta_i - pre_i n_is) n_is, batch mean: the shared gate's loss at each snapshot's gate."""
        norms = latent_weight.t()[None]
        return ((self.threshold() - pre[:, None, :] * norms).relu() * norms).sum(dim=(1, 2)).mean()
