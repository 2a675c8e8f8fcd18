"""The data x snapshot layout in two real gloo processes (torch.multiprocessing.spawn): the split crosscoder's
gradients against one rank's, the assembled export, and the token check. In-process: tests/unit/test_layout.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crosscoder.dictionary.crosscoder import SNAPSHOT_DIMS, Crosscoder
from crosscoder.errors import TokenDriftError
from crosscoder.parallel.engine import free_port
from crosscoder.parallel.layout import Layout, build_layout

S, D, F, B = 3, 8, 32, 16


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
