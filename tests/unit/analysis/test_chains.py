"""A stack's slots cut into chains where consecutive decoders stop being one feature (analysis.features.chains)."""

from __future__ import annotations

import torch

from crosscoder.analysis.features.chains import chain_segments
from crosscoder.analysis.features.evolution import emergence_snapshots, normalized_trajectories


def _unit(*shape: int, seed: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def test_a_slot_reused_by_a_later_feature_is_two_chains_and_an_unbroken_slot_stays_whole() -> None:
    """Slot 0 holds a feature that vanishes after snapshot 1 and, from snapshot 2, an unrelated one (what SAE
    Match leaves when a feature dies and another is born); slot 1 one feature that drifts a little; slot 2 is
    zero until its feature appears at snapshot 2 (its run of zeros is no chain); slot 3 is zero throughout (one
    dead chain, as a crosscoder's dead latent)."""
    vanishing, emerging, steady = _unit(3, 16, seed=0)
    drift = 0.05 * _unit(4, 16, seed=1)
    w_dec = torch.stack([
        torch.stack([vanishing, vanishing, emerging, emerging]),
        steady + drift,
        torch.stack([torch.zeros(16), torch.zeros(16), 2 * steady, 2 * steady]),
        torch.zeros(4, 16),
    ])
    chains = chain_segments(w_dec, w_dec.norm(dim=-1))
    assert chains.slot.tolist() == [0, 0, 1, 2, 3]
    assert chains.first.tolist() == [0, 2, 0, 2, 0] and chains.last.tolist() == [1, 3, 3, 3, 3]
    torch.testing.assert_close(chains.decoder[0, :2], w_dec[0, :2])
    assert chains.decoder[0, 2:].abs().max() == 0 and chains.decoder[1, :2].abs().max() == 0
    torch.testing.assert_close(chains.decoder[2], w_dec[1])  # never cut: the slot itself
    torch.testing.assert_close(chains.decoder[3], w_dec[2])
    emergence = emergence_snapshots(normalized_trajectories(chains.norms[:4]))
    assert emergence.tolist() == [0, 2, 0, 2]  # read as one slot, the emerging feature would date from snapshot 0

    frequency = torch.arange(16.0).view(4, 4)  # [S, F] per slot
    spread = chains.spread(frequency)
    assert spread[:, 0].tolist() == [0.0, 4.0, 0.0, 0.0] and spread[:, 1].tolist() == [0.0, 0.0, 8.0, 12.0]


def test_a_latent_that_stops_firing_ends_its_chain_though_its_decoder_stays() -> None:
    """A dead latent keeps the direction it last learned (nothing updates it): without the firing mask the slot
    would look present after its feature vanished."""
    feature = _unit(16, seed=4)
    w_dec = feature.expand(1, 4, 16).clone()
    unmasked = chain_segments(w_dec, w_dec.norm(dim=-1))
    assert unmasked.first.tolist() == [0] and unmasked.last.tolist() == [3]
    fired = torch.tensor([[True, True, False, False]])
    masked = chain_segments(w_dec, w_dec.norm(dim=-1), present=fired)
    assert masked.first.tolist() == [0] and masked.last.tolist() == [1]
    assert masked.norms[0, 2:].abs().max() == 0


def test_a_stricter_cosine_cuts_drift_that_a_looser_one_keeps() -> None:
    base = _unit(16, seed=2)
    w_dec = torch.stack([base, 0.6 * base + 0.8 * _unit(16, seed=3)])[None]  # one slot, consecutive cos ~0.6
    assert len(chain_segments(w_dec, w_dec.norm(dim=-1), min_cosine=0.5).slot) == 1
    assert len(chain_segments(w_dec, w_dec.norm(dim=-1), min_cosine=0.9).slot) == 2
