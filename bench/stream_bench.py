"""Does the activation stream keep the trainer fed?

For each setting it measures, in one process, one after the other on the same machine:

  produce   tokens/s the activation workers turn out alone (no trainer running)
  inline    a training run with the snapshots run inline in the trainer process (workers=0)
  workers   the same run fed by activation worker processes
  cache     the same run reading a prebuilt activation cache (no model runs: ~ the trainer alone)

and prints tokens/s, the share of loop time the trainer waited for data, and the ratios between them.

    python bench/stream_bench.py                        # embedded default and the larger synthetic setting
    python bench/stream_bench.py --setting default --tokens 300000

`default` is the embedded default (tiny GPT-NeoX d=64, 8 snapshots, F=1024, batch 1024). `large` is a
synthetic setting: a d=256, 4-block GPT-NeoX trained for 7 steps with a snapshot after each (8 snapshots),
hooked at block 3, F=8192, batch 2048, 127-token sequences.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from crosscoder.cli.cache import build_cache  # noqa: E402
from crosscoder.cli.train import train  # noqa: E402
from crosscoder.config import RunConfig  # noqa: E402
from crosscoder.data.kinds import describe_sources
from crosscoder.data.stream import online_block_source  # noqa: E402

SETTINGS: dict[str, list[str]] = {
    "default": ["trainer.total_tokens=204800"],
    "large": [
        "trainer.total_tokens=81920",
        "sources.toy.hidden_size=256", "sources.toy.num_layers=4", "sources.toy.train_steps=7",
        "sources.toy.snapshot_steps=[0,1,2,3,4,5,6,7]", "sources.hook=blocks.3.hook_resid_pre",
        "data.seq_len=128", "data.model_batch_size=32", "crosscoder.dict_size=8192",
        "trainer.batch_size=2048", "data.shuffle.buffer_tokens=65536",
    ],
}


@dataclass
class Figures:
    tokens_per_second: float
    wait_fraction: float


def compose(overrides: list[str]) -> RunConfig:
    """The config `crosscoder-train <overrides>` would run, composed with Hydra."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from crosscoder.cli.train import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[*overrides, "output_dir=unused"])
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def quiet(_: str) -> None:
    pass


def measure_production(cfg: RunConfig, warm_blocks: int, blocks: int) -> float:
    """Tokens/s of the workers alone: the trainer only drains their blocks."""
    info = describe_sources(cfg.sources, log=quiet)
    blocks_from, close = online_block_source(cfg.sources, cfg.data, info, rank=0, world_size=1, log=quiet)
    try:
        stream = blocks_from(0)
        for _ in itertools.islice(stream, warm_blocks):  # includes the workers' start-up
            pass
        started, tokens = time.perf_counter(), 0
        for block in itertools.islice(stream, blocks):
            tokens += block.token_ids.shape[0]
        return tokens / (time.perf_counter() - started)
    finally:
        close()


def measure_training(cfg: RunConfig, run_dir: Path) -> Figures:
    cfg.output_dir = str(run_dir)
    result = train(cfg)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    return Figures(result.tokens_seen / summary["loop_seconds"], summary["data_wait_fraction_total"])


def split_cores() -> tuple[list[int], list[int]]:
    """Half the cores for the trainer, the rest for the workers (at least one each)."""
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    return cores[:half], cores[half:]


def bench(setting: str, tokens: int | None, workers: int, scratch: Path) -> dict[str, float]:
    overrides = [*SETTINGS[setting], "tracking=disabled", f"data.workers.num_workers={workers}"]
    if tokens:
        overrides.append(f"trainer.total_tokens={tokens}")
    base = compose(overrides)
    describe_sources(base.sources)  # builds (once) and caches the snapshots outside the timings
    print(f"\n== {setting}: {len(base.sources.toy.snapshot_steps)} snapshots, d={base.sources.toy.hidden_size}, "
          f"F={base.crosscoder.dict_size}, batch {base.trainer.batch_size}, {base.trainer.total_tokens} tokens, "
          f"{len(os.sched_getaffinity(0))} CPU cores ==", flush=True)
    model_batch_tokens = base.data.model_batch_size * (base.data.seq_len - 1)
    n_blocks = max(8, 4 * base.trainer.batch_size // model_batch_tokens)
    cache = [f"data.cache.dir={scratch / f'{setting}-cache'}"]
    build_cache(compose([*overrides, *cache]), log=quiet)

    r: dict[str, float] = {}
    # Shared: the OS places trainer and workers on all cores; they compete for them.
    r["produce_tok_s"] = measure_production(compose(overrides), warm_blocks=4, blocks=n_blocks)
    for name, extra in (("inline", ["data.workers.num_workers=0"]), ("workers", []), ("cache", cache)):
        figures = measure_training(compose([*overrides, *extra]), scratch / f"{setting}-{name}")
        r[f"{name}_tok_s"], r[f"{name}_wait"] = figures.tokens_per_second, figures.wait_fraction

    # Split: the trainer on half the cores, one single-threaded worker on each of the others, so the model
    # forwards run on hardware the crosscoder step does not use (as with GPU workers, or spare cores).
    trainer_cpus, worker_cpus = split_cores()
    if not worker_cpus:
        return r
    pinned = [*overrides, f"data.workers.num_workers={len(worker_cpus)}", "data.workers.threads=1",
              f"data.workers.cpus=[{','.join(map(str, worker_cpus))}]"]
    all_cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, trainer_cpus)
    torch.set_num_threads(len(trainer_cpus))
    try:
        r["split_produce_tok_s"] = measure_production(compose(pinned), warm_blocks=4, blocks=n_blocks)
        for name, extra in (("split_workers", []), ("split_cache", cache)):
            figures = measure_training(compose([*pinned, *extra]), scratch / f"{setting}-{name}")
            r[f"{name}_tok_s"], r[f"{name}_wait"] = figures.tokens_per_second, figures.wait_fraction
    finally:
        os.sched_setaffinity(0, all_cpus)
        torch.set_num_threads(threads)
    r["trainer_cores"], r["worker_cores"] = len(trainer_cpus), len(worker_cpus)
    return r


def report(setting: str, workers: int, r: dict[str, float]) -> None:
    # Inline, the wait is the forward time; from the cache, the loop is (almost) the step alone.
    forward_s_per_tok = r["inline_wait"] / r["inline_tok_s"]
    step_s_per_tok = (1 - r["cache_wait"]) / r["cache_tok_s"]
    p = f"[{setting}]"
    lines = [
        f"{p} shared cores: trainer and workers placed by the OS on all cores",
        f"{p}   workers produce (alone)        {r['produce_tok_s']:>9.0f} tok/s",
        f"{p}   trainer consumes (cache)       {r['cache_tok_s']:>9.0f} tok/s   wait {r['cache_wait']:6.1%}",
        f"{p}   training, snapshots inline     {r['inline_tok_s']:>9.0f} tok/s   wait {r['inline_wait']:6.1%}",
        f"{p}   training, {workers} workers            {r['workers_tok_s']:>9.0f} tok/s   "
        f"wait {r['workers_wait']:6.1%}",
        f"{p}   forward / crosscoder-step cost per token  {forward_s_per_tok / step_s_per_tok:.2f}",
        f"{p}   workers produce / trainer consumes        {r['produce_tok_s'] / r['cache_tok_s']:.2f}",
        f"{p}   workers run / inline run                  {r['workers_tok_s'] / r['inline_tok_s']:.2f}x",
        f"{p}   workers run / trainer alone (cache run)   {r['workers_tok_s'] / r['cache_tok_s']:.2f}",
    ]
    if "split_workers_tok_s" in r:
        lines += [
            f"{p} split cores: trainer on {r['trainer_cores']:.0f}, {r['worker_cores']:.0f} worker(s) on the other(s)",
            f"{p}   workers produce (alone)        {r['split_produce_tok_s']:>9.0f} tok/s",
            f"{p}   trainer consumes (cache)       {r['split_cache_tok_s']:>9.0f} tok/s   "
            f"wait {r['split_cache_wait']:6.1%}",
            f"{p}   training from workers          {r['split_workers_tok_s']:>9.0f} tok/s   "
            f"wait {r['split_workers_wait']:6.1%}",
            f"{p}   workers produce / trainer consumes        {r['split_produce_tok_s'] / r['split_cache_tok_s']:.2f}",
            f"{p}   workers run / trainer alone (cache run)   {r['split_workers_tok_s'] / r['split_cache_tok_s']:.2f}",
        ]
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=[*SETTINGS, "all"], default="all")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per run (default: per setting)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    all_results = {}
    with tempfile.TemporaryDirectory(prefix="crosscoder-bench-") as scratch:
        for setting in settings:
            all_results[setting] = bench(setting, args.tokens, args.workers, Path(scratch))
    print("\n==== summary ====")
    for setting, results in all_results.items():
        report(setting, args.workers, results)


if __name__ == "__main__":
    sys.exit(main())
