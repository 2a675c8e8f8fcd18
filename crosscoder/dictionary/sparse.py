"""Sparse kernels of a TopK / BatchTopK step: only the active latents are decoded and back-propagated.

A TopK code has k of F latents on per token, so of the step's five big products only the encoder forward
(every pre-activation is needed to pick the top k) touches all F latents. The other four touch the N active
(token, latent) pairs only:

    decode         x̂[b]      = Σ_n∈b v_n W_dec[i_n]                 embedding_bag (no [N, S·d] gather)
    d code         d v_n      = <d x̂[b_n], W_dec[i_n]>             sampled dense-dense product (SDDMM)
    d decoder      d W_dec    = Dᵀ d x̂        (D: [B, F], N entries) sparse × dense
    d encoder      d W_enc    = x_inᵀ D'      (D': d pre, N entries) sparse × dense

Active pairs are passed as sorted flat indices b·F + i (row-major), so row b's entries are contiguous and in
latent order: the layout CSR wants, and the same order on every rank of a snapshot group. Split by snapshot,
each rank's d v covers its own snapshots; `gather_active` sums it over the group (N values, not B·F) before
the encoder gradient, which also gives every replica of the shared b_enc its whole gradient.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from crosscoder.dictionary.group import SnapshotGroup

# CSR is what sampled_addmm takes; torch calls it beta on every first use, which says nothing to a user.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _rows_and_latents(flat: torch.Tensor, dict_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.div(flat, dict_size, rounding_mode="floor"), flat.remainder(dict_size)


def _row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows + 1] CSR row pointers of sorted row indices."""
    offsets = rows.new_zeros(n_rows + 1)
    offsets[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return offsets


def _transposed(rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                order: torch.Tensor | None = None) -> torch.Tensor:
    """Dᵀ [F, B] in CSR (latent-major) from the row-major pairs (`order`: their latent-major order, if known); a
    repeated pair (an AuxK pair may repeat a TopK one) stays two entries, which the product sums."""
    order = _order_by(latents) if order is None else order
    return torch.sparse_csr_tensor(_row_offsets(latents, shape[1]), rows[order], values[order], (shape[1], shape[0]),
                                   check_invariants=False)


def _sparse_times_dense(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """sparse [m, n] @ dense [n, p] into a fresh [m, p]: with beta=0 the output is neither zero-filled first nor
    copied from a temporary, as torch.sparse.mm does (two of its three passes over the output on CPU)."""
    out = dense.new_empty(sparse.shape[0], dense.shape[1])
    return torch.addmm(out, sparse, dense, beta=0.0, out=out)


def _order_by(keys: torch.Tensor) -> torch.Tensor:
    """A stable argsort of small non-negative integer keys (torch's radix sort: 2 ms for 131k keys on 2 cores)."""
    return torch.argsort(keys, stable=True)


def sorted_pairs(indices: torch.Tensor, dict_size: int) -> torch.Tensor:
    """Row-major sorted flat indices b·F + i of per-row latent indices [B, m] (each row's unique)."""
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None] * dict_size
    return (rows + indices.sort(dim=1).values).flatten()


def sorted_flat(indices: torch.Tensor) -> torch.Tensor:
    """Unique flat indices in ascending order."""
    return indices.sort().values


def batch_top(scores: torch.Tensor, n_keep: int, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n_keep` largest entries of scores [B, F] as (values, flat indices b·F + i): what a top-k of the
    flattened tensor picks (up to ties), at about one per-row top-k's cost (a top-k over all B·F entries at once
    is ~5x slower on CPU). It chooses among each row's `per_row` largest. That is exact unless a row has all its
    candidates chosen (it may hold more): those rows alone get twice as many candidates, and it chooses again."""
    n_rows, width = scores.shape
    per_row = min(width, max(per_row, -(-n_keep // n_rows)))
    values, latents = scores.topk(per_row, dim=1)
    rows = torch.arange(n_rows, device=scores.device)[:, None].expand_as(latents)
    values, flat = values.flatten(), (rows * width + latents).flatten()
    offered = torch.full((n_rows,), per_row, device=scores.device)  # candidates each row has given
    while True:
        chosen_values, positions = values.topk(n_keep)
        chosen = flat.index_select(0, positions)
        chosen_per_row = torch.bincount(torch.div(chosen, width, rounding_mode="floor"), minlength=n_rows)
        full = ((chosen_per_row == offered) & (offered < width)).nonzero().squeeze(1)
        if not full.numel():
            return chosen_values, chosen
        more = min(width, 2 * int(offered[full].max()))
        more_values, more_latents = scores.index_select(0, full).topk(more, dim=1)
        kept = ~torch.isin(torch.div(flat, width, rounding_mode="floor"), full)
        values = torch.cat([values[kept], more_values.flatten()])
        flat = torch.cat([flat[kept], (full[:, None] * width + more_latents).flatten()])
        offered[full] = more


class _GatherActive(torch.autograd.Function):
    """ReLU(pre) at the active pairs, differentiable w.r.t. the encoder: pre = Σ_group x_in W_enc + b_enc was
    computed without a graph (its dense backward is what this avoids)."""

    @staticmethod
    def forward(ctx, x_in: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,  # noqa: ANN001
                pre: torch.Tensor, flat: torch.Tensor, reduction: SnapshotGroup) -> torch.Tensor:
        selected = pre.reshape(-1).index_select(0, flat)
        ctx.save_for_backward(x_in, flat, selected > 0)
        ctx.reduction, ctx.shape = reduction, pre.shape
        return selected.relu()

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor) -> tuple:  # noqa: ANN001
        x_in, flat, positive = ctx.saved_tensors
        grad_pre = ctx.reduction.total(grad_values) * positive  # d pre at the active pairs, whole group
        rows, latents = _rows_and_latents(flat, ctx.shape[1])
        transposed = _transposed(rows, latents, grad_pre, ctx.shape)  # [F, B]
        grad_w_enc = _sparse_times_dense(transposed, x_in).t()  # [S·d, F], as W_enc is laid out
        grad_b_enc = grad_pre.new_zeros(ctx.shape[1]).index_add_(0, latents, grad_pre)
        return None, grad_w_enc, grad_b_enc, None, None, None


def gather_active(x_in: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, pre: torch.Tensor,
                  flat: torch.Tensor, reduction: SnapshotGroup) -> torch.Tensor:
    """[N] code values ReLU(pre)[flat] whose gradient reaches W_enc [S·d, F] and b_enc through the N active
    pairs only. `pre` [B, F] must be x_in @ w_enc summed over the group plus b_enc, computed without a graph."""
    return _GatherActive.apply(x_in, w_enc, b_enc, pre, flat, reduction)


class _DecodeActive(torch.autograd.Function):
    """x̂ [B, S·d] = D W_dec for the sparse codes D, and its backward to the code values and the decoder."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, flat: torch.Tensor, w_dec: torch.Tensor,  # noqa: ANN001
                n_rows: int) -> torch.Tensor:
        rows, latents = _rows_and_latents(flat, w_dec.shape[0])
        ctx.save_for_backward(values, rows, latents, w_dec)
        ctx.n_rows = n_rows
        offsets = _row_offsets(rows, n_rows)[:-1]
        return F.embedding_bag(latents, w_dec, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:  # noqa: ANN001
        values, rows, latents, w_dec = ctx.saved_tensors
        shape = (ctx.n_rows, w_dec.shape[0])
        grad_out = grad_out.contiguous()
        order = _order_by(latents)
        grad_values = grad_w_dec = None
        if ctx.needs_input_grad[0]:
            # <d x̂[b], W_dec[i]> at each pair, sampled in latent-major order from W_dec · d x̂ᵀ: W_dec is read
            # in place (the row-major pattern would need a transposed copy of the whole decoder).
            pattern = _transposed(rows, latents, torch.zeros_like(values), shape, order)
            latent_major = torch.sparse.sampled_addmm(pattern, w_dec, grad_out.t(), beta=0.0).values()
            grad_values = torch.empty_like(values).index_copy_(0, order, latent_major)
        if ctx.needs_input_grad[2]:
            grad_w_dec = _sparse_times_dense(_transposed(rows, latents, values, shape, order), grad_out)
        return grad_values, None, grad_w_dec, None


def decode_active(values: torch.Tensor, flat: torch.Tensor, w_dec: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows, S·d] reconstruction (no bias) of the codes with `values` [N] at the sorted flat indices `flat`
    (b·F + i), from the decoder viewed as [F, S·d]."""
    return _DecodeActive.apply(values, flat, w_dec, n_rows)


def dense_codes(values: torch.Tensor, flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The [B, F] codes (no gradient) for metrics and for whoever reads `codes`."""
    return values.detach().new_zeros(shape[0] * shape[1]).index_put_((flat,), values.detach(),
                                                                      accumulate=False).view(shape)
