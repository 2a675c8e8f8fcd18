"""The data x snapshot layout: shares, start-up checks, a share's slice of the whole initialisation, and a
resume under another layout. In two real gloo processes (the split crosscoder's gradients against one rank's,
the assembled export, the token check): tests/launch/test_layout.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import crosscoder.dictionary.crosscoder
from crosscoder.config import RunConfig
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.errors import ConfigError
from crosscoder.parallel.layout import check_layout, snapshot_shares


def test_snapshot_shares_are_contiguous_and_differ_by_at_most_one() -> None:
    assert snapshot_shares(3, 2) == [range(0, 2), range(2, 3)]
    assert snapshot_shares(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert snapshot_shares(4, 4) == [range(i, i + 1) for i in range(4)]
    assert snapshot_shares(5, 1) == [range(0, 5)]


@pytest.mark.parametrize(("world", "sp", "n_snapshots", "batch", "message"), [
    (3, 2, 4, 64, "parallel.snapshot_parallel=2 does not divide the 3 ranks"),
    (4, 4, 3, 64, "parallel.snapshot_parallel=4 must be in [1, 3]"),
    (4, 2, 4, 63, "trainer.batch_size=63 is not divisible by the 2 data-parallel rank(s)"),
    (2, 0, 4, 64, "parallel.snapshot_parallel=0 must be >= 1"),
])
def test_a_layout_that_cannot_be_built_is_refused_naming_the_values(world: int, sp: int, n_snapshots: int,
                                                                    batch: int, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_layout(world, sp, n_snapshots, batch)


def test_config_refuses_more_snapshot_ranks_than_snapshots() -> None:
    cfg = RunConfig(output_dir="unused")
    cfg.sources.kind = "toy"  # 8 snapshots by default
    cfg.parallel.snapshot_parallel = 9
    with pytest.raises(ConfigError, match="parallel.snapshot_parallel=9 is more than the 8 snapshots"):
        cfg.validate()
    cfg.parallel.snapshot_parallel, cfg.parallel.token_check_every = 8, -1
    with pytest.raises(ConfigError, match="parallel.token_check_every=-1"):
        cfg.validate()


@pytest.mark.parametrize(("dict_size", "n_sources", "d_model"), [(64, 3, 8), (200, 5, 8), (30, 3, 5)])
def test_a_share_starts_from_its_slice_of_the_whole_initialisation(monkeypatch: pytest.MonkeyPatch, dict_size: int,
                                                                   n_sources: int, d_model: int) -> None:
    """Drawn in chunks (small here, so several), a share's weights are exactly its columns of the one-rank init,
    so every layout starts where one rank does. (30, 3, 5) has no multiple-of-16 size and draws it whole."""
    monkeypatch.setattr(crosscoder.dictionary.crosscoder, "INIT_CHUNK_ELEMENTS", 16 * n_sources * d_model)
    torch.manual_seed(0)
    whole = Crosscoder(n_sources, d_model, dict_size)
    for share in (range(0, 2), range(2, n_sources)):
        torch.manual_seed(0)
        part = Crosscoder(n_sources, d_model, dict_size, snapshot_share=share)
        assert torch.equal(part.W_dec, whole.W_dec[:, share.start : share.stop])
        assert torch.equal(part.W_enc, whole.W_enc[share.start : share.stop])
        assert part.W_dec.model_parallel and not hasattr(part.b_enc, "model_parallel")  # b_enc counted once


def test_resuming_under_another_layout_is_refused_naming_it(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from crosscoder.training.state import check_same_run

    saved = RunConfig(output_dir="run")
    saved.parallel.snapshot_parallel = 2
    now = RunConfig(output_dir="run")
    def to_dict(cfg: RunConfig) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    with pytest.raises(ConfigError, match="parallel.snapshot_parallel=2.*parallel.snapshot_parallel=1"):
        check_same_run(to_dict(saved), to_dict(now), tmp_path)
    now.parallel.snapshot_parallel, now.parallel.token_check_every = 2, 50  # how often to check may change
    check_same_run(to_dict(saved), to_dict(now), tmp_path)
