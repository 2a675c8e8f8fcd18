"""Evolution metrics on hand-made dictionaries whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from crosscoder.analysis.features.evolution import (
    CLASSES,
    EMERGENCE_THRESHOLD,
    analyze_evolution,
    classify,
    consecutive_cosine,
    cosine_to_last,
    dead_latents,
    emergence_counts,
    emergence_snapshots,
    emergence_steps,
    feature_table,
    normalized_trajectories,
    presence_segments,
    snapshot_similarity,
)

# One latent of each class, one dead, and an "emerging" latent that dips below tau after first crossing.
NORMS = torch.tensor([
    [1.0, 0.9, 0.8, 1.0],  # persistent, emerges at 0
    [0.1, 0.2, 0.8, 1.0],  # emerging at 2
    [2.0, 1.4, 0.6, 0.2],  # vanishing (n = 1, .7, .3, .1), emerges at 0
    [0.1, 1.0, 0.6, 0.2],  # transient, emerges at 1
    [0.0, 0.0, 0.0, 0.0],  # dead
    [0.1, 0.8, 0.3, 1.0],  # emerging with a dip: still emerging (first/last rule), 2 segments, emerges at 1
])
NAMES = ["step0", "step10", "step100", "final"]
STEPS = [0, 10, 100, None]


def _decoder(norms: torch.Tensor, d: int = 6, seed: int = 0) -> torch.Tensor:
    """A decoder [F, S, d] with the given per-snapshot norms and a fixed direction per latent."""
    directions = torch.randn(norms.shape[0], 1, d, generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return directions * norms[..., None]


def test_trajectories_emergence_classes_segments() -> None:
    dead = dead_latents(NORMS)
    assert dead.tolist() == [False, False, False, False, True, False]
    traj = normalized_trajectories(NORMS, dead)
    torch.testing.assert_close(traj[2], torch.tensor([1.0, 0.7, 0.3, 0.1]))
    assert traj[4].tolist() == [0.0] * 4 and traj.amax(dim=1)[~dead].eq(1).all()

    emergence = emergence_snapshots(traj)
    assert emergence.tolist() == [0, 2, 0, 1, -1, 1]
    assert emergence_steps(emergence, STEPS) == [0, 100, 0, 10, None, 10]
    assert emergence_steps(torch.tensor([3]), STEPS) == [None]  # the final snapshot's step is unknown
    assert emergence_steps(emergence, None) == [None] * 6
    assert [CLASSES[c] for c in classify(traj, dead)] == [
        "persistent", "emerging", "vanishing", "transient", "dead", "emerging"]
    assert presence_segments(traj).tolist() == [1, 1, 1, 1, 0, 2]
    assert emergence_counts(emergence, 4).tolist() == [2, 2, 1, 0]


def test_dead_floor_and_mask() -> None:
    norms = torch.tensor([[1.0, 2.0], [1.0, 1.0], [3.0, 1.0], [1e-4, 1e-4], [0.5, 0.5]])
    assert dead_latents(norms).tolist() == [False, False, False, True, False]  # 1e-4 < 1e-3 * median(=1)
    mask = torch.tensor([False, False, False, False, True])
    assert dead_latents(norms, mask).tolist() == [False, False, False, True, True]


def test_threshold_is_inclusive() -> None:
    """n(s) exactly at tau counts as present."""
    traj = torch.tensor([[EMERGENCE_THRESHOLD - 1e-6, EMERGENCE_THRESHOLD, 1.0]])
    assert emergence_snapshots(traj).tolist() == [1]


def test_drift_of_a_rotating_feature() -> None:
    """A decoder turning by a fixed angle per snapshot: consecutive cosine cos(theta), to last cos((S-1-s)theta)."""
    theta, n_snap = 0.3, 5
    angles = torch.arange(n_snap) * theta
    w_dec = torch.zeros(2, n_snap, 3)
    w_dec[0, :, 0], w_dec[0, :, 1] = angles.cos() * 2.0, angles.sin() * 2.0
    w_dec[1, :, 2] = 1.0
    w_dec[1, 2] = 0.0  # a zero vector has no direction: NaN around it
    consecutive = consecutive_cosine(w_dec)
    torch.testing.assert_close(consecutive[0], torch.full((n_snap - 1,), math.cos(theta)))
    assert consecutive[1].isnan().tolist() == [False, True, True, False]
    to_last = cosine_to_last(w_dec)
    torch.testing.assert_close(to_last[0], torch.cos((n_snap - 1 - torch.arange(n_snap)) * theta))
    assert to_last[0, -1] == pytest.approx(1.0)
    assert consecutive_cosine(w_dec, torch.tensor([True, False]))[0].isnan().all()

    evo = analyze_evolution(w_dec)
    assert evo.min_present_cos[0] == pytest.approx(math.cos(theta))
    assert evo.lifetime_cos[0] == pytest.approx(math.cos((n_snap - 1) * theta))
    # Median over latents present at both ends: latent 1 (cosine 1) is absent around snapshot 2; lower median.
    assert evo.median_drift() == pytest.approx([math.cos(theta)] * (n_snap - 1))


def test_snapshot_similarity() -> None:
    """Identical snapshots: all ones. Latent directions swapped between snapshots: the norm-weighted mean."""
    base = _decoder(torch.ones(8, 1), d=5)
    torch.testing.assert_close(snapshot_similarity(base.expand(8, 3, 5), torch.ones(8, 3)), torch.ones(3, 3))

    w_dec = torch.zeros(2, 2, 2)
    w_dec[0, 0], w_dec[0, 1] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # orthogonal across snapshots
    w_dec[1, 0], w_dec[1, 1] = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])  # unchanged
    norms = torch.tensor([[3.0, 3.0], [1.0, 1.0]])
    sim = snapshot_similarity(w_dec, norms)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 0.1], [0.1, 1.0]]))  # (9*0 + 1*1) / (9 + 1)
    # A dead latent does not count.
    sim = snapshot_similarity(w_dec, norms, dead=torch.tensor([True, False]))
    torch.testing.assert_close(sim, torch.ones(2, 2))


def test_analyze_evolution_and_feature_table() -> None:
    w_dec = _decoder(NORMS) * 7.0  # decoder norms in another space: only the given norms set trajectories
    evo = analyze_evolution(w_dec, NORMS, names=NAMES, steps=STEPS)
    assert evo.class_counts() == {"persistent": 1, "emerging": 2, "vanishing": 1, "transient": 1, "dead": 1}
    assert evo.emergence_counts.tolist() == [2, 2, 1, 0]
    assert evo.emergence_counts_by_class() == {
        "persistent": [1, 0, 0, 0], "emerging": [0, 1, 1, 0], "vanishing": [1, 0, 0, 0], "transient": [0, 1, 0, 0]}
    assert evo.emergence_step == [0, 100, 0, 10, None, 10]
    torch.testing.assert_close(evo.similarity, torch.ones(4, 4))  # fixed directions
    assert evo.median_drift() == pytest.approx([1.0, 1.0, 1.0])
    assert evo.lifetime_cos[~evo.dead].tolist() == pytest.approx([1.0] * 5)
    assert evo.lifetime_cos[4].isnan() and evo.consecutive_cos[4].isnan().all()

    table = feature_table(evo)
    assert table.columns[:4] == ["feature", "class", "emergence_snapshot", "emergence_name"]
    assert table.columns[-4:] == [f"n@{n}" for n in NAMES]
    assert all(len(row) == len(table.columns) for row in table.rows) and len(table.rows) == 6
    records = table.records()
    assert records[1]["class"] == "emerging" and records[1]["emergence_step"] == 100
    assert records[1]["n@step100"] == pytest.approx(0.8)
    assert records[4]["class"] == "dead" and records[4]["emergence_snapshot"] is None
    assert records[4]["lifetime_cos"] is None  # NaN becomes None for W&B / CSV / JSON
    assert len(feature_table(evo, include_dead=False).rows) == 5

    with pytest.raises(ValueError, match="names"):
        analyze_evolution(w_dec, NORMS, names=NAMES[:2])
    with pytest.raises(ValueError, match="do not match"):
        analyze_evolution(w_dec, NORMS[:, :2])
