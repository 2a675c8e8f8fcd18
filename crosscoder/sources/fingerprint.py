"""Snapshot fingerprints: what a snapshot *is*, so a cache or a training state made from other weights is refused.

A snapshot's name, revision and step say where it is, not what it holds: `step0, step100` of another model have
the same names. A fingerprint is a sha256 over

- the snapshot's config.json, parsed and re-serialised with sorted keys, bookkeeping fields dropped
  (`_name_or_path` and every other `_`-prefixed key, `transformers_version`, `torch_dtype`/`dtype`: the storage
  dtype is already in the weight bytes, the snapshot is loaded at `sources.dtype` whatever the field says, and
  transformers v5 renamed `torch_dtype` to `dtype`, so keeping it would make one checkpoint re-saved by another
  version look like another snapshot);
- each weight file (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`, read as raw bytes, never unpickled), in sorted
  order: its name, its size and a few fixed regions (the first MiB, which holds a safetensors header and the
  first tensors, 8 chunks of 64 KiB evenly spaced, the last 64 KiB). Two checkpoints of one architecture have
  the same header but other values, so they differ, while a few MB are read per file.

A hub snapshot found in the HF cache layout (`.../snapshots/<commit>/config.json`) is its commit hash, git's
content address of every file of the repository at that revision, plus its config: no weights are read or
downloaded, so training from a cache never needs them. Planted snapshots are their revision digest (a hash of
the planted problem's config).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from crosscoder.errors import ConfigError
from crosscoder.sources.spec import SYNTHETIC_PATH, SnapshotSpec

FINGERPRINT_RECIPE = b"crosscoder-snapshot-fingerprint-v1\n"
"""Hashed first: a change of recipe changes every fingerprint instead of silently matching old ones."""
IGNORED_CONFIG_KEYS = frozenset({"transformers_version", "torch_dtype", "dtype"})
"""config.json fields (besides `_`-prefixed ones) that do not change what the snapshot computes."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HEAD_BYTES = 1 << 20
CHUNK_BYTES = 64 << 10
N_CHUNKS = 8
SHOWN_DIGITS = 12
"""Digits of a fingerprint an error message shows."""


def canonical_config(raw: dict[str, Any]) -> str:
    """config.json as sorted compact JSON without the bookkeeping fields (at any depth: sub-configs carry them too)."""
    def strip(value: Any) -> Any:  # noqa: ANN401 (any JSON value)
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items()
                    if not key.startswith("_") and key not in IGNORED_CONFIG_KEYS}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    return json.dumps(strip(raw), sort_keys=True, separators=(",", ":"))


def sampled_regions(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes of a `size`-byte weight file that enter its fingerprint: all of a small file;
    of a large one the first HEAD_BYTES, N_CHUNKS chunks evenly spaced between that and the last chunk, the last."""
    if size <= HEAD_BYTES + (N_CHUNKS + 1) * CHUNK_BYTES:
        return [(0, size)]
    tail = size - CHUNK_BYTES
    span = tail - HEAD_BYTES  # where the middle chunks may start, so none overlaps the head or the tail
    middle = [(HEAD_BYTES + span * k // (N_CHUNKS + 1), CHUNK_BYTES) for k in range(1, N_CHUNKS + 1)]
    return [(0, HEAD_BYTES), *middle, (tail, CHUNK_BYTES)]


def _read_regions(path: Path, regions: list[tuple[int, int]]) -> Iterator[bytes]:
    with path.open("rb") as f:
        for offset, length in regions:
            f.seek(offset)
            yield f.read(length)


def _read_config(path: Path, spec: SnapshotSpec) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot fingerprint snapshot {spec.name!r} ({spec.path}): cannot read {path}: "
                          f"{error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"cannot fingerprint snapshot {spec.name!r} ({spec.path}): {path} is not a JSON object")
    return raw


def directory_fingerprint(directory: Path, spec: SnapshotSpec) -> str:
    """The fingerprint of a local snapshot directory: its config plus sampled bytes of every weight file."""
    config = directory / "config.json"
    if not config.is_file():
        raise ConfigError(f"cannot fingerprint snapshot {spec.name!r}: {directory} has no config.json")
    digest = hashlib.sha256(FINGERPRINT_RECIPE)
    digest.update(b"local\n" + canonical_config(_read_config(config, spec)).encode() + b"\n")
    weights = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    for path in weights:
        size = path.stat().st_size  # through symlinks (an HF cache snapshot links to its blobs)
        regions = sampled_regions(size)
        digest.update(json.dumps({"file": path.name, "size": size, "regions": regions}).encode() + b"\n")
        for chunk in _read_regions(path, regions):
            digest.update(chunk)
    return digest.hexdigest()


DIGEST_CHUNK = 8 << 20
LARGE_INPUT_BYTES = 1 << 30
"""Inputs larger than this say, as they are hashed whole, that they are being read."""


def whole_file_digests(files: dict[str, Path], what: str, log: Callable[[str], None] = print) -> dict[str, str]:
    """sha256 of each file, whole, under its key: what a resumed run checks its inputs against exactly, where a
    fingerprint only samples bytes. One read of them (about 0.5 GB/s per core on the 2-core CI machine); over
    1 GB it says so, naming `what` they are."""
    total = sum(path.stat().st_size for path in files.values())
    if total > LARGE_INPUT_BYTES:
        log(f"hashing {what} whole ({total / 2**30:.1f} GB), so a resume can tell any change")
    digests = {}
    for name, path in files.items():
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(DIGEST_CHUNK):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    return digests


def snapshot_file_digests(specs: list[SnapshotSpec], log: Callable[[str], None] = print) -> dict[str, str]:
    """`whole_file_digests` of every local snapshot directory's config.json and weight files, keyed
    `<snapshot>/<file>`. A hub snapshot is left out: its fingerprint is its commit, exact already."""
    files: dict[str, Path] = {}
    for spec in specs:
        directory = Path(spec.path).expanduser()
        if spec.path == SYNTHETIC_PATH or not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name == "config.json"):
                files[f"{spec.snapshot_name}/{path.name}"] = path
    return whole_file_digests(files, "the snapshots' weight files", log)


def check_same_contents(saved: dict[str, str], now: dict[str, str], what: str, where: str) -> None:
    """Refuse, naming the first file, inputs whose files are not byte for byte those `where` was made from
    (`what` they are: "activations in the folder X", "snapshots")."""
    for name in sorted(saved.keys() | now.keys()):
        if saved.get(name) != now.get(name):
            change = "is new" if name not in saved else "is gone" if name not in now else "changed"
            raise ConfigError(f"{where} was made from other {what}: {name} {change} since (compared whole, byte "
                              "for byte); resume on the same files or start a new run")


def _hub_fingerprint(spec: SnapshotSpec) -> str:
    from transformers.utils import cached_file

    where = f"snapshot {spec.name!r} ({spec.path!r}" + (f" at revision {spec.revision!r})" if spec.revision else ")")
    try:
        resolved = cached_file(spec.path, "config.json", revision=spec.revision)
    except (OSError, ValueError) as error:  # ValueError: huggingface_hub's invalid-repo-id error
        raise ConfigError(f"cannot fingerprint {where}: its config.json does not resolve ({error})") from error
    if resolved is None:
        raise ConfigError(f"cannot fingerprint {where}: it has no config.json")
    path = Path(resolved)
    if path.parent.parent.name != "snapshots":  # not the HF cache layout: fingerprint what is there
        return directory_fingerprint(path.parent, spec)
    digest = hashlib.sha256(FINGERPRINT_RECIPE)
    digest.update(b"hub-commit\n" + path.parent.name.encode() + b"\n")
    digest.update(canonical_config(_read_config(path, spec)).encode() + b"\n")
    return digest.hexdigest()


def snapshot_fingerprint(spec: SnapshotSpec) -> str:
    """What the snapshot is (hex sha256): its config and sampled weight bytes (a local directory), its commit and
    config (a hub id), its revision digest (planted); a ConfigError naming the snapshot when nothing resolves."""
    if spec.path == SYNTHETIC_PATH:
        if not spec.revision:
            raise ConfigError(f"planted snapshot {spec.name!r} has no revision digest to fingerprint")
        return spec.revision
    local = Path(spec.path).expanduser()
    if local.is_dir():
        return directory_fingerprint(local, spec)
    return _hub_fingerprint(spec)


def _short(fingerprint: object) -> str:
    text = str(fingerprint)
    return text if len(text) <= SHOWN_DIGITS else f"{text[:SHOWN_DIGITS]}…"


def check_same_snapshots(saved: list[dict[str, Any]], specs: list[SnapshotSpec], where: str,
                         folder: str | None = None) -> None:
    """Raise a ConfigError naming the first snapshot that is not the one `where` (e.g. "activation cache X",
    "training state Y") was made from: another count or name, or another fingerprint (its weights or config
    changed). `saved` is the `asdict(spec)` list recorded there; an entry without a fingerprint (written before
    fingerprints existed) cannot be shown to be this snapshot, so it is refused too. A spec without a fingerprint
    (not from `describe_sources`) is fingerprinted here. `folder`: the activation folder every source is read from
    (`SourceInfo.folder`), whose fingerprint its sources share: a change is then named as the folder's."""
    names = [spec.name for spec in specs]
    saved_names = [entry.get("name") for entry in saved]
    if len(saved) != len(specs):
        raise ConfigError(f"{where} was made from {len(saved)} snapshots ({saved_names}), the sources name "
                          f"{len(specs)} ({names})")
    for i, (entry, spec) in enumerate(zip(saved, specs, strict=True)):
        if entry.get("name") != spec.name:
            raise ConfigError(f"{where}: snapshot {i} is {entry.get('name')!r} there but {spec.name!r} in the "
                              f"sources (snapshots there: {saved_names}, now: {names})")
        old = entry.get("fingerprint")
        if not old:
            raise ConfigError(f"{where} records snapshot {spec.name!r} without a fingerprint (it was written by an "
                              "older crosscoder), so it cannot be shown to hold this snapshot's activations; "
                              "rebuild it (or start a new run) with this version")
        now = spec.fingerprint or snapshot_fingerprint(spec)
        if old != now and folder is not None:
            raise ConfigError(f"{where} was made from other activations in the folder {folder} (fingerprint "
                              f"{_short(old)} there, {_short(now)} now: a shard or sources.json changed)")
        if old != now:
            raise ConfigError(f"{where} was made from a different snapshot {spec.name!r} (fingerprint {_short(old)} "
                              f"there, {_short(now)} now: its weights or config changed)")
