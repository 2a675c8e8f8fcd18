"""Paired activations: one shared mask of trained-on positions, row j of every source is the same token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModel

from crosscoder.config import SourcesConfig
from crosscoder.data.activations import paired_activations, valid_token_mask
from crosscoder.data.kinds import load_sources
from crosscoder.data.tokens import TokenBatch
from crosscoder.sources.hooks import SnapshotRunner
from crosscoder.sources.models import HookPoint

CPU = torch.device("cpu")
BOS, PAD = 0, 1  # the toy tokenizer's ids (Pythia's layout)
LAYER = 1  # blocks.1.hook_resid_pre == hidden_states[1]


def _batch() -> tuple[TokenBatch, list[tuple[int, int]]]:
    """A hand-made batch with a mid-row BOS, right padding, a masked non-pad id and an attended pad id.

    Returns the batch and the (row, position) pairs that must be kept, in row-major order.
    """
    input_ids = torch.tensor([
        [BOS, 11, 12, 13, BOS, 14, 15, 16, 17, 18],  # BOS in the middle (a document boundary)
        [BOS, 21, 22, 23, 24, 25, PAD, PAD, PAD, PAD],  # right padding, attention 0
        [BOS, 31, 32, 33, 34, 35, 36, 37, 38, 39],  # attention 0 on the last two (ids are not PAD)
        [BOS, 41, PAD, 43, 44, 45, 46, 47, 48, BOS],  # PAD id while attended; BOS at the end
    ])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 8:] = 0
    keep = (
        [(0, t) for t in (1, 2, 3, 5, 6, 7, 8, 9)]
        + [(1, t) for t in range(1, 6)]
        + [(2, t) for t in range(1, 8)]
        + [(3, t) for t in (1, 3, 4, 5, 6, 7, 8)]
    )
    return TokenBatch(input_ids=input_ids, attention_mask=attention_mask), keep


@pytest.fixture(scope="module")
def models(tiny_snapshots: list) -> list[nn.Module]:
    transformers.logging.set_verbosity_error()
    return [AutoModel.from_pretrained(s.path).eval() for s in tiny_snapshots]


def test_valid_token_mask_drops_bos_and_padding() -> None:
    """The mask is True exactly at attended, non-BOS, non-PAD positions."""
    batch, keep = _batch()
    mask = valid_token_mask(batch, BOS, PAD)
    assert sorted(map(tuple, mask.nonzero().tolist())) == keep
    # Without a pad id only attention and BOS decide.
    no_pad = valid_token_mask(batch, BOS, None)
    assert no_pad[3, 2] and int(no_pad.sum()) == len(keep) + 1


def test_rows_are_the_same_token_in_every_snapshot(models: list[nn.Module]) -> None:
    """Row j of source s is snapshot s's activation at the j-th kept (row, position), computed on its own."""
    batch, keep = _batch()
    runners = [SnapshotRunner(m, HookPoint(LAYER, "pre"), f"s{i}") for i, m in enumerate(models)]
    acts = paired_activations(batch, runners, BOS, PAD, CPU)
    assert acts.shape == (len(keep), len(models), 32) and acts.dtype == torch.float32

    lengths = batch.attention_mask.sum(dim=1)
    for s, model in enumerate(models):
        # Reference: each row alone, padding cut off, through the plain HF forward.
        per_row = []
        with torch.no_grad():
            for b in range(batch.input_ids.shape[0]):
                ids = batch.input_ids[b : b + 1, : lengths[b]]
                per_row.append(model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER][0])
        expected = torch.stack([per_row[b][t] for b, t in keep])
        torch.testing.assert_close(acts[:, s], expected, rtol=0, atol=1e-5)
    # Different snapshots give different activations, so the per-source check above is not vacuous.
    assert not torch.allclose(acts[:, 0], acts[:, 2], atol=1e-3)


def test_one_snapshot_twice_gives_identical_sources(tiny_snapshots: list, tmp_path: Path) -> None:
    """The same snapshot loaded as two sources reads the same tokens, so both slices are equal. (Two names for
    it: sources must be named uniquely.)"""
    paths = []
    for name in ("copyA", "copyB"):
        (tmp_path / name).symlink_to(tiny_snapshots[1].path, target_is_directory=True)
        paths.append(str(tmp_path / name))
    loaded = load_sources(SourcesConfig(paths=paths, hook="blocks.1.hook_resid_pre"), CPU, log=lambda _: None)
    batch, keep = _batch()
    acts = paired_activations(batch, loaded.runners, BOS, PAD, CPU)
    assert acts.shape == (len(keep), 2, 32)
    assert torch.equal(acts[:, 0], acts[:, 1])
    assert acts.abs().sum() > 0
