"""Activation cache: exact round trips, disjoint rank slices, refusal of foreign caches, resumable builds,
activation checksums and refusal of corrupt, truncated or non-finite shards."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from crosscoder.config import CacheConfig, DataConfig, SourcesConfig
from crosscoder.constants import CACHE_HEADER_FILE, CACHE_MANIFEST_FILE
from crosscoder.data.activations import ActivationBlock
from crosscoder.data.cache import cache_identity, write_cache
from crosscoder.data.cache_reader import CacheReader, activation_checksums, check_cache_matches, read_manifest
from crosscoder.data.kinds import describe_sources
from crosscoder.errors import ConfigError
from crosscoder.sources.spec import SnapshotSpec, SourceInfo

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
    specs = [SnapshotSpec(name=r, path="org/model", revision=r, step=int(r[4:]), fingerprint=f"fp-of-{r}")
             for r in revisions]
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


# ---- snapshot fingerprints -------------------------------------------------------------------------------


def test_a_cache_of_other_weights_under_the_same_names_is_refused(tmp_path: Path) -> None:
    """Same names, revisions and steps, another fingerprint: refused naming the snapshot; a saved entry without a
    fingerprint (an older build) is refused with a rebuild hint."""
    cache_dir = write_cache(_cfg(tmp_path / "cache"), _identity(), _blocks_from, 10, log=QUIET)
    manifest = read_manifest(cache_dir)
    other = _info()
    other.specs[1] = replace(other.specs[1], fingerprint="fp-of-another-model")
    with pytest.raises(ConfigError, match=r"was made from a different snapshot 'step4' \(fingerprint fp-of-step4"
                                          r" there, fp-of-anothe… now: its weights or config changed\)") as error:
        check_cache_matches(manifest, other, cache_dir)
    assert str(cache_dir) in str(error.value)
    del manifest.identity["sources"][0]["fingerprint"]
    with pytest.raises(ConfigError, match=r"'step0' without a fingerprint.*rebuild"):
        check_cache_matches(manifest, _info(), cache_dir)
    # A build resumed or extended with other weights under the same names is refused by its identity too.
    with pytest.raises(ConfigError, match=r"sources\[1\]\.fingerprint: 'fp-of-step4' .* 'fp-of-another-model'"):
        write_cache(_cfg(tmp_path / "cache"), _identity(other), _blocks_from, 100, log=QUIET)


def _tiny_snapshot(directory: Path, seed: int, tokenizer_from: Path) -> None:
    """A random-init 2-block GPT-NeoX of width 32 (the toy's shape and tokenizer), saved as a snapshot."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(seed)
    GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_a_cache_of_another_models_snapshots_with_the_same_directory_names_is_refused(
    tiny_snapshots: list, tmp_path: Path
) -> None:
    """runA/{step0,step100} and runB/{step0,step100}: same names and steps, other weights. A cache built from runA
    is refused for runB's sources, naming the first snapshot that differs; runA moved elsewhere is accepted."""
    for run, seeds in (("runA", (1, 2)), ("runB", (1, 3))):  # step0 is the same init in both runs
        for name, seed in zip(("step0", "step100"), seeds, strict=True):
            _tiny_snapshot(tmp_path / run / name, seed, tiny_snapshots[0].path)
    infos = {run: describe_sources(SourcesConfig(paths=[str(tmp_path / run / n) for n in ("step0", "step100")],
                                                 hook="blocks.1.hook_resid_pre"), log=QUIET)
             for run in ("runA", "runB")}
    assert infos["runA"].specs[0].fingerprint == infos["runB"].specs[0].fingerprint
    assert infos["runA"].specs[1].fingerprint != infos["runB"].specs[1].fingerprint
    identity = cache_identity(infos["runA"], DataConfig(), "float32")
    assert [s["fingerprint"] for s in identity["sources"]] == [s.fingerprint for s in infos["runA"].specs]
    blocks = lambda start: (ActivationBlock(i, torch.randn(6, 2, 32), torch.arange(6)) for i in range(start, 99))  # noqa: E731
    cache_dir = write_cache(_cfg(tmp_path / "cache"), identity, blocks, 10, log=QUIET)
    manifest = read_manifest(cache_dir)
    check_cache_matches(manifest, infos["runA"], cache_dir)
    with pytest.raises(ConfigError, match=r"different snapshot 'step100'"):
        check_cache_matches(manifest, infos["runB"], cache_dir)
    shutil.copytree(tmp_path / "runA", tmp_path / "moved" / "runA")
    moved = describe_sources(SourcesConfig(paths=[str(tmp_path / "moved" / "runA" / n) for n in ("step0", "step100")],
                                           hook="blocks.1.hook_resid_pre"), log=QUIET)
    check_cache_matches(manifest, moved, cache_dir)
    # The training state's use: the `asdict(spec)` list, through JSON, against the sources now.
    saved = json.loads(json.dumps([asdict(spec) for spec in infos["runA"].specs]))
    from crosscoder.sources.fingerprint import check_same_snapshots

    check_same_snapshots(saved, moved.specs, "training state X")
    with pytest.raises(ConfigError, match=r"training state X was made from a different snapshot 'step100'"):
        check_same_snapshots(saved, infos["runB"].specs, "training state X")


# ---- activation checksums and unreadable shards ----------------------------------------------------------


@pytest.mark.parametrize(("dtype", "d"), [(torch.float32, 4), (torch.bfloat16, 8), (torch.float16, 3),
                                          (torch.bfloat16, 256)])
def test_activation_checksums_catch_any_flipped_bit_and_moved_values(dtype: torch.dtype, d: int) -> None:
    """Every single-bit flip of any one value changes its (row, snapshot) checksum and no other; swapping two
    values of a row changes it; the checksum of a slice is the slice of the checksums (what a reader verifies)."""
    activations = torch.randn(5, 3, d).to(dtype)
    reference = activation_checksums(activations)
    assert reference.dtype == torch.int64 and reference.shape == (5, 3)
    assert torch.equal(activation_checksums(activations[1:4, 1:]), reference[1:4, 1:])
    bits = activations.view({4: torch.int32, 2: torch.int16}[activations.element_size()])
    for position in {0, d // 2, d - 1}:
        for bit in range(8 * activations.element_size()):
            flipped = bits.clone()
            flipped[2, 1, position] ^= (1 << bit) if bit < 8 * activations.element_size() - 1 else -(1 << bit)
            changed = activation_checksums(flipped.view(dtype)) != reference
            assert changed[2, 1] and int(changed.sum()) == 1, (position, bit)
    swapped = activations.clone()
    swapped[0, 0, [0, d - 1]] = activations[0, 0, [d - 1, 0]]
    assert activation_checksums(swapped)[0, 0] != reference[0, 0]


def _rewrite_shard(shard: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite a shard with `change` applied to its tensors, keeping its metadata."""
    with safe_open(str(shard), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        metadata = f.metadata()
    change(tensors)
    save_file(tensors, str(shard), metadata=metadata)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_corrupted_activation_is_refused_by_exactly_the_readers_that_read_it(tmp_path: Path, dtype: str) -> None:
    """One flipped bit (row 3, snapshot 1 = 'step4' of shard 1): a reader whose rows or snapshot columns include
    it refuses naming the shard, the row and the snapshot; readers of other rows or columns are unaffected."""
    info = _info(("step0", "step4", "step8"))
    cache_dir = write_cache(_cfg(tmp_path, dtype), _identity(info, dtype=dtype), _blocks_from, 30, log=QUIET)
    shard = cache_dir / read_manifest(cache_dir).shards[1]["file"]

    def flip(tensors: dict[str, torch.Tensor]) -> None:
        bits = tensors["activations"].view(torch.int32 if dtype == "float32" else torch.int16)
        bits[3, 1, 2] ^= 1 << 4

    _rewrite_shard(shard, flip)
    message = rf"shard {shard}.*is corrupt \(activation checksum mismatch in rows 3\.\.3, snapshot\(s\) 'step4'\)"
    with pytest.raises(ConfigError, match=message):
        list(CacheReader(cache_dir).iter_blocks())
    with pytest.raises(ConfigError, match=message):
        list(CacheReader(cache_dir, sources=range(1, 3)).iter_blocks())
    assert len(list(CacheReader(cache_dir, sources=range(2, 3)).iter_blocks())) == 3  # not column 1
    assert len(list(CacheReader(cache_dir, sources=range(0, 1)).iter_blocks())) == 3
    assert len(list(CacheReader(cache_dir, rank=1, world_size=2).iter_blocks())) == 3  # not row 3
    with pytest.raises(ConfigError, match="checksum mismatch in rows 3..3"):
        list(CacheReader(cache_dir, rank=0, world_size=2).iter_blocks())


def test_a_shard_with_a_corrupt_header_or_truncated_is_refused_naming_it(tmp_path: Path) -> None:
    cache_dir = write_cache(_cfg(tmp_path), _identity(), _blocks_from, 30, log=QUIET)
    shard = cache_dir / read_manifest(cache_dir).shards[1]["file"]
    intact = shard.read_bytes()
    shard.write_bytes(intact[:8] + b"#" * 16 + intact[24:])  # inside the JSON header
    with pytest.raises(ConfigError, match=rf"shard {shard} is unreadable \(SafetensorError: .*header.*rebuild"):
        list(CacheReader(cache_dir).iter_blocks())
    shard.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(ConfigError, match=rf"shard {shard} is unreadable"):
        list(CacheReader(cache_dir).iter_blocks(start=1))
    shard.write_bytes(intact)
    _rewrite_shard(shard, lambda tensors: tensors.pop("row_checksums"))  # a shard of the old format
    with pytest.raises(ConfigError, match=rf"shard {shard} is unreadable"):
        list(CacheReader(cache_dir).iter_blocks(start=1))


def test_nan_or_inf_activations_are_refused_naming_shard_and_snapshot(tmp_path: Path) -> None:
    """In a shard (checksums intact): refused by the reader naming the shard and the snapshot. From the snapshots
    while building: refused before they are written."""
    cache_dir = write_cache(_cfg(tmp_path / "cache"), _identity(), _blocks_from, 30, log=QUIET)
    shard = cache_dir / read_manifest(cache_dir).shards[2]["file"]

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["activations"][4, 1, 0] = float("nan")
        tensors["activations"][0, 1, 3] = float("inf")
        tensors["row_checksums"] = activation_checksums(tensors["activations"])

    _rewrite_shard(shard, poison)
    blocks = CacheReader(cache_dir).iter_blocks()
    assert [next(blocks).index, next(blocks).index] == [0, 1]
    with pytest.raises(ConfigError, match=rf"shard {shard} holds NaN/inf activations of snapshot\(s\) 'step4'; "
                                          "the snapshot's weights or the build were bad"):
        next(blocks)
    assert len(list(CacheReader(cache_dir, sources=range(0, 1)).iter_blocks())) == 3  # step0 alone is fine

    def nan_from(start: int) -> Iterator[ActivationBlock]:
        for block in _blocks_from(start):
            if block.index == 3:
                block.activations[0, 0, 0] = float("nan")
            yield block

    with pytest.raises(ConfigError, match=r"snapshot\(s\) 'step0' in blocks 2\.\.3 .* hold NaN/inf"):
        write_cache(_cfg(tmp_path / "nan"), _identity(), nan_from, 30, log=QUIET)
    assert _shard_files(tmp_path / "nan") == ["shard_000000.safetensors"]


def test_a_cache_of_the_previous_format_is_refused_with_the_rebuild_hint(tmp_path: Path) -> None:
    """Format 1 shards hold no checksums: a cache whose manifest says format 1 is refused, naming the fix."""
    cache_dir = write_cache(_cfg(tmp_path), _identity(), _blocks_from, 10, log=QUIET)
    manifest = json.loads((cache_dir / CACHE_MANIFEST_FILE).read_text())
    manifest["format_version"] = 1
    (cache_dir / CACHE_MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"format_version=1, expected 2; rebuild it with `crosscoder-cache"):
        CacheReader(cache_dir)
