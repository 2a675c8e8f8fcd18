"""Adjacent-source feature statistics (Balcells et al., "Evolution of SAE features across layers"): how the latents
of consecutive sources s, s+1 (snapshots, or layers) correspond, from the Pearson correlation of their activations
on replayed tokens.

Per-source codes [n, F_s]: a stack's source s is its own dictionary's codes on source s's activations; a crosscoder
with a per-snapshot gate (`codes_per_snapshot`) gives its per-snapshot codes; a crosscoder with one shared code gives
the per-source contribution code_i * ||W_dec[i, s]|| (normalised space). The last is degenerate but honest: a positive
rescaling leaves a correlation alone, so latent i is its own match (correlation 1) wherever its decoder norm is
non-zero at both s and s+1, and only a zero norm makes it dead there.

Streaming, batch by batch in float64: per source the token count, sums and sums of squares; per pair (s, s+1) the
cross products sum_t a_i b_j. Dense [F_s, F_{s+1}] when F_s * F_{s+1} <= `max_dense`; beyond it, a sparse
accumulator: the sparse product of each batch gives the co-active pairs only, and each latent keeps its `top_k`
candidate partners by accumulated cross-product mass (one table per direction), so memory is O(F * k) whatever the
token budget. Approximations of the sparse path: (1) a pair never co-active has sum a_i b_j = 0, so (codes being
non-negative) its correlation is -mu_i mu_j / (sigma_i sigma_j) <= 0: it cannot be a best match above a threshold
tau > 0, and is never looked at; (2) a partner outside a latent's top k by mass is forgotten (its mass before it
entered, or after it was evicted, is lost), so a latent co-firing with more than k partners can miss a rarer, better
correlated one; the best match is the best correlated of the kept candidates.

At a threshold tau (0.4 and 0.5, as in the paper), of s's live latents those whose best correlation forward is >= tau
*pass through*, the others *disappear*; of s+1's live latents those whose best correlation back is < tau *appear*.
Live: active on some token with non-constant code over the budget; the others (dead) are excluded and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from crosscoder.dictionary.crosscoder import Crosscoder

DEFAULT_MAX_DENSE = 1 << 22
"""Dense cross products up to this many entries per pair (4M: 32 MiB of float64)."""
DEFAULT_TOP_K = 8
"""Candidate partners kept per latent by the sparse accumulator."""
THRESHOLDS = (0.4, 0.5)
MAX_PAIRS = 1 << 23
"""Bound on the co-active (token, i, j) triples one sparse product takes."""

SourceCodes = Callable[[torch.Tensor], list[torch.Tensor]]
"""Raw activations [B, S, d] -> per source its codes [B, F_s]."""


def crosscoder_codes(model: Crosscoder) -> SourceCodes:
    """Per-source codes of a crosscoder (module docstring): per-snapshot codes, or code_i * ||W_dec[i, s]||."""
    weight = model.decoder_norms().detach()  # [F, S]

    @torch.no_grad()
    def codes(x: torch.Tensor) -> list[torch.Tensor]:
        c = model.encode(x)
        return list(c.unbind(1)) if c.dim() == 3 else [c * weight[:, s] for s in range(x.shape[1])]
    return codes


def stack_codes(models: Sequence[Crosscoder]) -> SourceCodes:
    """Per-source codes of a stack: dictionary s on source s's activations ([n, 1, F] of a per-snapshot gate
    flattened)."""
    @torch.no_grad()
    def codes(x: torch.Tensor) -> list[torch.Tensor]:
        return [model.encode(x[:, s:s + 1]).reshape(x.shape[0], -1) for s, model in enumerate(models)]
    return codes


@dataclass
class _Moments:
    """One source's token count, sums, sums of squares and active counts."""

    total: torch.Tensor
    square: torch.Tensor
    active: torch.Tensor
    n: int = 0

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [F]; std is NaN where the latent is not live."""
        n = max(self.n, 1)
        mean = self.total / n
        var = (self.square / n - mean.square()).clamp_min(0)
        return mean, torch.where(self.live, var.sqrt(), math.nan)

    @property
    def live(self) -> torch.Tensor:
        # Constant codes (variance 0) cannot correlate; "> tiny" of the second moment guards float cancellation.
        n = max(self.n, 1)
        var = self.square / n - (self.total / n).square()
        return (self.active > 0) & (var > 1e-12 * (self.square / n))


def _correlation(cross: torch.Tensor, n: int, mean_a: torch.Tensor, std_a: torch.Tensor, mean_b: torch.Tensor,
                 std_b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation from accumulated cross products (any broadcastable shapes); NaN where a side is dead."""
    return (cross / max(n, 1) - mean_a * mean_b) / (std_a * std_b)


def _best(corr: torch.Tensor, partner: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(best partner [F] or -1, its correlation [F] or NaN) along the last dim; NaN entries never win."""
    value, position = torch.nan_to_num(corr, nan=-math.inf).max(dim=-1)
    best = position if partner is None else partner.gather(-1, position[:, None])[:, 0]
    none = value == -math.inf
    return torch.where(none, -1, best), torch.where(none, math.nan, value)


def _best_candidate(index: torch.Tensor, mass: torch.Tensor, n: int, own: tuple[torch.Tensor, torch.Tensor],
                    other: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_best` over a candidate table (index [F, k], -1 empty; mass [F, k]), given both sides' (mean, std)."""
    partner = index.clamp_min(0)
    std = torch.where(index >= 0, other[1][partner], math.nan)
    return _best(_correlation(mass, n, own[0][:, None], own[1][:, None], other[0][partner], std), index)


def _merge(index: torch.Tensor, mass: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
           width: int) -> None:
    """Add a batch's co-active cross products (rows, cols, values) to the candidate table (index [F, k], -1 empty;
    mass [F, k]) in place, keeping per row the k partners of largest accumulated mass."""
    n_rows, k = index.shape
    keep = index >= 0
    old_rows = torch.arange(n_rows, device=index.device)[:, None].expand_as(index)[keep]
    keys, inverse = torch.unique(torch.cat([old_rows * width + index[keep], rows * width + cols]), return_inverse=True)
    if not len(keys):  # nothing co-active yet
        return
    summed = torch.zeros(len(keys), dtype=mass.dtype, device=mass.device).index_add_(
        0, inverse, torch.cat([mass[keep], values]))
    # One sort: by row, largest mass first within one (the scaled mass stays inside [0, 1), never crossing a row;
    # masses within ~1e-10 of the largest of each other may swap, which only reorders near-ties).
    top = summed.abs().max().clamp_min(torch.finfo(summed.dtype).tiny)
    order = ((keys // width).double() + 0.499 * (1 - summed / top)).argsort()
    keys, summed = keys[order], summed[order]
    row = keys // width
    counts = torch.bincount(row, minlength=n_rows)
    rank = torch.arange(len(row), device=row.device) - (counts.cumsum(0) - counts)[row]
    chosen = rank < k
    index.fill_(-1)
    mass.zero_()
    index[row[chosen], rank[chosen]] = keys[chosen] % width
    mass[row[chosen], rank[chosen]] = summed[chosen]


def _pair_slices(a: torch.Tensor, b: torch.Tensor) -> Iterable[slice]:
    """Row slices whose co-active triples (sum over tokens of L0_a * L0_b) stay about MAX_PAIRS."""
    pairs = ((a != 0).sum(dim=1) * (b != 0).sum(dim=1)).cumsum(0)
    start = 0
    while start < a.shape[0]:
        base = int(pairs[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(pairs, base + MAX_PAIRS, right=True)))
        yield slice(start, stop)
        start = stop


@dataclass
class Transition:
    """Best matches across one pair of consecutive sources."""

    source: str
    target: str
    forward_match: torch.Tensor
    """[F_s] the best-correlated latent of s+1 for each latent of s; -1 for none (dead, or no co-active partner)."""
    forward_corr: torch.Tensor
    """[F_s] float64, its correlation; NaN where there is no match."""
    backward_match: torch.Tensor
    """[F_{s+1}] the best-correlated latent of s for each latent of s+1; -1 for none."""
    backward_corr: torch.Tensor
    live_source: torch.Tensor
    """[F_s] bool."""
    live_target: torch.Tensor
    exact: bool
    """True: dense cross products (every pair's correlation); False: the sparse accumulator's top-k candidates."""

    def shares(self, tau: float) -> dict[str, float | int | None]:
        """Pass-through and disappear shares of s's live latents, the appear share of s+1's (None with no live)."""
        passing = int((self.live_source & (self.forward_corr >= tau)).sum())
        appearing = int((self.live_target & ~(self.backward_corr >= tau)).sum())
        live_s, live_t = int(self.live_source.sum()), int(self.live_target.sum())
        return {"pass_through": passing / live_s if live_s else None,
                "disappear": (live_s - passing) / live_s if live_s else None,
                "appear": appearing / live_t if live_t else None,
                "passing": passing, "disappearing": live_s - passing, "appearing": appearing}

    def summary(self, thresholds: Sequence[float]) -> dict:
        live = self.forward_corr[self.live_source & ~self.forward_corr.isnan()]
        return {"from": self.source, "to": self.target, "exact": self.exact,
                "live_from": int(self.live_source.sum()), "dead_from": int((~self.live_source).sum()),
                "live_to": int(self.live_target.sum()), "dead_to": int((~self.live_target).sum()),
                "median_forward_corr": float(live.median()) if live.numel() else None,
                "at": {str(tau): self.shares(tau) for tau in thresholds}}


@dataclass
class AdjacentStatistics:
    names: list[str]
    transitions: list[Transition]
    n_tokens: int
    codes: str
    """How the per-source codes were read: `stack`, `per_snapshot` or `shared` (module docstring)."""
    thresholds: tuple[float, ...] = THRESHOLDS
    top_k: int = DEFAULT_TOP_K
    max_dense: int = DEFAULT_MAX_DENSE

    def summary(self) -> dict:
        return {"n_tokens": self.n_tokens, "codes": self.codes, "thresholds": list(self.thresholds),
                "top_k": self.top_k, "max_dense": self.max_dense,
                "transitions": [t.summary(self.thresholds) for t in self.transitions]}


@dataclass
class AdjacentAccumulator:
    """Feed per-source codes batch by batch (`update`), then read the matches (`result`)."""

    names: list[str]
    max_dense: int = DEFAULT_MAX_DENSE
    top_k: int = DEFAULT_TOP_K
    moments: list[_Moments] = field(default_factory=list)
    cross: list[torch.Tensor | tuple[torch.Tensor, ...]] = field(default_factory=list)
    """Per pair: dense [F_s, F_{s+1}], or (forward index, forward mass, backward index, backward mass)."""

    def _start(self, codes: list[torch.Tensor]) -> None:
        device = codes[0].device
        for c in codes:
            zeros = torch.zeros(c.shape[1], dtype=torch.float64, device=device)
            self.moments.append(_Moments(zeros.clone(), zeros.clone(), zeros.clone()))
        for a, b in zip(codes[:-1], codes[1:], strict=True):
            fa, fb = a.shape[1], b.shape[1]
            if fa * fb <= self.max_dense:
                self.cross.append(torch.zeros(fa, fb, dtype=torch.float64, device=device))
                continue
            tables = []
            for rows, cols in ((fa, fb), (fb, fa)):  # forward, then backward: (index, mass) each
                k = min(self.top_k, cols)
                tables += [torch.full((rows, k), -1, device=device), torch.zeros(rows, k, dtype=torch.float64,
                                                                                 device=device)]
            self.cross.append(tuple(tables))

    @torch.no_grad()
    def update(self, codes: list[torch.Tensor]) -> None:
        """Codes [B, F_s] per source (one batch of tokens, the same rows in every source)."""
        if len(codes) != len(self.names):
            raise ValueError(f"{len(codes)} sources' codes for {len(self.names)} names")
        codes = [c.detach().double() for c in codes]
        if not self.moments:
            self._start(codes)
        for moment, c in zip(self.moments, codes, strict=True):
            moment.total += c.sum(dim=0)
            moment.square += c.square().sum(dim=0)
            moment.active += (c != 0).sum(dim=0)
            moment.n += c.shape[0]
        for cross, a, b in zip(self.cross, codes[:-1], codes[1:], strict=True):
            if isinstance(cross, torch.Tensor):  # a sparse left factor is cheaper for sparse codes
                cross += torch.sparse.mm(a.t().to_sparse(), b) if bool((a != 0).double().mean() < 0.05) else a.t() @ b
                continue
            for rows in _pair_slices(a, b):  # the sparse product holds only co-active pairs
                product = torch.sparse.mm(a[rows].t().to_sparse(), b[rows].to_sparse()).coalesce()
                i, j = product.indices()
                _merge(cross[0], cross[1], i, j, product.values(), b.shape[1])
                _merge(cross[2], cross[3], j, i, product.values(), a.shape[1])

    def result(self, codes: str = "stack") -> AdjacentStatistics:
        if not self.moments:
            raise ValueError("no codes: the token stream was empty")
        transitions = []
        for s, cross in enumerate(self.cross):
            (mean_a, std_a), (mean_b, std_b) = self.moments[s].mean_std(), self.moments[s + 1].mean_std()
            n = self.moments[s].n
            if isinstance(cross, torch.Tensor):
                corr = _correlation(cross, n, mean_a[:, None], std_a[:, None], mean_b[None], std_b[None])
                forward, backward = _best(corr), _best(corr.t())
            else:
                forward = _best_candidate(cross[0], cross[1], n, (mean_a, std_a), (mean_b, std_b))
                backward = _best_candidate(cross[2], cross[3], n, (mean_b, std_b), (mean_a, std_a))
            transitions.append(Transition(
                source=self.names[s], target=self.names[s + 1], forward_match=forward[0].cpu(),
                forward_corr=forward[1].cpu(), backward_match=backward[0].cpu(), backward_corr=backward[1].cpu(),
                live_source=self.moments[s].live.cpu(), live_target=self.moments[s + 1].live.cpu(),
                exact=isinstance(cross, torch.Tensor)))
        return AdjacentStatistics(names=list(self.names), transitions=transitions, n_tokens=self.moments[0].n,
                                  codes=codes, top_k=self.top_k, max_dense=self.max_dense)

    def correlation(self, s: int) -> torch.Tensor:
        """[F_s, F_{s+1}] every pair's correlation (dense pairs only): what the formula tests compare."""
        cross = self.cross[s]
        if not isinstance(cross, torch.Tensor):
            raise ValueError(f"pair {s} is accumulated sparsely: only its candidates' correlations are known")
        (mean_a, std_a), (mean_b, std_b) = self.moments[s].mean_std(), self.moments[s + 1].mean_std()
        return _correlation(cross, self.moments[s].n, mean_a[:, None], std_a[:, None], mean_b[None], std_b[None])


def adjacent_statistics(code_batches: Iterable[list[torch.Tensor]], names: list[str], *,
                        max_dense: int = DEFAULT_MAX_DENSE, top_k: int = DEFAULT_TOP_K, codes: str = "stack"
                        ) -> AdjacentStatistics:
    """The statistics (module docstring) of a stream of per-source code batches."""
    accumulator = AdjacentAccumulator(names, max_dense=max_dense, top_k=top_k)
    for batch in code_batches:
        accumulator.update(batch)
    return accumulator.result(codes)
