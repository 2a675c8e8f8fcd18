"""Where one module step's time goes: the torch profiler's top operators (by self CPU time, grouped by input
shape) of the crosscoder step of bench/step_bench.py (forward + loss + backward + the trainer's Adam), after
two warm-up steps; with the best of three timed steps first. The per-change figures of bench/RESULTS.md's
issue-12 table come from this.

    python bench/step_profile.py --activation topk [--aux] [--dense] [--size 4096x8x256x8192x32] [--rows 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activation", default="topk", choices=["relu", "topk", "batchtopk", "jumprelu"])
    parser.add_argument("--aux", action="store_true", help="half the latents dead, so AuxK runs")
    parser.add_argument("--dense", action="store_true", help="sparse_topk=False")
    parser.add_argument("--size", default="4096x8x256x8192x32", help="BxSxdxFxk")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch
    from torch.profiler import profile

    from crosscoder.dictionary.crosscoder import Crosscoder
    from crosscoder.training.schedules import adam

    torch.set_num_threads(args.threads)
    batch, sources, d_model, dict_size, k = (int(v) for v in args.size.split("x"))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sources, d_model, generator=generator) * torch.linspace(0.5, 4, sources)[None, :, None]
    torch.manual_seed(0)
    model = Crosscoder(sources, d_model, dict_size, args.activation, k=k, sparse_topk=not args.dense)
    model.set_input_scale((d_model / x.double().pow(2).sum(dim=2).mean(dim=0)).sqrt().float())
    dead = None
    if args.aux:
        dead = torch.zeros(dict_size, dtype=torch.bool)
        dead[torch.randperm(dict_size, generator=torch.Generator().manual_seed(2))[: dict_size // 2]] = True
    optimizer = adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999))

    def step() -> None:
        model(x, 0.1, dead).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):
        step()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    print(f"step {min(times) * 1e3:.0f} ms ({batch / min(times):,.0f} tok/s), {args}")
    with profile(record_shapes=True) as prof:
        step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
