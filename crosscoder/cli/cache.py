"""Hydra entry point `crosscoder-cache`: write the paired activations once, for every run of a sweep to read.

    crosscoder-cache data.cache.dir=/data/acts/pythia160m-l6         # same config groups as crosscoder-train
    crosscoder-train -m data.cache.dir=/data/acts/pythia160m-l6 crosscoder.l1_coeff=1,2,4

The snapshots run in the activation workers (data.workers), exactly as in online training. An interrupted
build continues where it stopped; a complete cache is left alone.

Snapshot-parallel: under a launcher with N ranks and `parallel.snapshot_parallel=N`,

    accelerate launch --num_processes 4 -m crosscoder.cli.cache data.cache.dir=... parallel.snapshot_parallel=4

every rank loads and runs only its share of the snapshots (`crosscoder.parallel.layout.snapshot_shares`) on the same
token stream, and rank 0 joins each block's columns in snapshot order and writes the cache: the same files, byte
for byte, as one process writes. The cache is one global token stream, so there is no data parallelism here.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from crosscoder.cli.compose import check_overrides
from crosscoder.cli.train import CONF_DIR, check_run_dir_writable, quiet_non_main_ranks, run_command
from crosscoder.config import RunConfig, register_configs
from crosscoder.data.checks import check_inputs
from crosscoder.errors import ConfigError, same_on_every_rank

register_configs()

COLLECTIVE_TIMEOUT = timedelta(hours=2)
"""How long a snapshot rank waits in a collective: rank 0 may build the embedded snapshots while the others
wait, and each rank's first block waits for the slowest rank's workers to load their snapshots."""


def default_cache_tokens(cfg: RunConfig) -> int:
    """Enough for trainer.total_tokens: each rank may leave up to one micro batch unserved at the end."""
    return cfg.trainer.total_tokens + 2 * cfg.trainer.batch_size


def launch_world_size() -> int:
    """The ranks of this launch, from the env:// variables a launcher sets (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_parallel(cfg: RunConfig, world_size: int) -> None:
    """Refuse a snapshot_parallel that is not the world size of a multi-rank launch (no data parallelism)."""
    sp = cfg.parallel.snapshot_parallel
    if world_size > 1 and sp != world_size:
        raise ConfigError(
            f"parallel.snapshot_parallel={sp} but this launch has {world_size} ranks: crosscoder-cache writes one "
            f"global token stream, so every rank must be a snapshot rank (set parallel.snapshot_parallel="
            f"{world_size}, or run one process)"
        )


def build_cache(cfg: RunConfig, log: Callable[[str], None] = print) -> Path:
    """Write (or finish) the activation cache at data.cache.dir; return its folder."""
    with same_on_every_rank():
        check_inputs(cfg)
        if not cfg.data.cache.dir:
            raise ConfigError("data.cache.dir is not set: name the folder to write the activation cache to")
        world_size = launch_world_size()
        check_parallel(cfg, world_size)  # before any collective: every rank refuses on its own
    if world_size == 1:
        return _build_one_process(cfg, log)
    return _build_snapshot_parallel(cfg, log)


def _build_one_process(cfg: RunConfig, log: Callable[[str], None]) -> Path:
    from crosscoder.data.cache import cache_identity, check_cache_fits, write_cache
    from crosscoder.data.kinds import describe_sources
    from crosscoder.data.stream import online_block_source

    info = describe_sources(cfg.sources, log=log)
    identity = cache_identity(info, cfg.data, cfg.data.cache.dtype)
    tokens = cfg.data.cache.tokens or default_cache_tokens(cfg)
    check_cache_fits(cfg.data.cache, info, tokens)
    # The cache is one global stream (rank 0 of 1); training ranks split every shard between them.
    blocks_from, close = online_block_source(cfg.sources, cfg.data, info, rank=0, world_size=1, log=log)
    try:
        return write_cache(cfg.data.cache, identity, blocks_from, tokens, log=log)
    finally:
        close()


# ---- snapshot-parallel build ---------------------------------------------------------------------------
# Rank 0 drives; the others follow its commands, one broadcast each:
#   ("start", i)  make a block stream from block i on (write_cache asks for it, at its first missing shard)
#   ("next",)     every rank makes its next block (its snapshots' columns) and gathers it to rank 0
#   ("stop",)     close the stream (write_cache has enough tokens, failed, or the corpus ended)
#   ("finish", ok) the build is over (ok False: rank 0 failed and reports why; the others just leave)
# A rank that fails to make a block sends a _Failure in its place and keeps following the commands until
# "finish", so no rank is ever left waiting in a collective the others will not enter.


@dataclass
class _Failure:
    rank: int
    message: str


class _RankZeroFailed(Exception):
    """Rank 0 stopped the build before it could run (it reports the error itself)."""


def _send(command: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([command], src=0)


def _receive() -> tuple[Any, ...]:
    import torch.distributed as dist

    message: list[Any] = [None]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def _next_payload(stream: Iterator[Any] | _Failure | None, rank: int, dtype: Any) -> Any:  # noqa: ANN401
    """This rank's next block as (index, activations in the cache dtype on the CPU, token ids); None when the
    stream has ended; a _Failure when making it failed (sent in the block's place, never raised here)."""
    if isinstance(stream, _Failure):
        return stream
    if stream is None:
        return _Failure(rank, "asked for a block before the stream was started")
    try:
        block = next(stream, None)
        if block is None:
            return None
        activations = block.activations.detach().to("cpu", dtype) if dtype is not None else block.activations.cpu()
        return block.index, activations.contiguous(), block.token_ids.cpu()
    except Exception:  # the failure travels to rank 0, which raises it for everyone
        return _Failure(rank, traceback.format_exc().rstrip())


def _close(stream: Any) -> None:  # noqa: ANN401
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _assemble(parts: list[Any], shares: list[range]) -> Any:  # noqa: ANN401
    """One block from every rank's columns, in snapshot order; None when every stream has ended."""
    import torch

    from crosscoder.data.activations import ActivationBlock
    from crosscoder.errors import TokenDriftError

    failures = [part for part in parts if isinstance(part, _Failure)]
    if failures:
        raise RuntimeError("; ".join(f"snapshot rank {f.rank} (snapshots {list(shares[f.rank])}) failed to make "
                                     f"its activations: {f.message}" for f in failures))
    ended = [rank for rank, part in enumerate(parts) if part is None]
    if len(ended) == len(parts):
        return None
    index, activations, token_ids = parts[0] if parts[0] is not None else (None, None, None)
    if ended:
        raise TokenDriftError(f"the token stream of snapshot rank(s) {ended} ended while the others' went on "
                              f"(at block {index if index is not None else '?'}): the ranks do not read the same "
                              "tokens (same data config and data.workers.num_workers on every rank?)")
    for rank, (other_index, _, other_tokens) in enumerate(parts[1:], start=1):
        if other_index != index or not torch.equal(other_tokens, token_ids):
            raise TokenDriftError(
                f"snapshot rank {rank} made block {other_index} of {other_tokens.shape[0]} tokens while rank 0 made "
                f"block {index} of {token_ids.shape[0]} tokens, not the same token ids: the ranks must read the same "
                "token stream (same data config and data.workers.num_workers on every rank); stopping rather than "
                "pairing unrelated activations"
            )
    return ActivationBlock(index, torch.cat([part[1] for part in parts], dim=1), token_ids)


def _build_snapshot_parallel(cfg: RunConfig, log: Callable[[str], None]) -> Path:
    import torch
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # object collectives stage their bytes on the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    finished = False
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        check_parallel(cfg, world_size)
        if rank == 0:
            built = _lead(cfg, log, world_size)
        else:
            _follow(cfg, rank, world_size)
            built = Path(cfg.data.cache.dir).expanduser()
        finished = True
        return built
    finally:
        if created:
            # A rank that takes the group down while a peer's last collective is in flight aborts the peer
            # ("terminate called without an active exception", seen under load): meet first when all went well
            # (after a failure a dead peer would hold the others until the timeout).
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _sources_rank_zero_first(cfg: RunConfig, rank: int, log: Callable[[str], None]) -> Any:  # noqa: ANN401
    """describe_sources on rank 0 first (it may build the embedded snapshots or fill the hub cache), then on the
    others; a failure on rank 0 is told to the others, which stop (raise _RankZeroFailed)."""
    from crosscoder.data.kinds import describe_sources

    info, failed = None, None
    if rank == 0:
        try:
            info = describe_sources(cfg.sources, log=log)
        except BaseException as error:
            failed = error
        _send(("described", failed is None))
        if failed is not None:
            raise failed
        return info
    _, ok = _receive()
    if not ok:
        raise _RankZeroFailed
    return describe_sources(cfg.sources, log=lambda *_: None)


def _lead(cfg: RunConfig, log: Callable[[str], None], world_size: int) -> Path:
    """Rank 0: run its own share, gather the others' columns block by block, write the cache."""
    import torch.distributed as dist

    from crosscoder.data.cache import cache_identity, check_cache_fits, write_cache
    from crosscoder.data.stream import online_block_source
    from crosscoder.parallel.layout import snapshot_shares
    from crosscoder.sources.models import DTYPES

    dtype = DTYPES.get(cfg.data.cache.dtype)
    info = _sources_rank_zero_first(cfg, 0, log)  # a failure here has already sent the others home
    ok = False
    close: Callable[[], None] = lambda: None  # noqa: E731
    try:
        shares = snapshot_shares(len(info.specs), world_size)
        log(f"activation cache: {world_size} snapshot ranks, snapshots "
            f"{', '.join(f'{s.start}-{s.stop - 1}' if len(s) > 1 else str(s.start) for s in shares)}")
        identity = cache_identity(info, cfg.data, cfg.data.cache.dtype)
        tokens = cfg.data.cache.tokens or default_cache_tokens(cfg)
        check_cache_fits(cfg.data.cache, info, tokens)
        local_from, close = online_block_source(cfg.sources, cfg.data, info, rank=0, world_size=1, log=log,
                                                share=shares[0])

        def blocks_from(start: int) -> Iterator[Any]:
            _send(("start", start))
            local: Any = None
            try:
                local = local_from(start)
            except Exception as error:
                local = _Failure(0, f"{type(error).__name__}: {error}")
            try:
                while True:
                    _send(("next",))
                    parts: list[Any] = [None] * world_size
                    dist.gather_object(_next_payload(local, 0, dtype), parts, dst=0)
                    block = _assemble(parts, shares)
                    if block is None:
                        return
                    yield block
            finally:
                _close(local)
                _send(("stop",))

        path = write_cache(cfg.data.cache, identity, blocks_from, tokens, log=log)
        ok = True
        return path
    finally:
        try:
            close()
        finally:
            _send(("finish", ok))


def _follow(cfg: RunConfig, rank: int, world_size: int) -> None:
    """Rank > 0: make the blocks of its share when rank 0 says so and send them to rank 0; writes nothing."""
    import torch.distributed as dist

    from crosscoder.data.stream import online_block_source
    from crosscoder.parallel.layout import snapshot_shares
    from crosscoder.sources.models import DTYPES

    quiet = lambda *_: None  # noqa: E731
    dtype = DTYPES.get(cfg.data.cache.dtype)
    failure: BaseException | None = None
    local_from: Callable[[int], Iterator[Any]] | None = None
    close: Callable[[], None] = quiet
    try:
        info = _sources_rank_zero_first(cfg, rank, quiet)
        share = snapshot_shares(len(info.specs), world_size)[rank]
        local_from, close = online_block_source(cfg.sources, cfg.data, info, rank=0, world_size=1, log=quiet,
                                                share=share)
    except _RankZeroFailed:
        return
    except Exception as error:  # reported to rank 0 at its first block; raised here once the build is over
        failure = error
    stream: Iterator[Any] | _Failure | None = None
    try:
        while True:
            command = _receive()
            if command[0] == "start":
                try:
                    stream = local_from(command[1]) if local_from is not None else None
                except Exception as error:
                    failure = failure or error
                if failure is not None:
                    stream = _Failure(rank, f"{type(failure).__name__}: {failure}")
            elif command[0] == "next":
                payload = _next_payload(stream, rank, dtype)
                if isinstance(payload, _Failure) and failure is None:
                    failure = RuntimeError(payload.message)
                dist.gather_object(payload, None, dst=0)
            elif command[0] == "stop":
                _close(stream)
                stream = None
            elif command[0] == "finish":
                break
    finally:
        _close(stream)
        close()
    if failure is not None:
        raise failure


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    cache_dir = run_command("crosscoder-cache", cfg, build_cache)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"crosscoder-cache: activations in {cache_dir}")


def main() -> None:
    check_run_dir_writable(sys.argv[1:])
    check_overrides("crosscoder-cache", sys.argv[1:])  # a bad command line: one line and exit 2, not Hydra's report
    quiet_non_main_ranks()
    _hydra_main()


if __name__ == "__main__":
    main()
