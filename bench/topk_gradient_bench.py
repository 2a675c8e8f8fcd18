"""The snapshot group's backward all-reduce for TopK / BatchTopK: all B x F entries of d pre, or only the active ones.

    python bench/topk_gradient_bench.py                        # 2 snapshot ranks (gloo, CPU), S=2, d=256, F=8192
    python bench/topk_gradient_bench.py --dict-size 32768 --batch 2048

Two processes form one snapshot group (snapshot_parallel=2, one snapshot each) and time forward + backward of
the split crosscoder (dictionary.crosscoder with parallel.layout's reduction, Adam step included), alternating dense
and sparse rounds in the same run so both see the same machine. It also counts the bytes each all-reduces per
step and checks that both give the same gradients.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.parallel.engine import free_port
from crosscoder.parallel.layout import build_layout


def _steps(model: Crosscoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor,
           n: int) -> float:
    """Seconds per step of forward + backward + Adam over n steps (after the caller's warm-up)."""
    dist.barrier()
    started = time.perf_counter()
    for _ in range(n):
        model(x, 0.0, dead).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    return (time.perf_counter() - started) / n


def _rank(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layout = build_layout(world, args.snapshots)
    share = layout.share
    torch.manual_seed(1)
    x = torch.randn(args.batch, args.snapshots, args.d_model)[:, share.start : share.stop].contiguous()
    dead = torch.zeros(args.dict_size, dtype=torch.bool)
    dead[: args.dead] = True  # AuxK active: its latents join the sparse support
    torch.manual_seed(0)
    model = Crosscoder(args.snapshots, args.d_model, args.dict_size, "batchtopk", k=args.k,
                       snapshot_share=share, reduction=layout.reduction)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    timings: dict[str, list[float]] = {"dense": [], "sparse": []}
    bytes_per_step: dict[str, float] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    for name, sparse in (("dense", False), ("sparse", True)):  # warm-up, and one step's bytes and gradients
        layout.reduction.sparse_gradient = sparse
        before = layout.reduction.bytes_reduced
        model(x, 0.0, dead).loss.backward()
        bytes_per_step[name] = layout.reduction.bytes_reduced - before
        grads[name] = [param.grad.clone() for param in model.parameters()]
        model.zero_grad()
    if not all(torch.equal(a, b) for a, b in zip(grads["dense"], grads["sparse"], strict=True)):
        raise AssertionError("the sparse backward gave other gradients than the dense one")
    # The backward all-reduce alone, on a [B, F] gradient whose support is k latents per token.
    grad = torch.randn(args.batch, args.dict_size)
    support = torch.zeros_like(grad, dtype=torch.bool).scatter(1, torch.randperm(args.dict_size)[: args.k]
                                                               .expand(args.batch, -1), True)
    reduce_timings: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(args.rounds):
        for name, sparse in (("dense", False), ("sparse", True)):
            layout.reduction.sparse_gradient = sparse
            timings[name].append(_steps(model, optimizer, x, dead, args.steps))
            dist.barrier()
            started = time.perf_counter()
            for _ in range(args.steps):
                if sparse:
                    layout.reduction.restrict_gradient(support)
                layout.reduction.total_gradient(grad)
            reduce_timings[name].append((time.perf_counter() - started) / args.steps)
    if rank == 0:
        tokens = args.batch
        print(f"snapshot group of {world}, S={args.snapshots}, d={args.d_model}, F={args.dict_size}, "
              f"batch {tokens}, BatchTopK k={args.k}, {args.dead} dead latents (AuxK), {args.threads} thread(s) "
              f"per rank, median of {args.rounds} rounds x {args.steps} steps")
        medians = {name: statistics.median(values) for name, values in timings.items()}
        for name in ("dense", "sparse"):
            reduce_ms = statistics.median(reduce_timings[name]) * 1e3
            print(f"  {name:6s} backward: {medians[name] * 1e3:8.1f} ms/step  {tokens / medians[name]:9,.0f} tok/s  "
                  f"all-reduced {bytes_per_step[name] / 2**20:8.2f} MiB/step; backward sum {reduce_ms:6.1f} ms")
        print(f"  sparse / dense: time {medians['sparse'] / medians['dense']:.2f}, "
              f"bytes {bytes_per_step['sparse'] / bytes_per_step['dense']:.3f}; gradients identical")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshots", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--dict-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dead", type=int, default=0, help="dead latents (AuxK adds up to d/2 per token)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    mp.spawn(_rank, args=(args.ranks, free_port(), args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
