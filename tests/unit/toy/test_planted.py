"""The planted ground-truth generator: known per-snapshot magnitudes, normalised energy, a restartable stream."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from crosscoder.config import PlantedSourceConfig, RunConfig
from crosscoder.data.planted import (
    EMERGENCE_THRESHOLD,
    KINDS,
    emergence_index,
    planted_blocks,
    planted_truth,
    sample_tokens,
)
from crosscoder.errors import ConfigError

CFG = PlantedSourceConfig(seed=3)


def _blocks(cfg: PlantedSourceConfig, rank: int, world_size: int, n: int, start: int = 0, tokens: int = 64) -> list:
    return list(itertools.islice(planted_blocks(cfg, rank, world_size, start=start, block_tokens=tokens), n))


def test_truth_shapes_and_determinism() -> None:
    truth = planted_truth(CFG)
    n_f, n_s, d = CFG.n_features, CFG.n_snapshots, CFG.d_model
    assert truth.decoder.shape == (n_f, n_s, d) and truth.decoder.dtype == torch.float32
    assert truth.magnitudes.shape == truth.profiles.shape == (n_f, n_s)
    assert truth.emergence.shape == (n_f,) and truth.emergence.dtype == torch.int64
    assert len(truth.kinds) == n_f and set(truth.kinds) == set(KINDS)
    torch.testing.assert_close(truth.decoder.norm(dim=-1), truth.magnitudes)
    again = planted_truth(replace(CFG))
    assert torch.equal(truth.decoder, again.decoder) and truth.kinds == again.kinds
    assert not torch.equal(truth.decoder, planted_truth(replace(CFG, seed=4)).decoder)


def test_kind_counts_follow_shares() -> None:
    cfg = replace(CFG, n_features=100, persistent_share=0.25, emerging_share=0.5, vanishing_share=0.125,
                  transient_share=0.125)
    kinds = planted_truth(cfg).kinds
    assert [kinds.count(kind) for kind in KINDS] == [25, 50, 13, 12]  # largest remainder; ties to the first


def test_magnitude_profiles_and_emergence_per_kind() -> None:
    truth = planted_truth(CFG)
    n_s = CFG.n_snapshots
    on = truth.profiles.bool()
    assert torch.equal(truth.magnitudes > 0, on)
    # Live magnitudes differ only by the snapshot scale, well within the 0.5 threshold: no ambiguous crossing.
    ratio = truth.magnitudes / truth.magnitudes.amax(dim=1, keepdim=True)
    assert ratio[on].min() > 1.5 * EMERGENCE_THRESHOLD
    first_on = on.to(torch.uint8).argmax(dim=1)
    starts: dict[str, set[int]] = {kind: set() for kind in KINDS}
    for i, kind in enumerate(truth.kinds):
        row = on[i].tolist()
        t = int(first_on[i])
        starts[kind].add(t)
        assert int(truth.emergence[i]) == t
        if kind == "persistent":
            assert all(row)
        elif kind == "emerging":
            assert 1 <= t <= n_s - 1 and row == [s >= t for s in range(n_s)]
        elif kind == "vanishing":
            stop = row.index(False)
            assert t == 0 and 1 <= stop <= n_s - 1 and row == [s < stop for s in range(n_s)]
        else:
            stop = t + row[t:].index(False)
            assert 1 <= t < stop <= n_s - 1 and row == [t <= s < stop for s in range(n_s)]
    assert starts["emerging"] == set(range(1, n_s))  # emergence spread over every later snapshot


def test_emergence_index_rule() -> None:
    norms = torch.tensor([[0.0, 0.2, 0.49, 0.5, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert emergence_index(norms).tolist() == [3, 0, 0]
    assert emergence_index(norms, threshold=0.15).tolist() == [1, 0, 0]


def test_energy_is_normalised_per_snapshot() -> None:
    """E||x_s||^2 = d at every snapshot, so the trainer's input scale is ~1 and truth norms are learned norms."""
    truth = planted_truth(CFG)
    codes, x = sample_tokens(truth, 40_000, torch.Generator().manual_seed(0))
    energy = x.double().pow(2).sum(dim=-1).mean(dim=0)
    torch.testing.assert_close(energy, torch.full_like(energy, CFG.d_model), rtol=0.03, atol=0)
    assert (codes > 0).float().sum(dim=1).mean().item() == pytest.approx(CFG.active_per_token, rel=0.03)
    assert codes[codes > 0].min() >= 0.5 and codes.max() <= 1.5


def test_rotation_first_vs_last_cosine() -> None:
    cfg = replace(CFG, rotation_fraction=0.25, rotation_cosine=0.6)
    truth = planted_truth(cfg)
    assert int(truth.rotating.sum()) == round(0.25 * cfg.n_features)
    directions = truth.directions
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(cfg.n_features, cfg.n_snapshots))
    on = truth.profiles.bool()[:, :, None]
    torch.testing.assert_close(truth.decoder, torch.where(on, directions, 0) * truth.magnitudes[:, :, None])
    cos = (directions[:, 0] * directions[:, -1]).sum(-1)
    torch.testing.assert_close(cos[truth.rotating], torch.full_like(cos[truth.rotating], 0.6))
    torch.testing.assert_close(cos[~truth.rotating], torch.ones_like(cos[~truth.rotating]))
    # Smooth: the same angle between every pair of consecutive snapshots.
    steps = (directions[truth.rotating, 1:] * directions[truth.rotating, :-1]).sum(-1)
    torch.testing.assert_close(steps, torch.full_like(steps, float(steps.mean())))
    assert float(steps.mean()) > 0.95


def test_block_shapes_and_token_ids() -> None:
    blocks = _blocks(CFG, rank=0, world_size=1, n=3, tokens=50)
    for j, block in enumerate(blocks):
        assert block.index == j
        assert block.activations.shape == (50, CFG.n_snapshots, CFG.d_model)
        assert block.activations.dtype == torch.float32 and block.token_ids.dtype == torch.int64
        assert block.token_ids.tolist() == list(range(50 * j, 50 * (j + 1)))


def test_restart_continues_the_stream_exactly() -> None:
    fresh = _blocks(CFG, rank=1, world_size=2, n=6)
    resumed = _blocks(CFG, rank=1, world_size=2, n=2, start=4)
    for a, b in zip(fresh[4:], resumed, strict=True):
        assert a.index == b.index
        assert torch.equal(a.activations, b.activations) and torch.equal(a.token_ids, b.token_ids)


def test_ranks_get_disjoint_rows_that_interleave_into_the_one_rank_stream() -> None:
    rank0, rank1 = _blocks(CFG, 0, 2, n=3), _blocks(CFG, 1, 2, n=3)
    ids0 = torch.cat([b.token_ids for b in rank0])
    ids1 = torch.cat([b.token_ids for b in rank1])
    assert not set(ids0.tolist()) & set(ids1.tolist())
    assert not torch.equal(rank0[0].activations, rank1[0].activations)
    single = _blocks(CFG, 0, 1, n=6)
    interleaved = [b for pair in zip(rank0, rank1, strict=True) for b in pair]
    for a, b in zip(single, interleaved, strict=True):
        assert torch.equal(a.activations, b.activations) and torch.equal(a.token_ids, b.token_ids)


def test_bad_stream_arguments() -> None:
    with pytest.raises(ValueError, match="rank=2"):
        next(planted_blocks(CFG, rank=2, world_size=2))
    with pytest.raises(ValueError, match="block_tokens=0"):
        next(planted_blocks(CFG, rank=0, world_size=1, block_tokens=0))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_features": 0}, r"sources\.planted\.n_features=0"),
        ({"d_model": -1}, r"sources\.planted\.d_model=-1"),
        ({"n_snapshots": 2}, r"sources\.planted\.n_snapshots=2"),
        ({"emerging_share": 1.5}, r"sources\.planted\.emerging_share=1\.5"),
        ({"persistent_share": 0.5}, r"sum to 1\.2"),
        ({"active_per_token": 0.0}, r"sources\.planted\.active_per_token=0\.0"),
        ({"active_per_token": 500.0}, r"sources\.planted\.active_per_token=500\.0"),
        ({"rotation_fraction": -0.1}, r"sources\.planted\.rotation_fraction=-0\.1"),
        ({"rotation_cosine": 1.5}, r"sources\.planted\.rotation_cosine=1\.5"),
        ({"noise": -0.2}, r"sources\.planted\.noise=-0\.2"),
    ],
)
def test_config_validation_names_the_bad_value(changes: dict, message: str) -> None:
    cfg = RunConfig(output_dir="/tmp/run")
    cfg.sources.kind = "planted"
    assert cfg.validate() is cfg
    cfg.sources.planted = replace(cfg.sources.planted, **changes)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    with pytest.raises(ConfigError, match=message):
        planted_truth(cfg.sources.planted)


def test_two_snapshots_without_transients_is_valid() -> None:
    cfg = replace(CFG, n_snapshots=2, persistent_share=0.5, emerging_share=0.25, vanishing_share=0.25,
                  transient_share=0.0)
    truth = planted_truth(cfg)
    assert truth.decoder.shape[1] == 2 and set(truth.emergence.tolist()) == {0, 1}
