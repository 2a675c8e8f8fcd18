"""Each plot writes a valid PNG atomically, on ordinary and degenerate dictionaries."""

from __future__ import annotations

from pathlib import Path

import torch

from crosscoder.analysis.features.evolution import Evolution, analyze_evolution
from crosscoder.analysis.report.plots import (
    heatmap_order,
    plot_drift,
    plot_emergence_histogram,
    plot_recovery,
    plot_similarity,
    plot_trajectory_heatmap,
    snapshot_labels,
)
from tests.helpers import expected_norms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _evolution(norms: torch.Tensor) -> Evolution:
    directions = torch.randn(*norms.shape, 5, generator=torch.Generator().manual_seed(0))
    return analyze_evolution(directions, norms, names=[f"step{10 * s}" for s in range(norms.shape[1])],
                             steps=[10 * s for s in range(norms.shape[1])])


def _evolution_plots(evo: Evolution, folder: Path) -> list[Path]:
    return [
        plot_trajectory_heatmap(evo, folder / "trajectories.png", max_rows=10),
        plot_emergence_histogram(evo, folder / "emergence.png"),
        plot_drift(evo, folder / "drift.png"),
        plot_similarity(evo, folder / "similarity.png"),
    ]


def test_plots_are_pngs_and_leave_no_temporaries(tmp_path: Path) -> None:
    paths = _evolution_plots(_evolution(expected_norms()), tmp_path / "figs")
    paths.append(plot_recovery(torch.tensor([0.95, 0.5, 0.99]), 0.9, tmp_path / "figs" / "recovery.png"))
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(p.name for p in paths)


def test_plots_of_degenerate_dictionaries(tmp_path: Path) -> None:
    """One snapshot; all latents dead: the figures still render (with a note) instead of failing."""
    for name, norms in {"one": torch.rand(6, 1) + 0.5, "dead": torch.zeros(6, 3)}.items():
        for path in _evolution_plots(_evolution(norms), tmp_path / name):
            assert path.read_bytes()[:8] == PNG_MAGIC


def test_heatmap_order_sorts_by_emergence_and_caps_rows() -> None:
    evo = _evolution(expected_norms())
    order = heatmap_order(evo)
    assert order.numel() == int((~evo.dead).sum())  # live only
    assert evo.emergence[order].diff().ge(0).all()
    capped = heatmap_order(evo, max_rows=5)
    assert capped.numel() == 5 and evo.emergence[capped].diff().ge(0).all()
    assert capped[0] == order[0] and capped[-1] == order[-1]  # sampled evenly across the whole order


def test_snapshot_labels() -> None:
    assert snapshot_labels(["step100", "main", "x"], [100, 2000, None]) == ["step100", "main (2000)", "x"]
