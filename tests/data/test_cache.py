"""Activation cache: exact round trips, disjoint rank slices, refusal of foreign caches, resumable builds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from crosscoder.config import CacheConfig, ConfigError, DataConfig
from crosscoder.constants import CACHE_HEADER_FILE, CACHE_MANIFEST_FILE
from crosscoder.data.activations import ActivationBlock
from crosscoder.data.cache import CacheReader, cache_identity, check_cache_matches, read_manifest, write_cache
from crosscoder.sources import SnapshotSpec, SourceInfo

S, D = 3, 4
SHARD_BATCHES = 2
QUIET = lambda _: None  # noqa: E731


def _block(index: int) -> ActivationBlock:
    """Block `index` of a deterministic synthetic stream; lengths vary (5..7 rows) as real valid-token counts do."""
    n = 5 + index % 3
    generator = torch.Generator().manual_seed(index)
    activations = torch.randn(n, S, D, generator=generator)
    return ActivationBlock(index, activations, index * 100 + torch.arange(n, dtype=torch.int64))


def _blocks_from(start: int) -> Iterator[ActivationBlock]:
    index = start
    while True:
        yield _block(index)
        index += 1


def _info(revisions: tuple[str, ...] = ("step0", "step4"), hook: str = "blocks.1.hook_resid_pre") -> SourceInfo:
    specs = [SnapshotSpec(name=r, path="org/model", revision=r, step=int(r[4:])) for r in revisions]
    return SourceInfo(specs=specs, tokenizer=None, d_model=D, hook=hook)


def _other_revision() -> SourceInfo:
    """The same snapshot names and steps, but the second one read at another revision."""
    info = _info()
    info.specs[1] = replace(info.specs[1], revision="main")
    return info


def _identity(info: SourceInfo | None = None, dtype: str = "float32", **data: Any) -> dict[str, Any]:
    return cache_identity(info or _info(), DataConfig(**data), dtype)


def _cfg(path: Path, dtype: str = "float32") -> CacheConfig:
    return CacheConfig(dir=str(path), dtype=dtype, shard_batches=SHARD_BATCHES)


def _read_all(cache_dir: Path, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = list(CacheReader(cache_dir, rank, world_size).iter_blocks())
    assert [b.index for b in blocks] == list(range(len(blocks)))
    return torch.cat([b.activations for b in blocks]), torch.cat([b.token_ids for b in blocks])


def _written(cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache should hold: every block of its complete shards, in stream order."""
    n_blocks = read_manifest(cache_dir).shards[-1]["first_block"] + SHARD_BATCHES
    blocks = [_block(i) for i in range(n_blocks)]
    return torch.cat([b.activations for b in blocks]), torch.cat([b.token_ids for b in blocks])


def _shard_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.suffix == ".safetensors")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact_in_order(tmp_path: Path, dtype: str) -> None:
    cache_dir = write_cache(_cfg(tmp_path, dtype), _identity(dtype=dtype), _blocks_from, 50, log=QUIET)
    manifest = read_manifest(cache_dir)
    activations, token_ids = _read_all(cache_dir)
    expected_activations, expected_ids = _written(cache_dir)
    assert manifest.token_count == token_ids.shape[0] >= 50
    assert manifest.token_count - manifest.shards[-1]["n_tokens"] < 50  # stops at the first shard reaching 50
    assert activations.dtype == torch.float32
    assert torch.equal(token_ids, expected_ids)
    assert torch.equal(activations, expected_activations.to(getattr(torch, dtype)).float())
    assert CacheReader(cache_dir).tokens_per_rank == manifest.token_count
    with safe_open(str(cache_dir / manifest.shards[0]["file"]), "pt") as f:
        assert f.get_slice("activations").get_dtype() == {"float32": "F32", "bfloat16": "BF16"}[dtype]


def test_two_ranks_split_every_shard_disjointly(tmp_path: Path) -> None:
    cache_dir = write_cache(_cfg(tmp_path), _identity(), _blocks_from, 40, log=QUIET)
    readers = [CacheReader(cache_dir, rank, 2) for rank in range(2)]
    assert sum(r.tokens_per_rank for r in readers) == read_manifest(cache_dir).token_count
    per_rank = [list(r.iter_blocks()) for r in readers]
    full = list(CacheReader(cache_dir).iter_blocks())
    for shard, rank0, rank1 in zip(full, *per_rank, strict=True):
        assert rank0.index == rank1.index == shard.index
        assert set(rank0.token_ids.tolist()).isdisjoint(rank1.token_ids.tolist())
        assert torch.equal(torch.cat([rank0.token_ids, rank1.token_ids]), shard.token_ids)
        assert torch.equal(torch.cat([rank0.activations, rank1.activations]), shard.activations)
    assert [b.index for b in readers[1].iter_blocks(start=1)] == list(range(1, len(full)))


def test_global_batch_order_gives_every_world_size_the_same_batches(tmp_path: Path) -> None:
    """batch_rows=m: the k-th micro batches of 2 ranks, side by side, are the k-th batch of 2m rows of 1 rank."""
    cache_dir = write_cache(_cfg(tmp_path), _identity(), _blocks_from, 80, log=QUIET)
    micro = 4
    one_rank = _read_all_rows(CacheReader(cache_dir, 0, 1, batch_rows=2 * micro))
    ranks = [_read_all_rows(CacheReader(cache_dir, rank, 2, batch_rows=micro)) for rank in range(2)]
    n_batches = min(r[1].shape[0] for r in ranks) // micro
    assert n_batches >= 8
    for k in range(n_batches):
        rows = slice(k * micro, (k + 1) * micro)
        glued_ids = torch.cat([ranks[0][1][rows], ranks[1][1][rows]])
        glued = torch.cat([ranks[0][0][rows], ranks[1][0][rows]])
        assert torch.equal(glued_ids, one_rank[1][2 * k * micro : 2 * (k + 1) * micro])
        assert torch.equal(glued, one_rank[0][2 * k * micro : 2 * (k + 1) * micro])
    readers = [CacheReader(cache_dir, rank, 2, batch_rows=micro) for rank in range(2)]
    assert sum(r.tokens_per_rank for r in readers) == read_manifest(cache_dir).token_count
    assert readers[0].tokens_from(2) == sum(b.token_ids.shape[0] for b in readers[0].iter_blocks(start=2))


@pytest.mark.parametrize("batch_rows", [0, 4])
def test_a_snapshot_rank_reads_only_its_columns_of_its_rows(tmp_path: Path, batch_rows: int) -> None:
    """Split by snapshot (and by data rank, in either row order), a reader returns its rows' columns of its
    snapshots only: exactly those entries of what the whole reader returns."""
    cache_dir = write_cache(_cfg(tmp_path), _identity(), _blocks_from, 60, log=QUIET)
    for rank in range(2):
        whole = _read_all_rows(CacheReader(cache_dir, rank, 2, batch_rows=batch_rows))
        for share in (range(0, 2), range(2, 3)):
            part = _read_all_rows(CacheReader(cache_dir, rank, 2, batch_rows=batch_rows, sources=share))
            assert torch.equal(part[1], whole[1])
            assert torch.equal(part[0], whole[0][:, share.start : share.stop])


def _read_all_rows(reader: CacheReader) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = list(reader.iter_blocks())
    return torch.cat([b.activations for b in blocks]), torch.cat([b.token_ids for b in blocks])


def test_check_cache_matches_refuses_other_sources(tmp_path: Path) -> None:
    cache_dir = write_cache(_cfg(tmp_path), _identity(), _blocks_from, 10, log=QUIET)
    manifest = read_manifest(cache_dir)
    check_cache_matches(manifest, _info(), cache_dir)
    with pytest.raises(ConfigError, match=r"hook.*blocks\.1\.hook_resid_pre.*blocks\.2\.hook_resid_post"):
        check_cache_matches(manifest, _info(hook="blocks.2.hook_resid_post"), cache_dir)
    with pytest.raises(ConfigError, match=r"revision='step4'.*revision='main'") as error:
        check_cache_matches(manifest, _other_revision(), cache_dir)
    assert str(cache_dir) in str(error.value)
    with pytest.raises(ConfigError, match=r"2 snapshots.*3"):
        check_cache_matches(manifest, _info(revisions=("step0", "step4", "step8")), cache_dir)
    # A local snapshot directory may have moved since the build: its path is not compared.
    moved = _info()
    moved.specs = [replace(spec, path=str(tmp_path)) for spec in moved.specs]
    check_cache_matches(manifest, moved, cache_dir)


def test_read_manifest_of_missing_or_unbuilt_cache(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="crosscoder-cache data.cache.dir="):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="crosscoder-cache") as error:
        read_manifest(tmp_path)
    assert "never built" in str(error.value)
    with pytest.raises(ConfigError, match="data.cache.dir"):
        write_cache(CacheConfig(), _identity(), _blocks_from, 10, log=QUIET)


def test_interrupted_build_resumes_after_last_complete_shard(tmp_path: Path) -> None:
    reference = write_cache(_cfg(tmp_path / "reference"), _identity(), _blocks_from, 60, log=QUIET)
    cache_dir = tmp_path / "cache"

    def crashing(start: int) -> Iterator[ActivationBlock]:
        for block in _blocks_from(start):
            if block.index == 5:  # mid-shard 2 (blocks 4, 5)
                raise RuntimeError("worker died")
            yield block

    with pytest.raises(RuntimeError, match="worker died"):
        write_cache(_cfg(cache_dir), _identity(), crashing, 60, log=QUIET)
    assert not (cache_dir / CACHE_MANIFEST_FILE).exists()
    assert (cache_dir / CACHE_HEADER_FILE).is_file()
    assert _shard_files(cache_dir) == ["shard_000000.safetensors", "shard_000001.safetensors"]
    (cache_dir / ".shard_000002.safetensors.tmp-deadbeef").write_bytes(b"half a shard")  # a kill mid-write
    with pytest.raises(ConfigError, match="crosscoder-cache"):
        CacheReader(cache_dir)

    starts: list[int] = []

    def recording(start: int) -> Iterator[ActivationBlock]:
        starts.append(start)
        return _blocks_from(start)

    write_cache(_cfg(cache_dir), _identity(), recording, 60, log=QUIET)
    assert starts == [2 * SHARD_BATCHES]
    resumed, expected = read_manifest(cache_dir), read_manifest(reference)
    assert [s["token_hash"] for s in resumed.shards] == [s["token_hash"] for s in expected.shards]
    assert resumed.shards == expected.shards
    assert resumed.token_count == expected.token_count == sum(s["n_tokens"] for s in expected.shards)
    assert _shard_files(cache_dir) == _shard_files(reference)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]
    (acts, ids), (ref_acts, ref_ids) = _read_all(cache_dir), _read_all(reference)
    assert torch.equal(acts, ref_acts) and torch.equal(ids, ref_ids)


def test_foreign_build_or_cache_in_the_folder_is_refused(tmp_path: Path) -> None:
    def crashing(start: int) -> Iterator[ActivationBlock]:
        yield _block(start)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_cache(_cfg(tmp_path / "partial"), _identity(seq_len=64), crashing, 30, log=QUIET)
    with pytest.raises(ConfigError, match=r"stream\.seq_len: 64 .* 128") as error:
        write_cache(_cfg(tmp_path / "partial"), _identity(seq_len=128), _blocks_from, 30, log=QUIET)
    assert "another data.cache.dir" in str(error.value)

    write_cache(_cfg(tmp_path / "done"), _identity(), _blocks_from, 30, log=QUIET)
    other = _identity(_other_revision())
    with pytest.raises(ConfigError, match=r"sources\[1\]\.revision: 'step4' .* 'main'"):
        write_cache(_cfg(tmp_path / "done"), other, _blocks_from, 30, log=QUIET)
    with pytest.raises(ConfigError, match=r"shard_batches: 2 .* 3"):  # same identity, other shard layout
        write_cache(replace(_cfg(tmp_path / "done"), shard_batches=3), _identity(), _blocks_from, 1000, log=QUIET)
    assert read_manifest(tmp_path / "done").token_count >= 30  # the refused extension left the cache intact


def test_tampered_or_missing_shard_is_refused(tmp_path: Path) -> None:
    cache_dir = write_cache(_cfg(tmp_path), _identity(), _blocks_from, 30, log=QUIET)
    shard = cache_dir / read_manifest(cache_dir).shards[1]["file"]
    with safe_open(str(shard), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        metadata = f.metadata()
    tensors["token_ids"] = tensors["token_ids"] + 1
    save_file(tensors, str(shard), metadata=metadata)
    blocks = CacheReader(cache_dir).iter_blocks()
    assert next(blocks).index == 0
    with pytest.raises(ConfigError, match=shard.name):
        next(blocks)
    shard.unlink()
    with pytest.raises(ConfigError, match=f"{shard.name} is missing"):
        list(CacheReader(cache_dir).iter_blocks(start=1))


def test_complete_cache_is_not_rebuilt_and_a_larger_one_extends(tmp_path: Path) -> None:
    cache_dir = write_cache(_cfg(tmp_path), _identity(), _blocks_from, 30, log=QUIET)
    before = read_manifest(cache_dir)

    def forbidden(start: int) -> Iterator[ActivationBlock]:
        raise AssertionError("a complete cache must not run the snapshots")

    logs: list[str] = []
    write_cache(_cfg(tmp_path), _identity(), forbidden, 30, log=logs.append)
    assert any("cache complete, nothing to do" in line for line in logs)
    assert read_manifest(cache_dir) == before

    starts: list[int] = []

    def recording(start: int) -> Iterator[ActivationBlock]:
        starts.append(start)
        return _blocks_from(start)

    write_cache(_cfg(tmp_path), _identity(), recording, 80, log=QUIET)
    after = read_manifest(cache_dir)
    assert starts == [len(before.shards) * SHARD_BATCHES]
    assert after.shards[: len(before.shards)] == before.shards and after.token_count >= 80
    assert torch.equal(_read_all(cache_dir)[1], _written(cache_dir)[1])
    assert json.loads((cache_dir / CACHE_MANIFEST_FILE).read_text())["complete"] is True
