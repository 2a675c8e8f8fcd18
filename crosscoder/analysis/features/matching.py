"""Optimal one-to-one matching of learned to planted features (scipy's linear assignment), and how well a
dictionary recovers them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crosscoder.analysis.features.evolution import EMERGENCE_THRESHOLD, emergence_snapshots, normalized_trajectories

RECOVERY_COSINE = 0.9
"""A planted feature is recovered when its matched learned feature has decoder cosine at least this."""


def linear_sum_assignment(cost: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost matching of a rectangular [n, m] cost matrix: (rows, cols), min(n, m) pairs, rows sorted:
    scipy's (a C++ Jonker-Volgenant), given a torch or numpy matrix and refusing NaN/inf with a clear error."""
    from scipy.optimize import linear_sum_assignment as scipy_assignment

    matrix = cost.detach().cpu().double().numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost, float)
    if matrix.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("cost contains NaN or infinite entries")
    rows, cols = scipy_assignment(matrix)
    return rows.astype(np.int64), cols.astype(np.int64)


def decoder_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[Fa, Fb] cosine between decoders [Fa, S, d] and [Fb, S, d], each latent flattened to one [S*d] vector."""
    a = a.detach().cpu().float().flatten(1)
    b = b.detach().cpu().float().flatten(1)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


@dataclass
class Recovery:
    """How a learned dictionary matches planted features (optimal assignment on decoder cosine)."""

    true_index: torch.Tensor
    """[K] matched planted features (K = min(F_true, F), sorted)."""
    learned_index: torch.Tensor
    """[K] the learned latent matched to each."""
    cosine: torch.Tensor
    """[K] decoder cosine of each pair."""
    recovered: torch.Tensor
    """[F_true] bool: matched with cosine >= threshold."""
    true_emergence: torch.Tensor
    """[F_true] planted emergence snapshots."""
    learned_emergence: torch.Tensor
    """[F_true] emergence snapshot of the matched learned latent (-1 when unmatched)."""
    threshold: float = RECOVERY_COSINE

    @property
    def n_true(self) -> int:
        return int(self.recovered.numel())

    @property
    def fraction_recovered(self) -> float:
        return int(self.recovered.sum()) / self.n_true if self.n_true else 0.0

    @property
    def emergence_correct(self) -> torch.Tensor:
        """[F_true] bool: recovered and the learned emergence snapshot equals the planted one."""
        return self.recovered & (self.learned_emergence == self.true_emergence)

    @property
    def emergence_accuracy(self) -> float:
        """Over all planted features; an unrecovered one counts as wrong."""
        return int(self.emergence_correct.sum()) / self.n_true if self.n_true else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "n_true": self.n_true, "threshold": self.threshold, "fraction_recovered": self.fraction_recovered,
            "emergence_accuracy": self.emergence_accuracy,
            "mean_matched_cosine": float(self.cosine.mean()) if self.cosine.numel() else None,
        }


def recovery(
    learned_decoder: torch.Tensor,
    true_decoder: torch.Tensor,
    true_emergence: torch.Tensor,
    *,
    learned_norms: torch.Tensor | None = None,
    threshold: float = RECOVERY_COSINE,
    emergence_threshold: float = EMERGENCE_THRESHOLD,
) -> Recovery:
    """Match learned [F, S, d] to planted [F_true, S, d] features and score the match.

    The learned emergence uses the rule of `emergence_snapshots` on `learned_norms` [F, S] (default: the
    learned decoder's own per-snapshot norms; pass normalised-space norms for an exported dictionary).
    """
    if learned_decoder.shape[1:] != true_decoder.shape[1:]:
        raise ValueError(f"learned decoder {list(learned_decoder.shape)} and planted {list(true_decoder.shape)} "
                         "differ in snapshots or width")
    true_emergence = torch.as_tensor(true_emergence).long().cpu()
    if true_emergence.shape != true_decoder.shape[:1]:
        raise ValueError(f"true_emergence {list(true_emergence.shape)} must be [{true_decoder.shape[0]}]")
    cos = decoder_cosine(true_decoder, learned_decoder)
    rows, cols = linear_sum_assignment(-cos)
    true_index, learned_index = torch.from_numpy(rows), torch.from_numpy(cols)
    pair_cos = cos[true_index, learned_index]

    norms = learned_decoder.detach().cpu().float().norm(dim=-1) if learned_norms is None else learned_norms.cpu()
    learned_all = emergence_snapshots(normalized_trajectories(norms), emergence_threshold)
    n_true = true_decoder.shape[0]
    recovered = torch.zeros(n_true, dtype=torch.bool)
    recovered[true_index] = pair_cos >= threshold
    learned_emergence = torch.full((n_true,), -1, dtype=torch.long)
    learned_emergence[true_index] = learned_all[learned_index]
    return Recovery(true_index=true_index, learned_index=learned_index, cosine=pair_cos, recovered=recovered,
                    true_emergence=true_emergence, learned_emergence=learned_emergence, threshold=threshold)
