"""Hydra entry point `crosscoder-cache`: write the paired activations once, for every run of a sweep to read.

    crosscoder-cache data.cache.dir=/data/acts/pythia160m-l6         # same config groups as crosscoder-train
    crosscoder-train -m data.cache.dir=/data/acts/pythia160m-l6 crosscoder.l1_coeff=1,2,4

The snapshots run in the activation workers (data.workers), exactly as in online training. An interrupted
build continues where it stopped; a complete cache is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from crosscoder.config import ConfigError, RunConfig, register_configs
from crosscoder.train import CONF_DIR, run_command

register_configs()


def default_cache_tokens(cfg: RunConfig) -> int:
    """Enough for trainer.total_tokens: each rank may leave up to one micro batch unserved at the end."""
    return cfg.trainer.total_tokens + 2 * cfg.trainer.batch_size


def build_cache(cfg: RunConfig, log: Callable[[str], None] = print) -> Path:
    """Write (or finish) the activation cache at data.cache.dir; return its folder."""
    from crosscoder.data.cache import cache_identity, write_cache
    from crosscoder.data.stream import online_block_source
    from crosscoder.sources import describe_sources

    cfg.validate()
    if not cfg.data.cache.dir:
        raise ConfigError("data.cache.dir is not set: name the folder to write the activation cache to")
    info = describe_sources(cfg.sources, log=log)
    identity = cache_identity(info, cfg.data, cfg.data.cache.dtype)
    tokens = cfg.data.cache.tokens or default_cache_tokens(cfg)
    # The cache is one global stream (rank 0 of 1); training ranks split every shard between them.
    blocks_from, close = online_block_source(cfg, info, rank=0, world_size=1, log=log)
    try:
        return write_cache(cfg.data.cache, identity, blocks_from, tokens, log=log)
    finally:
        close()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    cache_dir = run_command("crosscoder-cache", cfg, build_cache)
    print(f"crosscoder-cache: activations in {cache_dir}")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
