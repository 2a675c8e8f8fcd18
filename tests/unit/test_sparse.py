"""crosscoder.dictionary.sparse kernels on their own (the whole sparse step against the dense one is in test_model)."""

from __future__ import annotations

import pytest
import torch

from crosscoder.dictionary.sparse import batch_top


@pytest.mark.parametrize(
    ("rows", "width", "n_keep", "heavy_rows"),
    [(64, 100, 192, 0), (7, 5, 14, 0), (300, 400, 3000, 0), (300, 400, 3000, 3), (100, 50, 4000, 2), (5, 7, 35, 0)],
)
def test_batch_top_picks_what_a_top_k_of_the_flattened_scores_picks(rows: int, width: int, n_keep: int,
                                                                     heavy_rows: int) -> None:
    """Exact against flatten().topk, also when a few rows hold most of the batch's top entries (so their
    first candidates are all chosen and they must offer more: the retry path) and when every entry is kept."""
    generator = torch.Generator().manual_seed(rows + width)
    scores = torch.rand(rows, width, generator=generator) * torch.rand(width, generator=generator)
    scores[:heavy_rows] *= 50
    values, flat = batch_top(scores, n_keep, per_row=2 * max(1, n_keep // rows))
    expected = scores.flatten().topk(n_keep).values
    assert torch.equal(values.sort().values, expected.sort().values)
    assert torch.equal(scores.flatten()[flat], values)
    assert flat.unique().numel() == n_keep


def test_batch_top_with_ties_keeps_distinct_entries() -> None:
    """Many equal scores (ReLU zeros): any n_keep of the tied entries will do, but each once."""
    scores = torch.zeros(50, 40)
    scores[:, :3] = 1.0
    values, flat = batch_top(scores, 400, per_row=8)
    assert flat.unique().numel() == 400
    assert values.sum() == 150  # every one of the 150 positive entries is chosen
