"""Reading an activation cache (crosscoder.data.cache builds one): its manifest, the check that it was built from
this run's snapshots, and the reader that streams each rank's rows, verified, plus the format's primitives
(token hashes, row checksums) the builder writes with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from crosscoder.constants import CACHE_FORMAT_VERSION, CACHE_MANIFEST_FILE
from crosscoder.data.activations import ActivationBlock
from crosscoder.errors import ConfigError
from crosscoder.sources.fingerprint import check_same_snapshots
from crosscoder.sources.spec import SourceInfo


def token_hash(token_ids: torch.Tensor) -> str:
    """sha256 of the int64 token ids: proves a shard holds the tokens the manifest says (cheap to recompute)."""
    return hashlib.sha256(token_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def activation_checksums(activations: torch.Tensor) -> torch.Tensor:
    """[n, S] int64 checksums of [n, S, d] activations (any dtype): for each (row, snapshot), the bytes of its d
    values read as little-endian unsigned words w_0, w_1, ... (8 bytes each, or 4 or 2 when d's bytes are not a
    multiple of 8), Σ_j (2j + 1)·w_j mod 2^64, stored as int64.

    Exact and order-independent (integer arithmetic modulo 2^64, well defined for numpy's unsigned types), so the
    builder and any reader agree bit for bit; a single flipped bit changes word j by ±2^k and the sum by
    ±(2j + 1)·2^k, never 0 mod 2^64 as the weight is odd; the position weights also catch moved values. The
    words are the stored bytes themselves (no conversion), so one matrix-vector product is the whole cost.
    """
    n, n_sources, d = activations.shape
    if n * n_sources == 0:
        return torch.zeros(n, n_sources, dtype=torch.int64)
    raw = activations.contiguous().view(torch.uint8).reshape(n * n_sources, d * activations.element_size())
    row_bytes = raw.shape[1]
    word = next(size for size in (8, 4, 2, 1) if row_bytes % size == 0)
    words = raw.numpy().view({8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}[word])
    weights = np.arange(words.shape[1], dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    sums = words @ weights if word == 8 else words.astype(np.uint64) @ weights
    return torch.from_numpy(np.ascontiguousarray(sums).view(np.int64)).reshape(n, n_sources)


def nonfinite_columns(activations: torch.Tensor) -> list[int]:
    """The snapshot columns of [n, S, d] activations holding a NaN or an inf. A column's sum is finite only if
    all its values are, so the (slower) element-wise test runs only on a column whose sum is not."""
    sums = activations.sum(dim=(0, 2), dtype=torch.float32)
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    return [c for c in suspects if not bool(torch.isfinite(activations[:, c]).all())]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read activation cache file {path}: {error}") from error


@dataclass
class CacheManifest:
    """A complete cache's table of contents: what it was built from and which tokens each shard holds."""

    format_version: int
    identity: dict[str, Any]
    shard_batches: int
    token_count: int
    shards: list[dict[str, Any]]


def read_manifest(cache_dir: str | Path) -> CacheManifest:
    """The manifest of a complete cache; a ConfigError saying how to build it when there is none."""
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / CACHE_MANIFEST_FILE
    if not path.is_file():
        state = "does not exist" if not cache_dir.is_dir() else f"has no {CACHE_MANIFEST_FILE}"
        raise ConfigError(f"activation cache {cache_dir} {state}: it is incomplete or was never built; build it "
                          f"with `crosscoder-cache data.cache.dir={cache_dir}`")
    raw = read_json(path)
    if raw.get("format_version") != CACHE_FORMAT_VERSION:
        raise ConfigError(f"{path}: format_version={raw.get('format_version')!r}, expected {CACHE_FORMAT_VERSION}; "
                          f"rebuild it with `crosscoder-cache data.cache.dir={cache_dir}`")
    try:
        return CacheManifest(raw["format_version"], raw["identity"], int(raw["shard_batches"]),
                             int(raw["token_count"]), list(raw["shards"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{path} is malformed ({error!r}); rebuild the cache") from error


def check_cache_matches(manifest: CacheManifest, info: SourceInfo, cache_dir: str | Path) -> None:
    """Refuse a cache of other snapshots or another hook: training on it would silently learn the wrong models.

    A local snapshot directory may have moved since the build, so only hub-id paths are compared; what each
    snapshot holds is compared by fingerprint (`check_same_snapshots`): other weights under the same names (another
    model's `step0, step100`) are refused.
    """
    built = manifest.identity.get("sources", [])
    where = f"activation cache {cache_dir}"
    if len(built) != len(info.specs):
        raise ConfigError(f"{where} was built from {len(built)} snapshots ({[s.get('name') for s in built]}), the "
                          f"sources name {len(info.specs)} ({[s.name for s in info.specs]})")
    for i, (old, spec) in enumerate(zip(built, info.specs, strict=True)):
        keys = ["name", "revision", "step"] + ([] if Path(spec.path).expanduser().is_dir() else ["path"])
        for key in keys:
            if old.get(key) != getattr(spec, key):
                raise ConfigError(f"{where}: snapshot {i} has {key}={old.get(key)!r} in the cache but "
                                  f"{key}={getattr(spec, key)!r} in the sources")
    check_same_snapshots(built, info.specs, where, folder=info.folder)
    for key, now in (("hook", info.hook), ("d_model", info.d_model)):
        if manifest.identity.get(key) != now:
            raise ConfigError(f"{where} was built at {key}={manifest.identity.get(key)!r}, the sources have {now!r}")


class CacheReader:
    """Streams a complete cache's shards as ActivationBlocks, each rank reading only its own rows."""

    def __init__(self, cache_dir: str | Path, rank: int = 0, world_size: int = 1, batch_rows: int = 0,
                 sources: range | None = None) -> None:
        """`batch_rows` > 0 reads in global batch order: rank r takes the r-th run of `batch_rows` rows out of every
        `world_size` runs, so N ranks with micro batch `batch_rows` see, batch for batch, the rows one rank with
        the global batch sees (unshuffled). 0: each rank reads one contiguous range per shard (less I/O).
        `sources`: read only these snapshots' columns (a snapshot rank's share; all when None)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.cache_dir = Path(cache_dir).expanduser()
        self.manifest = read_manifest(self.cache_dir)
        self.sources = sources
        self.rank, self.world_size, self.batch_rows = rank, world_size, batch_rows
        self.n_shards = len(self.manifest.shards)
        counts = [int(shard["n_tokens"]) for shard in self.manifest.shards]
        self._offsets = [sum(counts[:index]) for index in range(len(counts))]  # first global row of each shard
        self.tokens_per_rank = self.tokens_from(0)

    def tokens_from(self, start: int) -> int:
        """This rank's tokens in shards start, start + 1, ... (what a stream resumed at `start` can serve)."""
        return sum(self._rows(index).shape[0] for index in range(start, self.n_shards))

    def _rows(self, index: int) -> torch.Tensor:
        """This rank's rows of shard `index` (local row numbers): disjoint across ranks, together the whole shard."""
        return rank_rows(int(self.manifest.shards[index]["n_tokens"]), self._offsets[index], self.rank,
                         self.world_size, self.batch_rows)

    def iter_blocks(self, start: int = 0) -> Iterator[ActivationBlock]:
        """Shards start, start + 1, ... once each, as float32; block index = shard index (what resuming counts).

        Every block is verified before it is yielded: the shard's token hash, the activation checksums of exactly
        the rows and snapshot columns read, and that no activation is NaN/inf; a ConfigError names the shard."""
        for index in range(start, self.n_shards):
            block = self._read_shard(index)
            if block is not None:
                yield block

    def _read_shard(self, index: int) -> ActivationBlock | None:
        """This rank's rows (and snapshots) of shard `index`, verified; None when the rank has no rows there."""
        entry = self.manifest.shards[index]
        path = self.cache_dir / entry["file"]
        if not path.is_file():
            raise ConfigError(f"activation cache shard {path} is missing; rebuild the cache")
        try:
            with safe_open(str(path), "pt") as f:
                token_ids = f.get_tensor("token_ids")
                if token_hash(token_ids) != entry["token_hash"]:
                    raise ConfigError(f"activation cache shard {path} does not hold the tokens its manifest lists "
                                      "(token hash mismatch); rebuild the cache")
                rows = self._rows(index)
                if rows.numel() == 0:
                    return None
                # Read only this rank's rows (contiguous runs of them: one, or one per global batch in global
                # batch order) and only its snapshots' columns: never the whole shard.
                columns = slice(None) if self.sources is None else slice(self.sources.start, self.sources.stop)
                runs = row_runs(rows)
                stored, checksums = f.get_slice("activations"), f.get_slice("row_checksums")
                raw = torch.cat([stored[first:last, columns] for first, last in runs])
                expected = torch.cat([checksums[first:last, columns] for first, last in runs])
        except ConfigError:
            raise
        except Exception as error:  # safetensors' SafetensorError (corrupt header, truncated file), a missing tensor
            raise ConfigError(f"activation cache shard {path} is unreadable ({type(error).__name__}: {error}); "
                              "rebuild the cache") from error
        self._verify(path, rows, raw, expected)
        activations = raw.float()
        if bad := nonfinite_columns(activations):
            raise ConfigError(f"activation cache shard {path} holds NaN/inf activations of snapshot(s) "
                              f"{self._names(bad)}; the snapshot's weights or the build were bad")
        return ActivationBlock(index, activations, token_ids[rows].clone())

    def _verify(self, path: Path, rows: torch.Tensor, raw: torch.Tensor, expected: torch.Tensor) -> None:
        """Refuse activations whose checksums are not the stored ones, naming the shard rows and snapshots."""
        actual = activation_checksums(raw)
        if torch.equal(actual, expected):
            return
        where = (actual != expected).nonzero()
        bad_rows = rows[where[:, 0]]
        raise ConfigError(
            f"activation cache shard {path} is corrupt (activation checksum mismatch in rows "
            f"{int(bad_rows.min())}..{int(bad_rows.max())}, snapshot(s) {self._names(where[:, 1].unique().tolist())}"
            "); rebuild the cache"
        )

    def _names(self, columns: list[int]) -> str:
        """The snapshot names of columns of what this reader reads (its `sources` share, or all)."""
        names = [str(s.get("name")) for s in self.manifest.identity.get("sources", [])]
        offset = self.sources.start if self.sources is not None else 0
        return ", ".join(repr(names[offset + c]) if offset + c < len(names) else f"column {offset + c}"
                         for c in columns)


def rank_rows(n: int, offset: int, rank: int, world_size: int, batch_rows: int = 0) -> torch.Tensor:
    """A rank's rows (local row numbers) of a shard of `n` rows whose first row is global row `offset`: disjoint
    across ranks, together the whole shard. `batch_rows` > 0: the rows whose global run of `batch_rows` falls to
    the rank (global batch order); 0: one contiguous range per rank. Shared by every shard reader."""
    if batch_rows > 0:
        global_rows = torch.arange(offset, offset + n)
        mine = (global_rows // batch_rows) % world_size == rank
        return mine.nonzero().squeeze(1)
    return torch.arange(n * rank // world_size, n * (rank + 1) // world_size)


def row_runs(rows: torch.Tensor) -> list[tuple[int, int]]:
    """[(first, last + 1)] of each run of consecutive row numbers in the sorted `rows`."""
    breaks = ((rows[1:] - rows[:-1]) != 1).nonzero().squeeze(1) + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), rows.numel()]
    return [(int(rows[start]), int(rows[end - 1]) + 1) for start, end in zip(starts, ends, strict=True)]
