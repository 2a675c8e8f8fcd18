"""Training metrics on their own: the firing-frequency estimate and the density figures."""

from __future__ import annotations

import pytest
import torch

from crosscoder.metrics import FiringFrequency, density_metrics, fired_latents


def test_firing_frequency_accumulates_counts_over_sampled_tokens() -> None:
    firing = FiringFrequency(3)
    assert torch.equal(firing.frequency(), torch.zeros(3))  # no sample yet: zeros, not NaN
    codes = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    firing.add((codes > 0).sum(dim=0).float(), tokens=2)
    firing.add(torch.tensor([0.0, 0.0, 6.0]), tokens=6)
    assert torch.allclose(firing.frequency(), torch.tensor([0.0, 1 / 8, 8 / 8]))
    assert torch.equal(fired_latents(codes), torch.tensor([False, True, True]))


def test_density_metrics_count_dense_and_never_fired_latents() -> None:
    frequency = torch.tensor([0.0, 0.0, 1e-4, 1e-3, 0.05, 0.2, 0.5, 0.1])
    metrics = density_metrics(frequency)
    assert metrics["density/dense_latents"] == 2  # > 0.1; 0.1 itself is not dense
    assert metrics["density/never_fired_fraction"] == pytest.approx(2 / 8)
    assert metrics["density/median_frequency"] == pytest.approx(0.05)  # torch's lower median of six
