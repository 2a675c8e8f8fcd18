"""The 2-D layout: world = data_parallel x snapshot_parallel, kept apart from the model and from the loop.

Rank r = i * sp + j has data index i and snapshot index j, so a snapshot group (the sp ranks of one data index)
is a block of consecutive ranks: one node when sp is the GPUs per node, and the per-step all-reduces stay on its
fast links. Rank (i, j) owns the contiguous snapshot share S_j: its workers load only those snapshots and run
them on data shard i; it holds W_enc[S_j], W_dec[:, S_j], b_dec[S_j] and their input scales; b_enc is shared.
All ranks of a snapshot group read the same tokens in the same order. DeepSpeed ZeRO partitions over the data
group (the dp ranks of one snapshot index) only, told so through `SnapshotParallelUnit` (its model-parallel unit).

Forward and backward of the crosscoder under this layout (see `Crosscoder.forward`):
    pre = sum_sp( sum_{s in S_j} x_s W_enc[s] ) + b_enc           backward: sum_sp( d pre )
    w_i = sum_sp( sum_{s in S_j} ||W_dec[i, s]|| )                 (no gradient: a selection score)
Each rank's loss covers only its own snapshots; the backward sum of d pre brings in the others' share, so the
gradient of every parameter is the one-rank gradient.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from crosscoder.errors import ConfigError, TokenDriftError


def snapshot_shares(n_snapshots: int, snapshot_parallel: int) -> list[range]:
    """Contiguous shares of the snapshots, one per snapshot rank; sizes differ by at most one (the first
    n_snapshots mod sp shares take one more), so uneven counts are allowed."""
    if not 1 <= snapshot_parallel <= n_snapshots:
        raise ConfigError(f"parallel.snapshot_parallel={snapshot_parallel} must be in [1, {n_snapshots}] "
                          f"(the number of snapshots): every snapshot rank needs at least one snapshot")
    base, extra = divmod(n_snapshots, snapshot_parallel)
    shares, start = [], 0
    for j in range(snapshot_parallel):
        size = base + (1 if j < extra else 0)
        shares.append(range(start, start + size))
        start += size
    return shares


def check_layout(world_size: int, snapshot_parallel: int, n_snapshots: int, batch_size: int) -> int:
    """Refuse a layout that cannot be built, naming the values; return the data-parallel size."""
    if snapshot_parallel < 1:
        raise ConfigError(f"parallel.snapshot_parallel={snapshot_parallel} must be >= 1")
    if world_size % snapshot_parallel:
        raise ConfigError(f"parallel.snapshot_parallel={snapshot_parallel} does not divide the {world_size} ranks "
                          f"of this launch (world = data_parallel x snapshot_parallel)")
    snapshot_shares(n_snapshots, snapshot_parallel)
    data_parallel = world_size // snapshot_parallel
    if batch_size % data_parallel:
        raise ConfigError(f"trainer.batch_size={batch_size} is not divisible by the {data_parallel} data-parallel "
                          f"rank(s) ({world_size} ranks / parallel.snapshot_parallel={snapshot_parallel})")
    return data_parallel


class _SumOverGroup(torch.autograd.Function):
    """y = sum over the group of x, plus a bias shared by the group. Each rank's loss depends on y, so
    dL/dx = sum over the group of dL_j/dy: one all-reduce, whose result is also the shared bias's gradient (so
    its replicas get the same whole gradient, stay equal, and need no all-reduce of their own)."""

    @staticmethod
    def forward(ctx: Any, partial: torch.Tensor, bias: torch.Tensor, reduction: SnapshotReduction) -> torch.Tensor:  # noqa: ANN401
        ctx.reduction = reduction
        reduction.gradient_support = None  # named by the model once this forward's codes are known
        return reduction.total(partial) + bias

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # noqa: ANN401
        whole = ctx.reduction.total_gradient(grad)
        return whole, whole.sum(dim=0), None


@dataclass
class SnapshotReduction:
    """The sums over a snapshot group that the crosscoder needs; identity when the group is one rank, so a
    snapshot_parallel=1 run does exactly what it did before the layout existed."""

    group: Any = None
    """The snapshot group's process group (None: one rank, nothing to sum)."""
    size: int = 1
    bytes_reduced: int = 0
    """Message bytes all-reduced so far (what bench/memory_bench.py compares against the formula)."""
    sparse_gradient: bool = True
    """All-reduce only the entries of d pre inside `gradient_support` when the model names one (TopK)."""
    gradient_support: torch.Tensor | None = None
    """[B, F] bool: where the gradient of the last forward's pre-activations can be non-zero on any rank."""

    def restrict_gradient(self, support: torch.Tensor) -> None:
        """The codes are k-sparse and the same on every rank of the group (TopK: the selected and the AuxK
        latents), so d pre is zero outside `support` on every rank: the backward then sums only those entries
        (B x (k + aux_k) values instead of B x F; bench/topk_gradient_bench.py measures both)."""
        if self.size > 1 and self.sparse_gradient:
            self.gradient_support = support

    def total_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The backward sum of d pre: dense, or over the named support only."""
        support, self.gradient_support = self.gradient_support, None
        if support is None:
            return self.total(grad)
        index = support.reshape(-1).nonzero().squeeze(1)
        values = self.total(grad.reshape(-1).index_select(0, index))
        return grad.new_zeros(grad.numel()).index_copy_(0, index, values).view_as(grad)

    def partial_sum(self, partial: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """[B, F] partials summed over the group, plus the shared [F] bias: all-reduced in forward, the gradient
        all-reduced in backward."""
        return partial + bias if self.size == 1 else _SumOverGroup.apply(partial, bias, self)

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, no gradient (selection scores, normalisers)."""
        if self.size == 1:
            return tensor
        out = tensor.detach().contiguous().clone()
        dist.all_reduce(out, group=self.group)
        self.bytes_reduced += out.numel() * out.element_size()
        return out


@dataclass
class Layout:
    """This rank's place in the 2-D layout and the process groups it talks over."""

    data_parallel: int = 1
    snapshot_parallel: int = 1
    data_rank: int = 0
    snapshot_rank: int = 0
    shares: list[range] = field(default_factory=lambda: [range(0, 0)])
    snapshot_group: Any = None
    data_group: Any = None
    data_group_ranks: list[int] = field(default_factory=lambda: [0])
    reduction: SnapshotReduction = field(default_factory=SnapshotReduction)

    @property
    def share(self) -> range:
        """The snapshots (indices into the full source list) this rank owns."""
        return self.shares[self.snapshot_rank]

    @property
    def n_snapshots(self) -> int:
        return self.shares[-1].stop

    @property
    def split(self) -> bool:
        return self.snapshot_parallel > 1

    def describe(self) -> str:
        sizes = sorted({len(share) for share in self.shares})
        per_rank = "/".join(str(size) for size in sizes)
        return f"{self.data_parallel} data x {self.snapshot_parallel} snapshot rank(s), {per_rank} snapshot(s) each"

    # ---- per-snapshot values ----------------------------------------------------------------------
    def scatter(self, local: torch.Tensor) -> torch.Tensor:
        """[..., |S_j|] -> [..., S] with zeros outside this rank's share: summed over the world and divided by
        data_parallel it gives the data-parallel mean of every snapshot's value on every rank."""
        if not self.split:
            return local
        full = local.new_zeros((*local.shape[:-1], self.n_snapshots))
        full[..., self.share.start : self.share.stop] = local
        return full

    def assemble(self, local: dict[str, torch.Tensor], dims: dict[str, int]) -> dict[str, torch.Tensor]:
        """Whole tensors on global rank 0 ({} elsewhere) from the data-index-0 ranks' shares: tensors named in
        `dims` are concatenated along that dim in snapshot order, the others (replicated) come from rank 0.
        Collective over the snapshot group of data index 0; the other ranks return {} at once."""
        if not self.split:
            return local
        if self.data_rank != 0:
            return {}
        whole: dict[str, torch.Tensor] = {}
        for name in sorted(local):  # every rank walks the names in one order
            share = local[name] if name in dims else None
            parts: list[Any] | None = [None] * self.snapshot_parallel if self.snapshot_rank == 0 else None
            dist.gather_object(share, parts, dst=0, group=self.snapshot_group)
            if self.snapshot_rank == 0:
                whole[name] = torch.cat(parts, dim=dims[name]) if name in dims else local[name]
        return whole

    def merge(self, local: dict[str, Any]) -> dict[str, Any]:
        """The union on global rank 0 ({} elsewhere) of the data-index-0 ranks' dicts, whose keys differ (each
        rank's own snapshots' entries). Collective over the snapshot group of data index 0."""
        if not self.split:
            return local
        if self.data_rank != 0:
            return {}
        parts: list[Any] | None = [None] * self.snapshot_parallel if self.snapshot_rank == 0 else None
        dist.gather_object(local, parts, dst=0, group=self.snapshot_group)
        return {key: value for part in parts for key, value in part.items()} if parts is not None else {}

    # ---- the token check ---------------------------------------------------------------------------
    def check_same_tokens(self, token_ids: torch.Tensor | None, step: int, device: torch.device) -> None:
        """Every rank of a snapshot group must be training on the same tokens in the same order (the crosscoder
        pairs row b of every snapshot). One small all-reduce over the world: each rank writes its batch's hash
        in its data index's slot (and its negation), MAX gives each slot's largest and smallest hash, and a
        group whose two differ has drifted. Every rank sees the same table, so all stop together. A rank with no
        batch this step (`None`: its stream failed, and the step's health flags stop the run) takes part without
        a vote."""
        if not self.split:
            return
        floor = -(1 << 62)
        table = torch.full((2 * self.data_parallel,), floor, dtype=torch.int64, device=device)
        if token_ids is not None:
            digest = hashlib.sha256(token_ids.to(torch.int64).cpu().contiguous().numpy().tobytes()).digest()
            value = int.from_bytes(digest[:7], "little")  # 56 bits: exact in int64, and -value too
            table[self.data_rank], table[self.data_parallel + self.data_rank] = value, -value
        dist.all_reduce(table, op=dist.ReduceOp.MAX)
        largest, smallest = table[: self.data_parallel], -table[self.data_parallel :]
        voted = largest != floor  # a slot no rank wrote holds floor and -floor
        drifted = ((largest != smallest) & voted).nonzero().flatten().tolist()
        if drifted:
            raise TokenDriftError(
                f"the ranks of snapshot group(s) {drifted} (data index) trained on different tokens at step {step}: "
                "every snapshot rank of a group must read the same token stream (same data config, same "
                "data.workers.num_workers, same cache); stopping rather than pairing unrelated activations"
            )


def build_layout(snapshot_parallel: int, n_snapshots: int, sparse_gradient: bool = True) -> Layout:
    """This rank's layout; creates the process groups (collective: every rank calls it, in the same order).
    `sparse_gradient`: see SnapshotReduction.restrict_gradient."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    shares = snapshot_shares(n_snapshots, snapshot_parallel)
    if world % snapshot_parallel:
        raise ConfigError(f"parallel.snapshot_parallel={snapshot_parallel} does not divide the {world} ranks")
    data_parallel = world // snapshot_parallel
    data_rank, snapshot_rank = divmod(rank, snapshot_parallel)
    if snapshot_parallel == 1:
        return Layout(data_parallel, 1, data_rank, 0, shares, None, None, list(range(world)))
    snapshot_group = data_group = None
    for i in range(data_parallel):  # new_group is collective: every rank makes every group
        group = dist.new_group([i * snapshot_parallel + j for j in range(snapshot_parallel)])
        if i == data_rank:
            snapshot_group = group
    data_group_ranks: list[int] = []
    for j in range(snapshot_parallel):
        ranks = [i * snapshot_parallel + j for i in range(data_parallel)]
        group = dist.new_group(ranks)
        if j == snapshot_rank:
            data_group, data_group_ranks = group, ranks
    reduction = SnapshotReduction(snapshot_group, snapshot_parallel, sparse_gradient=sparse_gradient)
    return Layout(data_parallel, snapshot_parallel, data_rank, snapshot_rank, shares, snapshot_group, data_group,
                  data_group_ranks, reduction)


class SnapshotParallelUnit:
    """DeepSpeed's model-parallel unit ("mpu") for this layout: its model-parallel group is the snapshot group,
    its data-parallel group the data group. ZeRO then partitions and averages over the data group only, and
    counts a parameter replicated over the snapshot group (b_enc) once in the gradient norm, while the ones
    marked `model_parallel` (each rank's own snapshots) are summed over the group."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def get_model_parallel_group(self) -> Any:  # noqa: ANN401 (a process group)
        return self.layout.snapshot_group

    def get_model_parallel_rank(self) -> int:
        return self.layout.snapshot_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.snapshot_parallel

    def get_data_parallel_group(self) -> Any:  # noqa: ANN401
        return self.layout.data_group

    def get_data_parallel_rank(self) -> int:
        return self.layout.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.data_parallel

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.layout.data_group_ranks)
