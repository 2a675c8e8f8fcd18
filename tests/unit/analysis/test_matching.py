"""Hungarian assignment against brute force; recovery of planted features."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from crosscoder.analysis.features.matching import decoder_cosine, linear_sum_assignment, recovery


def _brute_force(cost: np.ndarray) -> float:
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))


def test_assignment_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for trial in range(150):
        n, m = (int(x) for x in rng.integers(1, 6, size=2))
        # Integer costs make ties common, which is where a sloppy implementation goes wrong.
        cost = rng.normal(size=(n, m)) if trial % 2 else rng.integers(0, 3, size=(n, m)).astype(float)
        rows, cols = linear_sum_assignment(cost)
        assert len(rows) == min(n, m)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert list(rows) == sorted(rows)
        assert cost[rows, cols].sum() == pytest.approx(_brute_force(cost), abs=1e-9)


def test_assignment_edge_cases() -> None:
    rows, cols = linear_sum_assignment(torch.tensor([[5.0, 1.0], [1.0, 5.0]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    assert linear_sum_assignment(np.zeros((0, 3)))[0].size == 0
    with pytest.raises(ValueError, match="NaN"):
        linear_sum_assignment(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        linear_sum_assignment(np.zeros(3))


def test_assignment_is_fast() -> None:
    cost = np.random.default_rng(1).random((200, 800))
    start = time.perf_counter()
    rows, cols = linear_sum_assignment(cost)
    assert time.perf_counter() - start < 1.0
    assert len(rows) == 200
    assert len(set(cols.tolist())) == 200
    assert cost.min(axis=1).sum() <= cost[rows, cols].sum() <= cost[np.arange(200), np.arange(200)].sum()


def _planted(n_true: int = 12, n_snap: int = 4, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random directions per snapshot; norms 0.1 before each feature's emergence snapshot, 1 after."""
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(n_true, n_snap, d, generator=generator)
    decoder = decoder / decoder.norm(dim=-1, keepdim=True)
    emergence = torch.arange(n_true) % n_snap
    norms = torch.where(torch.arange(n_snap)[None, :] >= emergence[:, None], 1.0, 0.1)
    return decoder * norms[..., None], emergence


def test_recovery_of_a_permuted_noisy_copy() -> None:
    true_decoder, emergence = _planted()
    generator = torch.Generator().manual_seed(1)
    extra = torch.randn(8, *true_decoder.shape[1:], generator=generator)  # more learned latents than planted
    learned = torch.cat([true_decoder + 0.01 * torch.randn(true_decoder.shape, generator=generator), extra])
    perm = torch.randperm(learned.shape[0], generator=generator)
    result = recovery(learned[perm], true_decoder, emergence)
    assert result.fraction_recovered == 1.0
    assert result.emergence_accuracy == 1.0
    assert torch.equal(perm[result.learned_index], result.true_index)  # each matched to its own copy
    assert (result.cosine > 0.99).all()
    assert result.summary()["n_true"] == 12


def test_recovery_of_a_random_dictionary() -> None:
    true_decoder, emergence = _planted()
    learned = torch.randn(30, *true_decoder.shape[1:], generator=torch.Generator().manual_seed(2))
    result = recovery(learned, true_decoder, emergence)
    assert result.fraction_recovered == 0.0 and result.emergence_accuracy == 0.0  # unrecovered counts as wrong
    assert result.cosine.abs().max() < 0.6


def test_recovery_with_fewer_learned_than_planted_and_wrong_emergence() -> None:
    true_decoder, emergence = _planted()
    learned = true_decoder[:6].clone()
    # Norms from another space (as for an exported dictionary): they alone decide the learned emergence.
    learned_norms = learned.norm(dim=-1)
    learned_norms[1] = torch.tensor([1.0, 0.1, 0.1, 0.1])  # planted 1 emerges at snapshot 1; this says 0
    result = recovery(learned, true_decoder, emergence, learned_norms=learned_norms)
    assert result.true_index.tolist() == list(range(6))
    assert result.recovered.sum() == 6 and result.fraction_recovered == pytest.approx(0.5)
    assert result.learned_emergence[6:].eq(-1).all()
    assert result.learned_emergence[1] == 0 and not result.emergence_correct[1]
    assert result.emergence_accuracy == pytest.approx(5 / 12)


def test_decoder_cosine_uses_concatenated_snapshots() -> None:
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])
    assert decoder_cosine(a, b).item() == pytest.approx(0.0)
    assert decoder_cosine(a, a).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ"):
        recovery(a, torch.zeros(1, 3, 2), torch.zeros(1))
