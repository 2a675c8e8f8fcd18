"""One dictionary per snapshot side by side (crosscoder.dictionary.independent): each dictionary sees only its snapshot,
gets only its own loss's gradient, and starts from weights that do not depend on how the snapshots are split."""

from __future__ import annotations

import pytest
import torch

from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.independent import IndependentDictionaries, split_dictionary_states

S, D, F = 3, 8, 16


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_each_dictionary_sees_its_snapshot_and_only_its_own_loss(activation: str) -> None:
    torch.manual_seed(0)
    module = IndependentDictionaries(S, D, F, seed=3, activation=activation, k=4)
    module.set_input_scale(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(32, S, D) * torch.tensor([4.0, 1.0, 0.25])[None, :, None]
    out = module(x, l1_coeff=0.1)
    assert out.codes.shape == (32, S, F)
    out.loss.backward()
    for s, dictionary in enumerate(module.dictionaries):
        alone = Crosscoder(1, D, F, activation=activation, k=4)
        alone.load_state_dict(dictionary.state_dict())
        own = alone(x[:, s : s + 1], l1_coeff=0.1)
        torch.testing.assert_close(out.codes[:, s], own.codes)
        torch.testing.assert_close(out.normalized_reconstruction[:, s : s + 1], own.normalized_reconstruction)
        own.loss.backward()
        for (name, mine), theirs in zip(dictionary.named_parameters(), alone.parameters(), strict=True):
            torch.testing.assert_close(mine.grad, theirs.grad, msg=name)  # no cross-talk between dictionaries
    total = sum(dictionary(x[:, s : s + 1], l1_coeff=0.1).loss for s, dictionary in enumerate(module.dictionaries))
    torch.testing.assert_close(out.loss, total)


def test_a_share_starts_from_the_whole_runs_dictionaries_and_names_them_globally() -> None:
    whole = IndependentDictionaries(S, D, F, seed=1)
    tail = IndependentDictionaries(S, D, F, seed=1, snapshot_share=range(1, 3))
    assert all(getattr(p, "model_parallel", False) for p in tail.parameters())
    for local, global_index in ((0, 1), (1, 2)):
        torch.testing.assert_close(tail.dictionaries[local].W_dec, whole.dictionaries[global_index].W_dec)
    assert not torch.equal(whole.dictionaries[0].W_dec, whole.dictionaries[1].W_dec)  # seeds differ per snapshot
    other_seed = IndependentDictionaries(S, D, F, seed=2)
    assert not torch.equal(other_seed.dictionaries[0].W_dec, whole.dictionaries[0].W_dec)

    named = {**IndependentDictionaries(S, D, F, seed=1, snapshot_share=range(0, 1)).global_state(
        IndependentDictionaries(S, D, F, seed=1, snapshot_share=range(0, 1)).state_dict()),
        **tail.global_state(tail.state_dict())}
    states = split_dictionary_states(named, S)
    for s in range(S):
        torch.testing.assert_close(states[s]["W_dec"], whole.dictionaries[s].W_dec)
    with pytest.raises(ValueError, match=r"no dictionary for snapshot\(s\) \[0\]"):
        split_dictionary_states(tail.global_state(tail.state_dict()), S)


def test_dead_masks_reach_each_dictionarys_aux_loss() -> None:
    """AuxK runs per dictionary on its own row of the [S, F] dead mask."""
    torch.manual_seed(0)
    module = IndependentDictionaries(S, D, F, activation="topk", k=2, aux_k=4)
    x = torch.randn(16, S, D)
    dead = torch.zeros(S, F, dtype=torch.bool)
    dead[1, :8] = True
    out = module(x, dead_mask=dead)
    alone = [d(x[:, s : s + 1], dead_mask=dead[s]).aux_loss for s, d in enumerate(module.dictionaries)]
    assert alone[0] == 0 and alone[2] == 0 and alone[1] > 0
    torch.testing.assert_close(out.aux_loss, sum(alone))
