"""Latent scaling (Minder et al., NeurIPS 2025): is a latent whose decoder norm is small in a snapshot really
absent there, or did the L1 penalty shrink its decoder while the snapshot still holds its direction?

For latent i with code f_i(x_n) on tokens n, a unit direction u and a target y_{n,s} of snapshot s, the
least-squares scale of the latent's code along u is

    p_{i,s}(u, y) = argmin_p sum_n ||p f_i(x_n) u - y_{n,s}||^2 = sum_n f_i(x_n) <u, y_{n,s}> / sum_n f_i(x_n)^2,

the magnitude per unit code of u in y_s; beta = p / ||d|| is the same fit for the decoder vector d = ||d|| u,
the form of Minder et al. Two targets:
- error (drives the flag): y_s = x_s - x_hat_s + f_i W_dec[i, s], snapshot s's crosscoder reconstruction error
  with latent i's own contribution added back: what the rest of the dictionary leaves unexplained that i's
  code could account for. A direction another latent already reconstructs does not count here.
- activation: y_s = x_s, how much of the direction the snapshot's activation holds, whoever reconstructs it
  (co-firing features and other latents covering the direction raise it too).

Directions. Each latent gets a reference snapshot s*_i, its peak-norm snapshot, and the reference direction
u_i = W_dec[i, s*] / ||W_dec[i, s*]||; beta_{i,s} = p_{i,s}(u_i, y) / ||W_dec[i, s*]|| and
nu_{i,s} = beta_{i,s} / beta_{i,s*} (1 at s*, ~0 where the snapshot lacks the direction). The flag uses the
reference direction because at exactly the snapshots in question the latent's own decoder vector is
(nearly) zero and its direction is mostly noise. Snapshots of one model across training do not share a basis
exactly, so the fit along the latent's own snapshot-s direction is reported too (`nu_own`, error target,
against the same p at s*; NaN where W_dec[i, s] has no direction): a drifting feature shows a reference nu
lowered by roughly cos(u_i, true direction at s), so the flag errs towards "absent" (it misses an artefact
rather than inventing one), and nu_own tells the two apart where the own decoder still has a usable direction.

Everything is in the normalised space the crosscoder trains in (each snapshot scaled to E||x_s||^2 = d, where
the decoder norms the emergence analysis reads live): an exported dictionary is folded and takes raw
activations, so x and x_hat are multiplied by the input scale c_s and the folded W_dec[:, s] by c_s as well.
(beta along a snapshot's own direction is scale-free; across snapshots, as the reference fit is, it is not.)

Codes: `model.encode` gives [B, F] (one code for every snapshot) or, for per-snapshot-gated families,
[B, S, F] (f[b, s, i] is latent i's code in snapshot s); the fit at s uses the code at s, so a gated latent
that never opens at s has no fit (NaN) and no flag there.

Flag (tau = evolution.EMERGENCE_THRESHOLD): a live latent is a shrinkage artefact at snapshot s when its
decoder-norm ratio n_{i,s} / max_t n_{i,t} < tau (the emergence analysis calls it absent there) while the
error-target nu_{i,s} >= NU_PRESENT (the direction is there) and nu_{i,s} >= n_{i,s} / max_t n_{i,t} +
SHRINKAGE_MARGIN (the decoder under-reports it by more than the fit's noise), with at least MIN_ACTIVE_TOKENS
tokens firing it at both s and s*. For a latent whose decoder is right, nu tracks the norm ratio.

Streaming: only per-(latent, snapshot) sums are kept (sum f^2, the number of firing tokens, sum f <u_i, x_s>,
sum f <u, x_s - x_hat_s> for the reference and the own directions); temporaries hold at most CHUNK_ELEMENTS
values (a chunk of tokens' codes, or a block of latents' code-weighted sums), so memory is bounded whatever the
token budget and dictionary size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from crosscoder.analysis.features.evolution import (
    EMERGENCE_THRESHOLD,
    ZERO_NORM,
    FeatureTable,
    table_cells,  # the feature table's own rounding
)
from crosscoder.dictionary.crosscoder import Crosscoder

NU_PRESENT = 0.5
"""nu (error target) at or above which the snapshot holds the latent's direction: the same bar, relative to the
peak, that the decoder norm must clear for the emergence analysis to call the latent present."""
SHRINKAGE_MARGIN = 0.2
"""How far nu must exceed the decoder-norm ratio. Over the measured (latent, snapshot) cells of the planted
recipe's trained ReLU dictionary (20k held-out tokens) nu - ratio has median 0.00, 90th percentile 0.06 and 99th
0.2; without a margin, cells a hair either side of the emergence threshold get flagged on noise."""
MIN_ACTIVE_TOKENS = 10
"""Tokens a latent must fire on at a snapshot (and at its reference snapshot) before its beta there is used: a
fit on a handful of tokens is noise."""
CHUNK_ELEMENTS = 1 << 24
"""Bound on the elements of one temporary: tokens x S x F codes, or latents x S x d code-weighted sums (64 MiB of
float32)."""
SCALING_COLUMNS = ("beta", "beta_act", "nu", "nu_act", "nu_own")
"""Per-snapshot features.csv columns `<name>@<snapshot>`: beta and nu of the error target along the reference
direction, of the activation target, and nu of the error target along the latent's own snapshot direction."""


def normalized_decoder(model: Crosscoder) -> torch.Tensor:
    """[F, S, d] W_dec in normalised space (a folded model's W_dec[:, s] times c_s)."""
    scale = model.input_scale if model.is_folded else torch.ones_like(model.input_scale)
    return model.W_dec.detach() * scale[None, :, None].to(model.W_dec.dtype)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dim; zero where a vector has no direction (norm <= ZERO_NORM)."""
    norm = vectors.norm(dim=-1, keepdim=True)
    return torch.where(norm > ZERO_NORM, vectors / norm.clamp_min(ZERO_NORM), torch.zeros_like(vectors))


def per_snapshot_codes(codes: torch.Tensor, n_snapshots: int) -> torch.Tensor:
    """[B, S, F] codes from `encode`'s [B, F] (the same code in every snapshot, as a view) or [B, S, F]."""
    if codes.dim() == 2:
        return codes[:, None, :].expand(-1, n_snapshots, -1)
    if codes.dim() == 3 and codes.shape[1] == n_snapshots:
        return codes
    raise ValueError(f"codes must be [batch, F] or [batch, {n_snapshots}, F], got {list(codes.shape)}")


class LatentScalingAccumulator:
    """Streams batches into the per-(latent, snapshot) sums the fits need (module docstring)."""

    def __init__(self, decoder: torch.Tensor, norms: torch.Tensor | None = None) -> None:
        """`decoder` [F, S, d] in normalised space; `norms` [F, S] the normalised decoder norms that choose each
        latent's reference snapshot (default: the decoder's own)."""
        self.decoder = decoder.detach()
        n_latents, n_snapshots, _ = decoder.shape
        norms = self.decoder.norm(dim=-1) if norms is None else norms.detach().to(decoder.device)
        if norms.shape != (n_latents, n_snapshots):
            raise ValueError(f"norms {list(norms.shape)} do not match the decoder {list(decoder.shape)}")
        self.norms = norms.float()
        self.reference = self.norms.argmax(dim=1)
        self.u_ref = _unit(self.decoder[torch.arange(n_latents, device=decoder.device), self.reference])  # [F, d]
        self.u_own = _unit(self.decoder)  # [F, S, d]
        zeros = lambda: torch.zeros(n_latents, n_snapshots, dtype=torch.float64, device=decoder.device)  # noqa: E731
        self.sq, self.active, self.ref_x, self.ref_r, self.own_r = (zeros() for _ in range(5))
        self.n_tokens = 0

    @torch.no_grad()
    def add_normalized(self, codes: torch.Tensor, x: torch.Tensor, residual: torch.Tensor) -> None:
        """One batch in normalised space: codes [B, F] or [B, S, F], activations x and residuals x - x_hat
        [B, S, d]."""
        n_latents, n_snapshots, d_model = self.decoder.shape
        f = per_snapshot_codes(codes, n_snapshots).to(self.decoder.dtype)  # validates; a view for [B, F]
        shared = codes.dim() == 2
        x, residual = x.to(self.decoder.dtype), residual.to(self.decoder.dtype)
        square, fired = (codes.to(f.dtype).pow(2).sum(dim=0), (codes > 0).sum(dim=0)) if shared else \
            (f.pow(2).sum(dim=0).T, (f > 0).sum(dim=0).T)
        self.sq += square.double().expand(n_snapshots, -1).T if shared else square.double()
        self.active += fired.double().expand(n_snapshots, -1).T if shared else fired.double()
        # sum_n f <u, y_n> = <u, sum_n f y_n>: one code-weighted sum of the targets per block of latents (a GEMM
        # over the batch, [latents, S, d] at a time), then its dot with each direction. The own direction only
        # enters the error target, so x needs no own sum.
        equation = "bf,bsd->fsd" if shared else "bsf,bsd->fsd"
        block = max(1, CHUNK_ELEMENTS // (n_snapshots * d_model))
        for start in range(0, n_latents, block):
            part = slice(start, start + block)
            weights = codes[:, part].to(f.dtype) if shared else f[:, :, part]
            weighted_x = torch.einsum(equation, weights, x)
            weighted_r = torch.einsum(equation, weights, residual)
            self.ref_x[part] += torch.einsum("fsd,fd->fs", weighted_x, self.u_ref[part]).double()
            self.ref_r[part] += torch.einsum("fsd,fd->fs", weighted_r, self.u_ref[part]).double()
            self.own_r[part] += (weighted_r * self.u_own[part]).sum(dim=-1).double()
        self.n_tokens += x.shape[0]

    @torch.no_grad()
    def add(self, model: Crosscoder, x: torch.Tensor) -> None:
        """One batch of raw activations [B, S, d] through `model` (codes, reconstruction), in chunks."""
        rows = max(1, CHUNK_ELEMENTS // (model.n_sources * model.dict_size))
        scale = model.input_scale[None, :, None]
        for chunk in x.split(rows):
            codes = model.encode(chunk)
            self.add_normalized(codes, chunk * scale, (chunk - model.decode(codes)) * scale)

    def result(self, names: list[str], dead: torch.Tensor | None = None, *, nu_present: float = NU_PRESENT,
               margin: float = SHRINKAGE_MARGIN, min_active_tokens: int = MIN_ACTIVE_TOKENS) -> LatentScaling:
        """The fits, nu and the flag (module docstring); `dead` [F] latents are never flagged."""
        return scaling_from_sums(self, names, dead, nu_present=nu_present, margin=margin,
                                 min_active_tokens=min_active_tokens)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """numerator / denominator where valid and the denominator is positive, else NaN."""
    ok = valid & (denominator > 0)
    return torch.where(ok, numerator / torch.where(ok, denominator, 1.0), torch.nan)


def scaling_from_sums(sums: LatentScalingAccumulator, names: list[str], dead: torch.Tensor | None = None, *,
                      nu_present: float = NU_PRESENT, margin: float = SHRINKAGE_MARGIN,
                      min_active_tokens: int = MIN_ACTIVE_TOKENS) -> LatentScaling:
    """Turn the streamed sums into beta, nu and the flag (module docstring)."""
    decoder = sums.decoder.double()
    n_latents, n_snapshots, _ = decoder.shape
    if len(names) != n_snapshots:
        raise ValueError(f"{len(names)} names for {n_snapshots} snapshots")
    rows = torch.arange(n_latents, device=decoder.device)
    ref = sums.reference
    ref_norm = decoder[rows, ref].norm(dim=-1)  # [F]
    # The added-back own contribution f_i W_dec[i, s] projects to f_i^2 <u, W_dec[i, s]> per token.
    ref_self = torch.einsum("fd,fsd->fs", sums.u_ref.double(), decoder)
    own_norm = decoder.norm(dim=-1)
    fired = sums.sq > 0
    p_act = _ratio(sums.ref_x, sums.sq, fired)
    p_err = _ratio(sums.ref_r, sums.sq, fired) + ref_self
    p_own = _ratio(sums.own_r, sums.sq, fired & (own_norm > ZERO_NORM)) + own_norm
    enough = sums.active >= min_active_tokens
    usable = enough & enough[rows, ref][:, None]
    at_ref = lambda p: p[rows, ref][:, None].expand_as(p)  # noqa: E731
    per_norm = ref_norm.clamp_min(ZERO_NORM)[:, None]
    dead = torch.zeros(n_latents, dtype=torch.bool) if dead is None else dead.detach().cpu().bool()
    ratio = sums.norms / sums.norms.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    nu_error = _ratio(p_err, at_ref(p_err), usable).float().cpu()
    ratio = ratio.cpu()
    flagged = (ratio < EMERGENCE_THRESHOLD) & (nu_error >= nu_present) & (nu_error >= ratio + margin) & ~dead[:, None]
    return LatentScaling(
        names=list(names), reference=ref.cpu(), n_tokens=sums.n_tokens, active_tokens=sums.active.long().cpu(),
        beta_error=torch.where(fired, p_err / per_norm, torch.nan).float().cpu(),
        beta_activation=(p_act / per_norm).float().cpu(), nu_error=nu_error,
        nu_activation=_ratio(p_act, at_ref(p_act), usable).float().cpu(),
        nu_own=_ratio(p_own, at_ref(p_err), usable).float().cpu(), norm_ratio=ratio, flagged=flagged,
        dead=dead, thresholds={"emergence_threshold": EMERGENCE_THRESHOLD, "nu_present": nu_present,
                               "shrinkage_margin": margin, "min_active_tokens": min_active_tokens},
    )


def latent_scaling(model: Crosscoder, batches: Iterable[torch.Tensor], names: list[str],
                   norms: torch.Tensor | None = None, dead: torch.Tensor | None = None) -> LatentScaling:
    """Latent scaling of `model` over raw activation batches [B, S, d] (module docstring)."""
    accumulator = LatentScalingAccumulator(normalized_decoder(model), norms)
    for x in batches:
        accumulator.add(model, x.to(model.W_dec.device))
    if accumulator.n_tokens == 0:
        raise ValueError("latent scaling got no activations")
    return accumulator.result(names, dead)


@dataclass
class LatentScaling:
    """Latent scaling of one dictionary; F latents, S snapshots, [F, S] tensors unless stated."""

    names: list[str]
    reference: torch.Tensor
    """[F] s*: the snapshot whose decoder direction the fits use (peak decoder norm)."""
    n_tokens: int
    active_tokens: torch.Tensor
    """Tokens the latent fired on at each snapshot."""
    beta_error: torch.Tensor
    """beta, error target, reference direction (NaN where the latent never fired)."""
    beta_activation: torch.Tensor
    nu_error: torch.Tensor
    """beta_error / beta_error at s* (NaN with too few firing tokens): what the flag reads."""
    nu_activation: torch.Tensor
    nu_own: torch.Tensor
    """Error target along the latent's own snapshot-s direction, relative to s*."""
    norm_ratio: torch.Tensor
    """n_{i,s} / max_t n_{i,t} (the emergence trajectory)."""
    flagged: torch.Tensor
    """bool: shrinkage artefact at this snapshot."""
    dead: torch.Tensor
    """[F] bool."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """The flag's emergence threshold, nu bar, margin over the norm ratio and minimum firing tokens."""

    @property
    def artefact(self) -> torch.Tensor:
        """[F] bool: flagged at some snapshot."""
        return self.flagged.any(dim=1)

    def flagged_snapshots(self, latent: int) -> list[str]:
        return [self.names[s] for s in torch.nonzero(self.flagged[latent]).flatten().tolist()]

    def summary(self) -> dict[str, Any]:
        """summary.json's `latent_scaling` entry (counts over live latents)."""
        live = int((~self.dead).sum())
        flagged = int(self.artefact.sum())
        measured = ~self.nu_error.isnan() & ~self.dead[:, None]
        return {
            "tokens": self.n_tokens, "latents_flagged": flagged, "share_flagged": flagged / live if live else None,
            "live_latents": live, "flagged_per_snapshot": self.flagged.sum(dim=0).tolist(),
            "measured_per_snapshot": measured.sum(dim=0).tolist(), **self.thresholds,
        }

    def add_columns(self, table: FeatureTable) -> None:
        """Per-latent columns in the feature table: the reference snapshot, the flag, the flagged snapshots
        (';'-joined) and the per-snapshot `<name>@<snapshot>` values of SCALING_COLUMNS."""
        values = {"beta": self.beta_error, "beta_act": self.beta_activation, "nu": self.nu_error,
                  "nu_act": self.nu_activation, "nu_own": self.nu_own}
        table.columns += ["scaling_reference", "shrinkage_artefact", "shrinkage_snapshots",
                          *[f"{column}@{name}" for column in SCALING_COLUMNS for name in self.names]]
        cells = table_cells(torch.cat([values[column] for column in SCALING_COLUMNS], dim=1))
        reference, artefact = self.reference.tolist(), self.artefact.tolist()
        for row in table.rows:
            i = row[0]  # the latent index
            row += [self.names[reference[i]], artefact[i], ";".join(self.flagged_snapshots(i)), *cells[i]]

