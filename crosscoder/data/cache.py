"""On-disk activation cache: paired activations written once, read back by any number of training runs.

A hyper-parameter sweep then runs the snapshots once instead of once per run. The folder holds `build.json`
(what is being built, written first), shard files (each written under a temporary name and renamed, so a shard
under its final name is complete) and `manifest.json` (written last, so its presence means the cache is
complete). An interrupted build resumes after its last complete shard. This module builds a cache;
crosscoder.data.cache_reader reads one.

A shard holds `activations` [n, S, d] in the cache dtype, `token_ids` [n] (hashed into the manifest) and
`row_checksums` [n, S] int64 (`activation_checksums`): the reader verifies exactly the rows and snapshot columns it
read, from the bytes it already holds, so a corrupted shard is refused instead of trained on. The snapshots a
cache was built from are compared by fingerprint (crosscoder.sources.fingerprint), not only by name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from crosscoder.config import CacheConfig, DataConfig
from crosscoder.constants import CACHE_FORMAT_VERSION, CACHE_HEADER_FILE, CACHE_MANIFEST_FILE, CACHE_SHARD_PATTERN
from crosscoder.data.activations import ActivationBlock
from crosscoder.data.cache_reader import activation_checksums, nonfinite_columns, read_json, token_hash
from crosscoder.errors import ConfigError
from crosscoder.sources.models import DTYPES
from crosscoder.sources.spec import SourceInfo
from crosscoder.storage import free_space, save_safetensors, write_text_atomic, writing

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
    hint = "; the complete shards stay: free space and rerun the same command to continue the build"
    with writing("the activation cache shard", path, hint=hint):
        save_safetensors({"activations": activations, "token_ids": token_ids,
                          "row_checksums": activation_checksums(activations)}, path,
                         metadata={key: str(value) for key, value in entry.items() if key != "file"})
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


def check_cache_fits(cfg: CacheConfig, info: SourceInfo, total_tokens: int) -> None:
    """Refuse at start-up a cache the disk cannot hold, before any snapshot loads: its size is known from the
    tokens, the sources, the width and the dtype (activations, then per row a token id and a checksum per source).
    Shards already in the folder count as written. Safetensors headers and the JSON files are left out (small)."""
    if not cfg.dir or cfg.dtype not in DTYPES:
        return  # write_cache names these
    n_sources, itemsize = len(info.specs), torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    needed = total_tokens * (n_sources * info.d_model * itemsize + 8 + 8 * n_sources)
    cache_dir = Path(cfg.dir).expanduser()
    if cache_dir.is_dir():
        needed -= sum(path.stat().st_size for path in cache_dir.glob(CACHE_SHARD_PATTERN.replace("{index:06d}", "*")))
    free, where = free_space(cache_dir)
    if free is not None and needed > free:
        raise ConfigError(
            f"data.cache.dir={cfg.dir}: the cache needs about {needed / 2**30:,.2f} GiB more "
            f"({total_tokens:,} tokens x "
            f"{n_sources} sources x d={info.d_model} in {cfg.dtype}) but {where} has {free / 2**30:,.2f} GiB free; "
            "free space, pick another data.cache.dir, or set data.cache.tokens / data.cache.dtype=bfloat16")


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
    existing = read_json(manifest_path) if manifest_path.is_file() else None
    if existing is not None:
        if diff := _first_difference(existing.get("identity"), identity, "identity"):
            raise ConfigError(f"data.cache.dir={cfg.dir}: the folder holds a cache of other sources or another "
                              f"token stream ({diff}); pick another data.cache.dir")
        if existing.get("token_count", 0) >= total_tokens:
            log(f"activation cache {cache_dir}: cache complete, nothing to do ({existing['token_count']} tokens)")
            return cache_dir

    header = {"format_version": CACHE_FORMAT_VERSION, "identity": identity, "shard_batches": cfg.shard_batches}
    if header_path.is_file():
        if diff := _first_difference(read_json(header_path), header, "build"):
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
