"""The sums over a snapshot group that a crosscoder split by snapshot needs, as the model sees them.

The model receives a `SnapshotGroup` and never imports the parallel layout: crosscoder.parallel.layout's
`SnapshotReduction` implements it over a process group; `OneRank` is the group of one rank (every sum is the
value itself), what a module built without a layout uses.
"""

from __future__ import annotations

from typing import Protocol

import torch


class SnapshotGroup(Protocol):
    size: int
    """Ranks in the group (1: nothing to sum)."""

    def partial_sum(self, partial: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """[B, F] partials summed over the group plus the shared bias, with the gradient summed in backward."""
        ...

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, no gradient (selection scores, normalisers)."""
        ...

    def restrict_gradient(self, support: torch.Tensor) -> None:
        """Name where the next backward's d pre can be non-zero ([B, F] bool), so only that is summed."""
        ...


class OneRank:
    """The group of one rank: every sum is the value itself."""

    size = 1

    def partial_sum(self, partial: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return partial + bias

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def restrict_gradient(self, support: torch.Tensor) -> None:
        return None
