"""Per-rank memory of the crosscoder's parameters, gradients and optimizer state under ZeRO-1/2/3.

    python bench/memory_bench.py                    # ZeRO-1/2/3 at 1 and 2 ranks (CPU, gloo), fp32
    python bench/memory_bench.py --dict-size 65536  # a bigger dictionary

The driver starts one `accelerate launch` per (stage, ranks). Each rank builds the crosscoder on the real
DeepSpeed engine (crosscoder.parallel), runs one step, and counts the bytes of the distinct tensors it holds:

  parameters  the module's parameters (under ZeRO-3, this rank's partition)
  gradients   after backward, before the step: the parameters' .grad and DeepSpeed's reduced gradient partitions
  optimizer   the fp32 master partition the optimizer updates, plus Adam's two moments

and prints them next to the ZeRO formula for fp32 training (Psi parameters, N ranks, 4 bytes each):

  stage 1: params 4Psi      grads 4Psi/N    optimizer 12Psi/N   (fp32 master + 2 Adam moments)
  stage 2: params 4Psi      grads 4Psi/N    optimizer 12Psi/N
  stage 3: params 4Psi/N    grads 4Psi/N    optimizer  8Psi/N   (in fp32 the partition is its own master)

Gradients are counted when the step runs. ZeRO-1 also holds all 4Psi of them during backward, until they are
reduced at the step boundary (ZeRO-2/3 reduce-scatter them bucket by bucket). With bf16 the parameters and
gradients take 2 bytes and ZeRO-3 keeps a separate fp32 master: 2 + 2 + 12 bytes before sharding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORMULA = {  # fp32 bytes per parameter held by each rank at the step: (params, grads, optimizer), given N ranks
    1: lambda n: (4, 4 / n, 12 / n),
    2: lambda n: (4, 4 / n, 12 / n),
    3: lambda n: (4 / n, 4 / n, 8 / n),
}


def _distinct_bytes(tensors: list) -> int:  # noqa: ANN001 (torch tensors)
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer are counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def _tensors_in(value: object) -> list:
    """Every tensor inside nested dicts / lists / tuples."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_in(item)]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors_in(item)]
    return []


def measure(args: argparse.Namespace) -> None:
    """One rank: build, step once, count, write <out>/rank<r>.json."""
    import torch

    from crosscoder.config import RunConfig
    from crosscoder.model import Crosscoder
    from crosscoder.parallel import build_accelerator, ensure_process_group_env, teardown

    ensure_process_group_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = RunConfig(output_dir=args.out)
    cfg.deepspeed.zero_stage = args.stage
    micro_batch = args.batch // world_size
    accelerator = build_accelerator(cfg, micro_batch)
    torch.manual_seed(0)
    model = Crosscoder(n_sources=args.sources, d_model=args.d_model, dict_size=args.dict_size, activation="relu")
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    engine, optimizer = accelerator.prepare(model, optimizer)
    zero = engine.optimizer  # DeepSpeed's ZeRO optimizer around the torch Adam
    params = list(engine.module.parameters())

    output = engine(torch.randn(micro_batch, args.sources, args.d_model), 1.0, None)
    # The engine's own backward: accelerator.backward would also run the step, freeing the gradients first.
    engine.backward(output.loss)
    grad_tensors = [p.grad for p in params] + _tensors_in(getattr(zero, "averaged_gradients", None))
    grad_bytes = _distinct_bytes(grad_tensors)
    engine.step()

    param_bytes = _distinct_bytes([getattr(p, "ds_tensor", p) for p in params])
    masters = [p for group in zero.optimizer.param_groups for p in group["params"]]
    moments = [t for state in zero.optimizer.state.values() for key, t in state.items() if key != "step"]
    optimizer_bytes = _distinct_bytes(masters + moments)
    rank = accelerator.process_index
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": world_size, "stage": args.stage, "n_params": n_params,
        "param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_bytes": optimizer_bytes,
    }))
    teardown(accelerator)


def drive(args: argparse.Namespace) -> None:
    from crosscoder.parallel import free_port

    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="crosscoder-memory-") as scratch:
        for ranks in (1, 2):
            for stage in (1, 2, 3):
                out = Path(scratch) / f"zero{stage}-{ranks}"
                out.mkdir()
                command = [
                    sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(ranks),
                    "--num_machines", "1", "--use_deepspeed", "--zero_stage", str(stage),
                    "--main_process_port", str(free_port()), str(Path(__file__).resolve()), "--measure",
                    "--stage", str(stage), "--out", str(out), "--sources", str(args.sources),
                    "--d-model", str(args.d_model), "--dict-size", str(args.dict_size), "--batch", str(args.batch),
                ]
                result = subprocess.run(command, env=env, capture_output=True, text=True)
                if result.returncode:
                    sys.exit(f"ZeRO-{stage} on {ranks} rank(s) failed:\n{result.stderr[-4000:]}")
                rows += [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    n_params = rows[0]["n_params"]
    print(f"crosscoder S={args.sources}, d={args.d_model}, F={args.dict_size}: {n_params:,} parameters "
          f"(Psi), fp32; bytes held by each rank, measured (formula)")
    print(f"{'ZeRO':>4} {'ranks':>5} {'rank':>4}  {'parameters':>22}  {'gradients':>22}  {'optimizer':>22}  "
          f"{'total / formula':>15}")
    for row in rows:
        expected = [factor * n_params for factor in FORMULA[row["stage"]](row["world_size"])]
        measured = [row["param_bytes"], row["grad_bytes"], row["optimizer_bytes"]]
        cells = "  ".join(f"{m / 2**20:>9.2f} MiB ({e / 2**20:>7.2f})" for m, e in zip(measured, expected, strict=True))
        ratio = sum(measured) / sum(expected)
        print(f"{row['stage']:>4} {row['world_size']:>5} {row['rank']:>4}  {cells}  {ratio:>15.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    measure(args) if args.measure else drive(args)


if __name__ == "__main__":
    main()
