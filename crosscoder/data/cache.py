"""On-disk activation cache: paired activations written once, read back by any number of training runs.

A hyper-parameter sweep then runs the snapshots once instead of once per run. The folder holds `build.json`
(what is being built, written first), shard files (each written under a temporary name and renamed, so a shard
under its final name is complete) and `manifest.json` (written last, so its presence means the cache is
complete). An interrupted build resumes after its last complete shard.

A shard holds `activations` [n, S, d] in the cache dtype, `token_ids` [n] (hashed into the manifest) and
`row_checksums` [n, S] int64 (`activation_checksums`): the reader verifies exactly the rows and snapshot columns it
read, from the bytes it already holds, so a corrupted shard is refused instead of trained on. The snapshots a
cache was built from are compared by fingerprint (crosscoder.sources.fingerprint), not only by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from crosscoder.config import CacheConfig, DataConfig
from crosscoder.constants import CACHE_FORMAT_VERSION, CACHE_HEADER_FILE, CACHE_MANIFEST_FILE, CACHE_SHARD_PATTERN
from crosscoder.data.activations import ActivationBlock
from crosscoder.errors import ConfigError
from crosscoder.sources.fingerprint import check_same_snapshots
from crosscoder.sources.models import DTYPES
from crosscoder.sources.spec import SourceInfo
from crosscoder.storage import temporary_sibling, write_text_atomic, writing

STREAM_KEYS = ("kind", "paths", "dataset", "dataset_config", "split", "text_field", "seq_len", "model_batch_size",
               "toy_documents", "seed")
"""DataConfig fields that decide which tokens the stream yields, in which order."""
PROGRESS_EVERY_S = 5.0


def cache_identity(info: SourceInfo, data_cfg: DataConfig, dtype: str) -> dict[str, Any]:
    """Everything that decides a cache's contents, so a cache is never silently reused for another stream."""
    identity = {
        "format_version": CACHE_FORMAT_VERSION, "sources": [asdict(spec) for spec in info.specs], "hook": info.hook,
        "d_model": info.d_model, "dtype": dtype,
        # Each worker reads its own document shard, so the worker count decides the token order too.
        "stream": {**{key: getattr(data_cfg, key) for key in STREAM_KEYS},
                   "document_shards": max(1, data_cfg.workers.num_workers)},
        "vocab_size": len(info.tokenizer) if info.tokenizer is not None else None,
    }
    return json.loads(json.dumps(identity))  # tuples -> lists, as it will read back from JSON


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


def _first_difference(old: Any, new: Any, where: str) -> str | None:
    """`key: old vs new` for the first nested value that differs, so an error names what changed."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        diffs = (_first_difference(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(old, new, strict=True)))
        return next((d for d in diffs if d), None)
    return None if old == new else f"{where}: {old!r} in the folder vs {new!r} now"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read activation cache file {path}: {error}") from error


def _shard_entry(path: Path) -> dict[str, Any]:
    """A complete shard's manifest entry, read back from its own metadata (no tensors loaded)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return {"file": path.name, "first_block": int(meta["first_block"]), "n_blocks": int(meta["n_blocks"]),
                "n_tokens": int(meta["n_tokens"]), "token_hash": meta["token_hash"]}
    except Exception as error:  # OSError, a missing key, or safetensors' own SafetensorError
        raise ConfigError(f"activation cache shard {path} is unreadable ({error}); delete it to rebuild it") from error


def _shard_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / CACHE_SHARD_PATTERN.format(index=index)


def _write_shard(path: Path, index: int, shard_batches: int, blocks: list[ActivationBlock],
                 names: list[str] | None = None) -> dict[str, Any]:
    """Write one shard under a temporary name, then rename: a shard under its final name is always complete.
    NaN/inf activations are refused here (naming the snapshots of `names`), not written for a run to train on."""
    activations = torch.cat([b.activations for b in blocks]).contiguous()
    if bad := nonfinite_columns(activations):
        shown = ", ".join(repr(names[c]) if names and c < len(names) else f"column {c}" for c in bad)
        raise ConfigError(f"the activations of snapshot(s) {shown} in blocks {blocks[0].index}..{blocks[-1].index} "
                          f"(activation cache shard {path.name}) hold NaN/inf: the snapshot's weights are bad or "
                          "its activations overflow the dtype (sources.dtype / data.cache.dtype float16?)")
    token_ids = torch.cat([b.token_ids for b in blocks]).to(torch.int64).contiguous()
    entry = {"file": path.name, "first_block": index * shard_batches, "n_blocks": len(blocks),
             "n_tokens": int(token_ids.shape[0]), "token_hash": token_hash(token_ids)}
    tmp = temporary_sibling(path, "tmp")
    hint = "; the complete shards stay: free space and rerun the same command to continue the build"
    try:
        with writing("the activation cache shard", path, hint=hint):
            save_file({"activations": activations, "token_ids": token_ids,
                       "row_checksums": activation_checksums(activations)}, str(tmp),
                      metadata={key: str(value) for key, value in entry.items() if key != "file"})
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return entry


def _append_shards(
    cache_dir: Path, cfg: CacheConfig, identity: dict[str, Any], shards: list[dict[str, Any]], done: int,
    blocks_from: Callable[[int], Iterator[ActivationBlock]], total_tokens: int, log: Callable[[str], None],
) -> int:
    """Stream blocks from the first missing shard on, writing full shards (appended to `shards`) until
    `total_tokens` are on disk; returns the tokens on disk. Blocks after the last full shard are dropped."""
    start_time = last_log = time.monotonic()
    written, pending = 0, []
    names = [str(source.get("name")) for source in identity.get("sources", [])]
    stream = blocks_from(len(shards) * cfg.shard_batches)
    try:
        for block in stream:
            expected = len(shards) * cfg.shard_batches + len(pending)
            if block.index != expected:
                raise RuntimeError(f"activation stream yielded block {block.index}, expected {expected}")
            pending.append(ActivationBlock(block.index, block.activations.detach().to("cpu", DTYPES[cfg.dtype]),
                                           block.token_ids.cpu()))
            if len(pending) < cfg.shard_batches:
                continue
            entry = _write_shard(_shard_path(cache_dir, len(shards)), len(shards), cfg.shard_batches, pending, names)
            shards.append(entry)
            pending = []
            done, written = done + entry["n_tokens"], written + entry["n_tokens"]
            now = time.monotonic()
            if done >= total_tokens or now - last_log >= PROGRESS_EVERY_S or len(shards) == 1:
                rate = written / max(now - start_time, 1e-9)
                eta = max(total_tokens - done, 0) / max(rate, 1e-9)
                log(f"activation cache: {len(shards)} shards, {done}/{total_tokens} tokens, {rate:,.0f} tokens/s, "
                    f"ETA {eta:,.0f} s")
                last_log = now
            if done >= total_tokens:
                break
    finally:
        close = getattr(stream, "close", None)  # stops the producer (activation workers) we no longer need
        if close is not None:
            close()
    return done


def write_cache(cfg: CacheConfig, identity: dict[str, Any], blocks_from: Callable[[int], Iterator[ActivationBlock]],
                total_tokens: int, log: Callable[[str], None] = print) -> Path:
    """Write (or finish, or extend) the cache at `cfg.dir` until it holds at least `total_tokens` tokens.

    `blocks_from(start)` yields the blocks with index start, start + 1, ...; shard k holds blocks
    [k * shard_batches, (k + 1) * shard_batches), so a resumed build restarts the stream at its first missing shard.
    """
    if not cfg.dir:
        raise ConfigError("data.cache.dir must be set: the folder the activation cache is written to")
    if cfg.dtype not in DTYPES or identity.get("dtype", cfg.dtype) != cfg.dtype:
        raise ConfigError(f"data.cache.dtype={cfg.dtype!r}: must be one of {', '.join(DTYPES)} and match the "
                          f"cache identity's dtype {identity.get('dtype')!r}")
    cache_dir = Path(cfg.dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    identity = json.loads(json.dumps(identity))
    manifest_path, header_path = cache_dir / CACHE_MANIFEST_FILE, cache_dir / CACHE_HEADER_FILE
    existing = _read_json(manifest_path) if manifest_path.is_file() else None
    if existing is not None:
        if diff := _first_difference(existing.get("identity"), identity, "identity"):
            raise ConfigError(f"data.cache.dir={cfg.dir}: the folder holds a cache of other sources or another "
                              f"token stream ({diff}); pick another data.cache.dir")
        if existing.get("token_count", 0) >= total_tokens:
            log(f"activation cache {cache_dir}: cache complete, nothing to do ({existing['token_count']} tokens)")
            return cache_dir

    header = {"format_version": CACHE_FORMAT_VERSION, "identity": identity, "shard_batches": cfg.shard_batches}
    if header_path.is_file():
        if diff := _first_difference(_read_json(header_path), header, "build"):
            raise ConfigError(f"data.cache.dir={cfg.dir}: the folder holds a build of another cache ({diff}); "
                              "pick another data.cache.dir or delete the folder")
    elif existing is None and _shard_path(cache_dir, 0).exists():
        raise ConfigError(f"data.cache.dir={cfg.dir}: the folder holds shard files but no {CACHE_HEADER_FILE}, so "
                          "their origin is unknown; pick another data.cache.dir or delete the folder")
    else:
        write_text_atomic(header_path, json.dumps(header, indent=2))
    if existing is not None:
        log(f"activation cache {cache_dir}: holds {existing.get('token_count')} tokens, extending to {total_tokens}")
        manifest_path.unlink()  # incomplete again until the extension is done
    for stale in cache_dir.glob(".shard_*.tmp-*"):  # left by a build killed mid-write
        stale.unlink(missing_ok=True)

    shards = []
    while _shard_path(cache_dir, len(shards)).is_file():
        shards.append(_shard_entry(_shard_path(cache_dir, len(shards))))
    done = sum(entry["n_tokens"] for entry in shards)
    if shards:
        log(f"activation cache {cache_dir}: resuming after {len(shards)} complete shards ({done} tokens)")

    if done < total_tokens:
        done = _append_shards(cache_dir, cfg, identity, shards, done, blocks_from, total_tokens, log)
    if done < total_tokens:
        raise RuntimeError(f"the activation stream ended after {done} tokens, before the {total_tokens} asked for")

    manifest = {"format_version": CACHE_FORMAT_VERSION, "identity": identity, "shard_batches": cfg.shard_batches,
                "token_count": done, "complete": True, "shards": shards}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2))
    log(f"activation cache {cache_dir}: complete, {len(shards)} shards, {done} tokens")
    return cache_dir


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
    raw = _read_json(path)
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
    check_same_snapshots(built, info.specs, where)
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
