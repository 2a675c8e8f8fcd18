"""Training metrics on their own: the firing-frequency estimate and the density figures."""

from __future__ import annotations

import pytest
import torch

from crosscoder.training.metrics import FiringFrequency, density_metrics, fired_latents


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


def test_per_snapshot_codes_give_a_frequency_per_snapshot() -> None:
    """Codes [B, S, F]: fired = on in any snapshot; counts per (snapshot, latent); density by the most frequent
    snapshot of each latent."""
    codes = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 2.0, 3.0]]])  # [2, 2, 3]
    assert torch.equal(fired_latents(codes), torch.tensor([False, True, True]))
    firing = FiringFrequency((2, 3))
    firing.add((codes > 0).sum(dim=0).float().flatten(), tokens=2)
    assert torch.allclose(firing.frequency(), torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.5, 0.5]]))
    metrics = density_metrics(firing.frequency())
    assert metrics["density/never_fired_fraction"] == pytest.approx(1 / 3)
    assert metrics["density/dense_latents"] == 2


def test_per_snapshot_frequency_histograms_reach_wandb_and_the_density_plot(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from crosscoder.analysis.report.plots import plot_firing_frequency
    from crosscoder.config import TrackingConfig
    from crosscoder.training.tracking import Tracker
    from tests.helpers import history_keys, single_wandb_run_file

    monkeypatch.setenv("WANDB_MODE", "offline")
    frequency = torch.tensor([[0.0, 0.01, 0.2], [0.001, 0.0, 0.05]])
    tracker = Tracker(TrackingConfig(mode="offline"), {}, tmp_path, is_main=True)
    tracker.log_firing_frequency(frequency, step=1, source_names=["step0", "step9"])
    tracker.finish()
    keys = history_keys(single_wandb_run_file(tmp_path))
    assert {"density/log10_frequency_hist/step0/values", "density/log10_frequency_hist/step9/values"} <= keys
    assert plot_firing_frequency(frequency, 0.1, tmp_path / "density.png", ["step0", "step9"]).stat().st_size > 0
