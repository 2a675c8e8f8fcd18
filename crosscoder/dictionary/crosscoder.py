"""The crosscoder: one latent code shared by S sources, a decoder vector per latent and source.

Shapes: input x [B, S, d]; encoder W_enc [S, d, F]; decoder W_dec [F, S, d]; codes f [B, F], or [B, S, F] for a
per-snapshot gate (crosscoder.dictionary.activations.SnapshotJumpReLU: a latent's code in each snapshot).

Input normalisation: each source is scaled by c_s = sqrt(d) / sqrt(E||x_s||^2), a buffer estimated once per
dataset. The module always takes *raw* activations and returns raw reconstructions; losses are computed in the
normalised space. `fold_normalization()` moves c into the weights (W_enc[s] * c_s, W_dec[:, s] / c_s,
b_dec[s] / c_s) and sets `is_folded`, after which the forward pass gives the same result without scaling,
so exported weights work on raw activations and nothing is folded twice.

Split by snapshot (crosscoder.parallel.layout): a module built with `snapshot_share` holds only those sources' W_enc,
W_dec, b_dec and scales (`SNAPSHOT_DIMS` says along which dim each is cut) and sums the partial pre-activations
and latent weights over its snapshot group through `reduction`; its losses are its own sources' share.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

from crosscoder.dictionary.activations import Activation, TopK
from crosscoder.dictionary.families import family
from crosscoder.dictionary.group import OneRank, SnapshotGroup
from crosscoder.dictionary.sparse import decode_active, dense_codes, gather_active, sorted_flat

SNAPSHOT_DIMS = {"W_enc": 0, "W_dec": 1, "b_dec": 0, "input_scale": 0}
"""The tensors split by snapshot and the dim that indexes the snapshot; the rest (b_enc, flags) is shared."""
INIT_CHUNK_ELEMENTS = 1 << 24
"""Elements of the whole decoder a snapshot rank draws at a time at init (64 MiB of float32)."""


class CrosscoderOutput(NamedTuple):
    """What one forward pass produces; losses are scalars, tensors are per token.

    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the output tensors to hook its parameter re-gather
    for backward only inside tuples, lists and dicts; in a dataclass the backward sees empty partitions.
    """

    loss: torch.Tensor
    mse_loss: torch.Tensor
    sparsity_loss: torch.Tensor
    aux_loss: torch.Tensor
    """AuxK's (TopK / BatchTopK with dead latents) or the pre-activation loss (JumpReLU); 0 otherwise."""
    codes: torch.Tensor
    """[B, F] latent activations ([B, S, F] for a per-snapshot gate)."""
    normalized_input: torch.Tensor
    """[B, S, d] the input in normalised space (what the loss compares against)."""
    normalized_reconstruction: torch.Tensor
    """[B, S, d] the reconstruction in normalised space."""


class Crosscoder(nn.Module):
    dictionaries_per_snapshot = False
    """One dictionary over all sources (crosscoder.dictionary.independent's module holds one per snapshot)."""

    def __init__(
        self,
        n_sources: int,
        d_model: int,
        dict_size: int,
        activation: str | Activation = "relu",
        *,
        k: int = 16,
        aux_k: int = 0,
        aux_coeff: float = 1 / 32,
        init_decoder_norm: float = 0.1,
        snapshot_share: range | None = None,
        reduction: SnapshotGroup | None = None,
        sparse_topk: bool = True,
        activation_options: dict | None = None,
        init: str = "matched_filter",
    ) -> None:
        """`snapshot_share`: the sources (of `n_sources`) this module holds, the rest living on the other ranks of
        `reduction`'s snapshot group; the weights are those slices of the whole crosscoder's initialisation.
        `sparse_topk`: TopK / BatchTopK training steps decode and back-propagate through the active latents only
        (crosscoder.dictionary.sparse); the same loss and gradients as the dense path, which False keeps.
        `activation_options`: keyword arguments of the activation's class (JumpReLU's bandwidth, ...).
        `init`: `matched_filter` (decoder rows of norm `init_decoder_norm`, encoder = decoder transpose) or
        `anthropic_2025` (W_dec ~ U(+-1/sqrt(n)), W_enc = (n/F) W_dec^T, n = S * d; then
        `initialize_encoder_bias` on data; the whole crosscoder only)."""
        super().__init__()
        if n_sources <= 0 or d_model <= 0 or dict_size <= 0:
            raise ValueError(
                f"n_sources={n_sources}, d_model={d_model}, dict_size={dict_size} must all be > 0"
            )
        share = range(n_sources) if snapshot_share is None else snapshot_share
        if not (len(share) and share.start >= 0 and share.stop <= n_sources):
            raise ValueError(f"snapshot_share={share} is not a non-empty part of the {n_sources} sources")
        self.total_sources, self.snapshot_share = n_sources, share
        self.reduction: SnapshotGroup = reduction or OneRank()
        n_sources = len(share)
        self.n_sources, self.d_model, self.dict_size = n_sources, d_model, dict_size
        if isinstance(activation, str):
            activation = family(activation).activation(k=k, dict_size=dict_size, **(activation_options or {}))
        if not activation.splits_by_snapshot and len(share) < self.total_sources:
            raise ValueError(f"{type(activation).__name__} cannot be split by snapshot yet")
        self.activation = activation
        self.aux_k = aux_k or max(1, d_model // 2)
        self.aux_coeff = aux_coeff
        self.sparse_topk = sparse_topk

        if init == "anthropic_2025":
            if len(share) < self.total_sources:
                raise ValueError("init=anthropic_2025 draws the whole decoder: it cannot be split by snapshot")
            width = self.total_sources * d_model
            decoder = (torch.rand(dict_size, n_sources, d_model) * 2 - 1) / math.sqrt(width)
            encoder = decoder.permute(1, 2, 0) * (width / dict_size)
        elif init == "matched_filter":
            # Random decoder rows with a small fixed norm per source; encoder = decoder transpose, so every
            # latent starts as a matched filter of its own decoder direction.
            decoder = _initial_decoder(dict_size, self.total_sources, d_model, share)
            decoder = decoder / decoder.norm(dim=-1, keepdim=True) * init_decoder_norm
            encoder = decoder.permute(1, 2, 0)
        else:
            raise ValueError(f"init={init!r} is not matched_filter or anthropic_2025")
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(encoder.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(n_sources, d_model))
        self.register_buffer("input_scale", torch.ones(n_sources))
        self.register_buffer("folded", torch.zeros((), dtype=torch.bool))
        # Read every forward: a host copy, so a GPU run does not wait on the device to learn it; the buffer is
        # what state dicts carry, and loading one refreshes the copy.
        self._folded = False
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_folded", bool(module.folded)))
        if len(share) < self.total_sources:
            # DeepSpeed's gradient norm sums these over the snapshot group and counts the shared b_enc once.
            for name in SNAPSHOT_DIMS:
                if isinstance(getattr(self, name), nn.Parameter):
                    getattr(self, name).model_parallel = True

    # ---- normalisation -------------------------------------------------------------------------------
    @property
    def is_folded(self) -> bool:
        return self._folded

    def set_input_scale(self, scale: torch.Tensor) -> None:
        if self.is_folded:
            raise RuntimeError("cannot change the input scale of a folded crosscoder")
        if scale.shape != (self.n_sources,) or not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError(f"input scale must be {self.n_sources} finite positive numbers, got {scale}")
        self.input_scale.copy_(scale)

    @torch.no_grad()
    def fold_normalization(self) -> None:
        """Move the input scale into the weights (idempotent via the `folded` flag)."""
        if self.is_folded:
            return
        scale = self.input_scale.to(self.W_enc.dtype)
        self.W_enc.mul_(scale[:, None, None])
        self.W_dec.div_(scale[None, :, None])
        self.b_dec.div_(scale[:, None])
        self.folded.fill_(True)
        self._folded = True

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale applied to the input before encoding, scale from model output space to normalised space)."""
        ones = torch.ones_like(self.input_scale)
        return (ones, self.input_scale) if self.is_folded else (self.input_scale, ones)

    @torch.no_grad()
    def initialize_encoder_bias(self, batches: list[torch.Tensor], firing_fraction: float) -> None:
        """b_enc such that each latent's gate opens on `firing_fraction` of the tokens of `batches` (raw [B, S, d]):
        b_i = g_i - q_i, q_i the (1 - p) quantile of (x W_enc)_i and g_i where the gate opens (0 for ReLU, theta_i
        for JumpReLU, theta_i / max_s n_is for a per-snapshot gate: open in its strongest snapshot). Anthropic's
        January 2025 initialisation; families without a gate (TopK) keep b_enc = 0."""
        gate = self.activation.gate_opening(self.decoder_norms())
        if gate is None:
            return
        if len(self.snapshot_share) < self.total_sources:
            raise ValueError("the encoder bias is initialised from the whole crosscoder's pre-activations")
        in_scale, _ = self._scales()
        x = (torch.cat(batches).to(self.W_enc.dtype) * in_scale[None, :, None]).flatten(1)  # [N, S * d]
        rank = min(x.shape[0], max(1, round(x.shape[0] * (1 - firing_fraction))))  # k-th smallest
        w_enc = self.W_enc.view(-1, self.dict_size)
        step = max(1, INIT_CHUNK_ELEMENTS // x.shape[0])  # latents at a time: [N, step] pre-activations
        for first in range(0, self.dict_size, step):
            pre = x @ w_enc[:, first : first + step]
            self.b_enc[first : first + step] = gate[first : first + step].to(pre.dtype) - pre.kthvalue(rank, 0).values

    @property
    def codes_per_snapshot(self) -> bool:
        """Codes [B, S, F] (a per-snapshot gate) rather than [B, F]."""
        return self.activation.per_snapshot

    def decoder_parameters(self) -> list[nn.Parameter]:
        """What `decoder_norms` reads (to gather under ZeRO-3)."""
        return [self.W_dec]

    # ---- maths ------------------------------------------------------------------------------------------
    def decoder_norms(self) -> torch.Tensor:
        """[F, S] per-source decoder norms in normalised space: n_{i,s} = ||W_dec[i, s]||."""
        _, out_scale = self._scales()
        return self.W_dec.norm(dim=-1) * out_scale[None, :]

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [B, F]: this module's sources' partial sum, summed over the snapshot group."""
        in_scale, _ = self._scales()
        x_in = x * in_scale[None, :, None].to(x.dtype)
        return self.reduction.partial_sum(torch.einsum("bsd,sdf->bf", x_in, self.W_enc), self.b_enc)

    def selection_weight(self, local_weight: torch.Tensor) -> torch.Tensor:
        """w_i = sum over all sources of ||W_dec[i, s]||, for activations that rank latents by it (no gradient
        flows through a ranking; the ReLU penalty uses each rank's own share, so its gradient stays local)."""
        return self.reduction.total(local_weight) if self.activation.ranks_by_decoder_norm else local_weight

    def latent_weight(self) -> torch.Tensor:
        """What the activation weighs latents by, this module's sources': sum_s ||W_dec[i, s]|| [F], or the norms
        [F, S] themselves for a per-snapshot gate."""
        return self.activation.latent_weight(self.decoder_norms())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes [B, F] ([B, S, F] for a per-snapshot gate) of raw activations [B, S, d]."""
        return self.activation(self.encode_pre(x), self.selection_weight(self.latent_weight()))

    def decode_normalized(self, codes: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """Normalised-space reconstruction [B, S, d] from codes [B, F] (or per-snapshot codes [B, S, F])."""
        equation = "bsf,fsd->bsd" if codes.dim() == 3 else "bf,fsd->bsd"
        model_space = torch.einsum(equation, codes, self.W_dec)
        if with_bias:
            model_space = model_space + self.b_dec
        return self._normalized(model_space)

    def _normalized(self, model_space: torch.Tensor) -> torch.Tensor:
        """Model-space [B, S, d] to normalised space: a multiply by the input scale once it is folded (1 before)."""
        if not self.is_folded:
            return model_space
        return model_space * self.input_scale[None, :, None].to(model_space.dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction [B, S, d] from codes [B, F] (or [B, S, F])."""
        return self.decode_normalized(codes) / self.input_scale[None, :, None]

    def forward(
        self,
        x: torch.Tensor,
        l1_coeff: float = 0.0,
        dead_mask: torch.Tensor | None = None,
    ) -> CrosscoderOutput:
        """x: raw activations [B, S, d]. dead_mask: [F] bool, latents the AuxK loss may revive."""
        if x.dim() != 3 or x.shape[1:] != (self.n_sources, self.d_model):
            raise ValueError(f"expected input [batch, {self.n_sources}, {self.d_model}], got {list(x.shape)}")
        if self.sparse_topk and self.training and isinstance(self.activation, TopK):
            return self._sparse_forward(x, dead_mask)
        pre = self.encode_pre(x)
        latent_weight = self.latent_weight()  # this module's sources
        codes = self.activation(pre, self.selection_weight(latent_weight))
        support = codes > 0 if self.activation.ranks_by_decoder_norm else None  # where d pre can be non-zero
        normalized_reconstruction = self.decode_normalized(codes)
        normalized_input = x * self.input_scale[None, :, None].to(x.dtype)

        mse_loss = squared_error(normalized_reconstruction, normalized_input)
        zero = mse_loss.new_zeros(())
        sparsity_loss = self.activation.penalty(codes, latent_weight) if self.activation.penalised else zero
        aux_loss = zero
        aux_coeff = self.aux_coeff
        if self.activation.preact_coeff:  # the family's auxiliary term (JumpReLU), in place of AuxK
            aux_loss, aux_coeff = self.activation.preactivation_loss(pre, latent_weight), self.activation.preact_coeff
        if dead_mask is not None and self.activation.uses_aux_loss and bool(dead_mask.any()):
            error = (normalized_input - normalized_reconstruction).detach()
            aux_loss, (aux_latents, aux_values) = self._aux_loss(pre, dead_mask, error)
            if support is not None:
                support = support | torch.zeros_like(support).scatter(1, aux_latents, aux_values > 0)
        if support is not None:
            self.reduction.restrict_gradient(support)
        loss = mse_loss + l1_coeff * sparsity_loss + aux_coeff * aux_loss
        return CrosscoderOutput(
            loss=loss,
            mse_loss=mse_loss,
            sparsity_loss=sparsity_loss,
            aux_loss=aux_loss,
            codes=codes,
            normalized_input=normalized_input,
            normalized_reconstruction=normalized_reconstruction,
        )

    def _aux_loss(
        self, pre: torch.Tensor, dead_mask: torch.Tensor, error: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """AuxK (Gao et al. 2024): the top dead latents must explain the residual error, so they get gradient.
        Returns the loss and the auxiliary (latents, values) [B, k_aux]. Decoded over those pairs only (the
        dense [B, F] aux codes would cost three more full products and their memory)."""
        values, latents = self._dead_top(pre, dead_mask)
        order = latents.argsort(dim=1)  # decode_active wants each row's latents ascending
        latents, values = latents.gather(1, order), values.gather(1, order)
        flat = (torch.arange(pre.shape[0], device=pre.device)[:, None] * self.dict_size + latents).flatten()
        w_dec = self.W_dec.view(self.dict_size, self.n_sources * self.d_model)
        # No decoder bias: the dead latents must explain the error by their directions alone.
        aux_reconstruction = self._normalized(decode_active(values.flatten(), flat, w_dec, pre.shape[0]).view_as(error))
        return self._aux_ratio(aux_reconstruction, error), (latents, values)

    def _dead_top(self, pre: torch.Tensor, dead_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, latent indices) [B, k_aux] of the largest ReLU'd pre-activations among the dead latents; the
        top-k runs over the dead columns only (a few percent of F in a healthy run)."""
        dead = dead_mask.nonzero().squeeze(1)
        values, positions = pre.index_select(1, dead).topk(min(self.aux_k, dead.numel()), dim=1)
        return values.relu(), dead[positions]

    def _aux_ratio(self, aux_reconstruction: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """AuxK MSE over the residual's variance, both over all sources (error is detached: a plain group sum)."""
        residual_variance = self.reduction.total((error - error.mean(dim=0)).pow(2).sum(dim=(1, 2)).mean())
        aux_mse = squared_error(aux_reconstruction, error)
        return aux_mse / residual_variance.clamp_min(1e-8)

    # ---- the sparse TopK step ---------------------------------------------------------------------------
    def _sparse_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None) -> CrosscoderOutput:
        """The dense forward's loss and gradients, with the decoder, its backward and the encoder's backward
        over the active (token, latent) pairs only (crosscoder.dictionary.sparse); `codes` is still the dense [B, F]."""
        batch, width = x.shape[0], self.n_sources * self.d_model
        in_scale, _ = self._scales()
        x_in = (x * in_scale[None, :, None].to(x.dtype)).reshape(batch, width)
        w_enc, w_dec = self.W_enc.view(width, self.dict_size), self.W_dec.view(self.dict_size, width)
        with torch.no_grad():  # the one product over all F latents (its backward is the sparse one below);
            # TopK ranks without a gradient. One rank: the bias is added inside the GEMM.
            pre = torch.addmm(self.b_enc, x_in, w_enc) if self.reduction.size == 1 else \
                self.reduction.total(x_in @ w_enc) + self.b_enc
            latent_weight = self.selection_weight(self.decoder_norms().sum(dim=1))
        flat = self.activation.select(pre, latent_weight)
        aux_flat = self._aux_selection(pre, dead_mask)
        chosen = flat if aux_flat is None else torch.cat([flat, aux_flat])
        values = gather_active(x_in, w_enc, self.b_enc, pre, chosen, self.reduction)
        reconstruction = decode_active(values[: flat.numel()], flat, w_dec, batch).view_as(x) + self.b_dec
        normalized_reconstruction = self._normalized(reconstruction)
        # Unfolded (training), the encoder's input already is the normalised input.
        normalized_input = x_in.view_as(x) if not self.is_folded else x * self.input_scale[None, :, None].to(x.dtype)
        mse_loss = squared_error(normalized_reconstruction, normalized_input)
        aux_loss = mse_loss.new_zeros(())
        if aux_flat is not None:
            aux_values = values[flat.numel() :]
            aux_reconstruction = self._normalized(decode_active(aux_values, aux_flat, w_dec, batch).view_as(x))
            error = (normalized_input - normalized_reconstruction).detach()
            aux_loss = self._aux_ratio(aux_reconstruction, error)
        return CrosscoderOutput(
            loss=mse_loss + self.aux_coeff * aux_loss, mse_loss=mse_loss, sparsity_loss=mse_loss.new_zeros(()),
            aux_loss=aux_loss, codes=dense_codes(values[: flat.numel()], flat, tuple(pre.shape)),
            normalized_input=normalized_input, normalized_reconstruction=normalized_reconstruction,
        )

    @torch.no_grad()
    def _aux_selection(self, pre: torch.Tensor, dead_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The AuxK pairs (the top `aux_k` dead latents of each token with a positive pre-activation: a zero
        the dense top-k picks, dead or not, adds nothing) as sorted flat indices, or None."""
        if dead_mask is None or not self.activation.uses_aux_loss or not bool(dead_mask.any()):
            return None
        values, indices = self._dead_top(pre, dead_mask)
        flat = torch.arange(pre.shape[0], device=pre.device)[:, None] * pre.shape[1] + indices
        return sorted_flat(flat[values > 0])


def _initial_decoder(dict_size: int, n_sources: int, d_model: int, share: range) -> torch.Tensor:
    """The whole crosscoder's random decoder [F, S, d] (one torch.randn draw), restricted to `share`.

    A snapshot rank draws it in chunks of latents and keeps its columns, so no rank holds the whole tensor and
    every layout starts from the one-rank weights. Chunked draws equal the single draw when every chunk (and
    the whole) has a multiple of 16 elements (torch fills normals 16 at a time); otherwise draw it whole."""
    if len(share) == n_sources:
        return torch.randn(dict_size, n_sources, d_model)
    row = n_sources * d_model
    chunk = max(16, INIT_CHUNK_ELEMENTS // row // 16 * 16)
    if (row * dict_size) % 16 or dict_size <= chunk:
        return torch.randn(dict_size, n_sources, d_model)[:, share.start : share.stop].clone()
    parts = [torch.randn(min(chunk, dict_size - first), n_sources, d_model)[:, share.start : share.stop].clone()
             for first in range(0, dict_size, chunk)]
    return torch.cat(parts)


def squared_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """E_b ||reconstruction_b - target_b||^2 summed over sources and dims; one fused kernel each way (the error is
    not materialised for autograd)."""
    return F.mse_loss(reconstruction, target, reduction="sum") / reconstruction.shape[0]


@torch.no_grad()
def mean_squared_norms(batches: list[torch.Tensor]) -> torch.Tensor:
    """[S] E||x_s||^2 over the given [B, S, d] batches (float64: summed over many tokens)."""
    if not batches:
        raise ValueError("no batches to estimate the input scale from")
    total = sum(b.double().pow(2).sum(dim=(0, 2)) for b in batches)
    return total / sum(b.shape[0] for b in batches)


def input_scale_from(mean_sq_norm: torch.Tensor, d_model: int) -> torch.Tensor:
    """c_s = sqrt(d) / sqrt(E||x_s||^2)."""
    if (mean_sq_norm <= 0).any():
        bad = (mean_sq_norm <= 0).nonzero().flatten().tolist()
        raise ValueError(f"sources {bad} have all-zero activations; cannot normalise them")
    return (math.sqrt(d_model) / mean_sq_norm.double().sqrt()).float()


def estimate_input_scale(batches: list[torch.Tensor]) -> torch.Tensor:
    """c_s = sqrt(d) / sqrt(E||x_s||^2) over the given [B, S, d] batches."""
    return input_scale_from(mean_squared_norms(batches), batches[0].shape[-1])
