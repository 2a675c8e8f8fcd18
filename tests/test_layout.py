"""The data x snapshot layout: shares, start-up checks, the split crosscoder's gradients against one rank's (two
real gloo processes), the assembled export, and the token check."""

from __future__ import annotations

import os
import re
from pathlib import Path

import crosscoder.model
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from crosscoder.layout import Layout, TokenDriftError, build_layout, check_layout, snapshot_shares
from crosscoder.model import SNAPSHOT_DIMS, Crosscoder

from crosscoder.config import ConfigError, RunConfig
from crosscoder.parallel import free_port

S, D, F, B = 3, 8, 32, 16


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
    monkeypatch.setattr(crosscoder.model, "INIT_CHUNK_ELEMENTS", 16 * n_sources * d_model)
    torch.manual_seed(0)
    whole = Crosscoder(n_sources, d_model, dict_size)
    for share in (range(0, 2), range(2, n_sources)):
        torch.manual_seed(0)
        part = Crosscoder(n_sources, d_model, dict_size, snapshot_share=share)
        assert torch.equal(part.W_dec, whole.W_dec[:, share.start : share.stop])
        assert torch.equal(part.W_enc, whole.W_enc[share.start : share.stop])
        assert part.W_dec.model_parallel and not hasattr(part.b_enc, "model_parallel")  # b_enc counted once


def _spawn(target, world: int, *args: object) -> None:  # noqa: ANN001
    """Run target(rank, world, port, *args) in `world` gloo processes; a failed assertion in any fails the test."""
    mp.spawn(target, args=(world, free_port(), *args), nprocs=world)


def _join(rank: int, world: int, port: int) -> Layout:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return build_layout(world, S)


def _split_matches_one_rank(rank: int, world: int, port: int, activation: str) -> None:
    layout = _join(rank, world, port)
    try:
        torch.manual_seed(1)
        x = torch.randn(B, S, D) * 3
        dead = torch.zeros(F, dtype=torch.bool)
        dead[::3] = True  # AuxK runs too (topk / batchtopk)
        torch.manual_seed(0)
        whole = Crosscoder(S, D, F, activation, k=4)
        torch.manual_seed(0)
        part = Crosscoder(S, D, F, activation, k=4, snapshot_share=layout.share, reduction=layout.reduction)
        scale = torch.tensor([0.5, 2.0, 1.5])
        whole.set_input_scale(scale)
        part.set_input_scale(scale[layout.share.start : layout.share.stop])
        expected = whole(x, 0.5, dead)
        expected.loss.backward()
        got = part(x[:, layout.share.start : layout.share.stop], 0.5, dead)
        got.loss.backward()

        total = got.loss.detach().clone()
        dist.all_reduce(total)  # each rank's loss is its snapshots' share
        torch.testing.assert_close(total, expected.loss.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(got.codes, expected.codes, rtol=0, atol=1e-6)  # one code on every rank
        for name, param in part.named_parameters():
            whole_grad = getattr(whole, name).grad
            if name in SNAPSHOT_DIMS:
                whole_grad = whole_grad.narrow(SNAPSHOT_DIMS[name], layout.share.start, len(layout.share))
            torch.testing.assert_close(param.grad, whole_grad, rtol=1e-5, atol=1e-6, msg=name)

        assembled = layout.assemble({k: v.detach() for k, v in part.state_dict().items()}, SNAPSHOT_DIMS)
        if rank == 0:
            assert assembled.keys() == whole.state_dict().keys()
            for name, tensor in whole.state_dict().items():  # the BatchTopK threshold: summation order
                torch.testing.assert_close(assembled[name], tensor, rtol=0, atol=1e-6, msg=name)
        else:
            assert assembled == {}
        if layout.reduction.bytes_reduced == 0:
            raise AssertionError("the split crosscoder all-reduced nothing")
        if activation != "relu":
            _dense_topk_paths_match(layout, part, x, dead, scale, activation)
    finally:
        dist.destroy_process_group()


def _dense_topk_paths_match(layout: Layout, sparse: Crosscoder, x: torch.Tensor, dead: torch.Tensor,
                            scale: torch.Tensor, activation: str) -> None:
    """The dense TopK path (sparse_topk=False) gives the sparse step's gradients; in it, the backward that sums
    only the active entries of d pre over the group (restrict_gradient, the default) equals the full one
    bit for bit, with fewer bytes."""
    grads, sent = [], []
    for sparse_gradient in (True, False):
        layout.reduction.sparse_gradient = sparse_gradient
        before = layout.reduction.bytes_reduced
        torch.manual_seed(0)
        dense = Crosscoder(S, D, F, activation, k=4, snapshot_share=layout.share, reduction=layout.reduction,
                           sparse_topk=False)
        dense.set_input_scale(scale[layout.share.start : layout.share.stop])
        dense(x[:, layout.share.start : layout.share.stop], 0.5, dead).loss.backward()
        grads.append({name: param.grad for name, param in dense.named_parameters()})
        sent.append(layout.reduction.bytes_reduced - before)
    layout.reduction.sparse_gradient = True
    for name, param in sparse.named_parameters():
        assert torch.equal(grads[0][name], grads[1][name]), name
        torch.testing.assert_close(param.grad, grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    assert sent[0] < sent[1], sent


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_two_snapshot_ranks_have_the_one_rank_gradients(activation: str) -> None:
    """Uneven shares (2 + 1 snapshots): summed partial pre-activations, the gradient all-reduced in backward
    (b_enc's whole gradient from the same all-reduce), the latent weights summed for TopK selection and the
    AuxK normaliser over all snapshots give every parameter its one-rank gradient; rank 0 reassembles the
    one-rank state dict. TopK / BatchTopK: the sparse step (the default), and the dense one too. Tolerance:
    float32 summation order of the split sums."""
    _spawn(_split_matches_one_rank, 2, activation)


def _token_check(rank: int, world: int, port: int) -> None:
    layout = _join(rank, world, port)
    try:
        ids = torch.arange(64)
        layout.check_same_tokens(ids, step=0, device=torch.device("cpu"))  # the same tokens: passes
        drifted = ids.clone()
        if rank == 1:
            drifted[5] += 1
        with pytest.raises(TokenDriftError, match=r"snapshot group\(s\) \[0\].*different tokens at step 7"):
            layout.check_same_tokens(drifted, step=7, device=torch.device("cpu"))  # every rank stops
    finally:
        dist.destroy_process_group()


def test_a_snapshot_group_that_reads_different_tokens_is_stopped_on_every_rank() -> None:
    _spawn(_token_check, 2)


def test_resuming_under_another_layout_is_refused_naming_it(tmp_path: Path) -> None:
    from crosscoder.training_state import check_same_run
    from omegaconf import OmegaConf

    saved = RunConfig(output_dir="run")
    saved.parallel.snapshot_parallel = 2
    now = RunConfig(output_dir="run")
    def to_dict(cfg: RunConfig) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    with pytest.raises(ConfigError, match="parallel.snapshot_parallel=2.*parallel.snapshot_parallel=1"):
        check_same_run(to_dict(saved), to_dict(now), tmp_path)
    now.parallel.snapshot_parallel, now.parallel.token_check_every = 2, 50  # how often to check may change
    check_same_run(to_dict(saved), to_dict(now), tmp_path)
