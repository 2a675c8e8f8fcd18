"""`crosscoder-cache` snapshot-parallel, in-process: what rank 0 does with the parts of one block that
its snapshot ranks gathered. The 2-rank builds themselves: tests/launch/test_build_cache_parallel.py."""

from __future__ import annotations

import pytest
import torch

from crosscoder.cli.cache import _assemble, _Failure
from crosscoder.errors import TokenDriftError


def test_rank_zero_refuses_columns_of_other_tokens_or_a_failed_rank() -> None:
    """What rank 0 does with the gathered parts of one block (no processes needed)."""
    shares = [range(0, 2), range(2, 3)]
    tokens = torch.arange(5)
    ours, theirs = (7, torch.zeros(5, 2, 4), tokens), (7, torch.ones(5, 1, 4), tokens.clone())
    block = _assemble([ours, theirs], shares)
    assert block.index == 7 and block.token_ids.equal(tokens)
    assert block.activations.equal(torch.cat([torch.zeros(5, 2, 4), torch.ones(5, 1, 4)], dim=1))
    assert _assemble([None, None], shares) is None  # a finite corpus ended on every rank
    with pytest.raises(TokenDriftError, match="snapshot rank 1 made block 7"):
        _assemble([ours, (7, theirs[1], tokens + 1)], shares)
    with pytest.raises(TokenDriftError, match="snapshot rank 1 made block 8"):
        _assemble([ours, (8, theirs[1], tokens)], shares)
    with pytest.raises(TokenDriftError, match=r"rank\(s\) \[1\] ended"):
        _assemble([ours, None], shares)
    with pytest.raises(RuntimeError, match=r"snapshot rank 1 \(snapshots \[2\]\) failed .*worker died"):
        _assemble([ours, _Failure(1, "WorkerError: worker died")], shares)
