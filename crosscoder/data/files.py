"""Activations the user already has (`sources.kind=files`): a folder of shards computed elsewhere (nnsight,
TransformerLens, a peer's cache), streamed like the activation cache (crosscoder.data.cache) with no model run.

The folder (`sources.files.dir`)::

    sources.json                 {"sources": [{"name": "L0", "layer": 0}, {"name": "L4", "layer": 4}], "hook": "..."}
    then EITHER  <shard>.safetensors   `activations` [n, S, d], or one tensor per source name, each [n, d];
                                       optional `token_ids` [n]
    OR           <shard>.npy           [n, S, d]; optional <shard>.token_ids.npy [n]
    OR           <source name>/<shard>.npy   [n, d], the same shard names in every source's folder;
                                       optional <shard>.token_ids.npy [n] beside the folders

Each source has a unique `name`, optionally an int `step` (training step) and/or `layer`; `hook` is free text.
Source s is column s of `activations`. Shards are read in sorted file-name order, all safetensors or all npy.
Dtypes: float16, bfloat16 (safetensors only), float32, float64 (read as float32); token ids: any integer type.
npy files are memory-mapped with allow_pickle=False: never unpickled.

Start-up checks read headers only, plus the first shard's values for NaN/inf; each shard is checked for NaN/inf
again as it is read. Each problem is a ConfigError naming the file (and source). Without token_ids a row's token
id is its global row number (int64): the stream's token check between ranks still works, but no text is behind
it (analyses that need text refuse kind=files).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from crosscoder.config import SourcesConfig
from crosscoder.data.activations import ActivationBlock
from crosscoder.data.cache_reader import nonfinite_columns, rank_rows, row_runs
from crosscoder.errors import ConfigError
from crosscoder.sources.fingerprint import whole_file_digests
from crosscoder.sources.manifest import FORMAT_HINT, RESERVED_NAMES, SOURCES_FILE, FileSource, files_root, read_manifest
from crosscoder.sources.spec import SnapshotSpec, SourceInfo

TOKENS_SUFFIX = ".token_ids.npy"
ST_FLOATS = ("float16", "bfloat16", "float32", "float64")
NPY_FLOATS = ("float16", "float32", "float64")  # npy has no bfloat16
FINGERPRINT_RECIPE = b"crosscoder-files-fingerprint-v1\n"
SAMPLE_HEAD, SAMPLE_CHUNK, SAMPLE_CHUNKS = 64 << 10, 4 << 10, 8
"""Bytes of each file that enter the fingerprint: the head (headers, first rows), evenly spaced chunks, the tail."""


Part = tuple[Path, str | None, list[int], str, str]
"""(file, tensor name or None for an npy file, shape, dtype, where: how an error names it)."""


@dataclass
class Shard:
    """One shard, from its headers: where each source's values and the token ids are (their shapes and dtypes
    enter the fingerprint)."""

    label: str
    """The shard's file name (per-source npy: the file name shared by the source folders)."""
    n: int
    d: int
    stacked: bool
    """True: one [n, S, d] array (`arrays[0]`); False: one [n, d] array per source, in source order."""
    arrays: list[Part]
    token_ids: Part | None

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(part[0] for part in self.arrays + ([self.token_ids] if self.token_ids else [])))


@dataclass
class FileFolder:
    root: Path
    sources: list[FileSource]
    hook: str
    shards: list[Shard]


def _st_dtype(raw: str) -> str:
    """safetensors' dtype code (F32, BF16, I64, ...) as torch/numpy spell it (float32, bfloat16, int64, ...)."""
    if raw[:1] in ("F", "I", "U") and raw[1:].isdigit():
        return {"F": "float", "I": "int", "U": "uint"}[raw[0]] + raw[1:]
    return "bfloat16" if raw == "BF16" else raw.lower()


def _st_header(path: Path) -> dict[str, tuple[list[int], str]]:
    try:
        with safe_open(str(path), "pt") as f:
            return {key: (list(f.get_slice(key).get_shape()), _st_dtype(f.get_slice(key).get_dtype()))
                    for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as error:  # SafetensorError (corrupt or truncated header), OSError
        raise ConfigError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); "
                          "re-export it") from error


def _npy_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)  # a view of the file: nothing is read yet
    except Exception as error:  # ValueError (pickled objects, bad header), OSError, EOFError
        raise ConfigError(f"{path} is not a readable .npy array ({type(error).__name__}: {error}); save it with "
                          "numpy.save from a numeric array") from error


def _npy_header(path: Path) -> tuple[list[int], str]:
    return list((array := _npy_array(path)).shape), str(array.dtype)


def _make_shard(label: str, parts: list[Part], stacked: bool, tokens: Part | None, n_sources: int,
                floats: tuple[str, ...]) -> Shard:
    """Check one shard's headers: dtypes, ranks, S, one n and one d for all sources, the token ids."""
    for _, _, shape, dtype, where in parts:
        if dtype not in floats:
            raise ConfigError(f"{where} has dtype {dtype}; activations must be one of {', '.join(floats)}: "
                              "convert them (e.g. .float()) and re-save")
        if len(shape) != (3 if stacked else 2):
            raise ConfigError(f"{where} has shape {shape}, expected {'[n, S, d]' if stacked else '[n, d]'}; "
                              f"{FORMAT_HINT}")
        if stacked and shape[1] != n_sources:
            raise ConfigError(f"{where} holds S={shape[1]} sources but {SOURCES_FILE} lists {n_sources}: make them "
                              f"agree (column s is source s of {SOURCES_FILE})")
    n, d = parts[0][2][0], parts[0][2][-1]
    for _, _, shape, _, where in parts[1:]:
        if shape[0] != n:
            raise ConfigError(f"{where} has {shape[0]} rows but {parts[0][4]} has {n}: every source of a shard "
                              "needs the same rows (row j is the same token)")
        if shape[-1] != d:
            raise ConfigError(f"{where} has d={shape[-1]} but {parts[0][4]} has d={d}: all sources need one width")
    if n == 0:
        raise ConfigError(f"{parts[0][4]} has zero rows: remove the empty shard")
    if tokens is not None:
        _, _, shape, dtype, where = tokens
        if shape != [n] or not dtype.startswith(("int", "uint")):
            raise ConfigError(f"{where} is {dtype} {shape}; token ids must be integers of shape [{n}] (one per row)")
    return Shard(label, n, d, stacked, parts, tokens)


def _safetensors_shard(path: Path, names: list[str]) -> Shard:
    header = _st_header(path)
    part = {key: (path, key, *header[key], f"{path} (tensor {key!r})") for key in RESERVED_NAMES if key in header}
    tokens = part.get("token_ids")
    if "activations" in part:
        return _make_shard(path.name, [part["activations"]], True, tokens, len(names), ST_FLOATS)
    missing = [name for name in names if name not in header]
    if missing:
        raise ConfigError(f"{path} has no tensor 'activations' and none for source(s) {', '.join(map(repr, missing))}"
                          f" (it holds {sorted(header)}): save `activations` [n, S, d] or one [n, d] tensor per source")
    parts = [(path, name, *header[name], f"{path} (source {name!r})") for name in names]
    return _make_shard(path.name, parts, False, tokens, len(names), ST_FLOATS)


def _npy_tokens(path: Path) -> Part | None:
    return (path, None, *_npy_header(path), str(path)) if path.is_file() else None


def _per_source_npy_shards(root: Path, names: list[str]) -> list[Shard]:
    """The `<source>/<shard>.npy` layout: every source folder holds the same shard files."""
    for name in names:
        if not (root / name).is_dir():
            raise ConfigError(f"{root / name} is missing: the per-source npy layout needs one folder per source of "
                              f"{SOURCES_FILE}, each holding the same <shard>.npy files")
    labels = sorted(p.name for p in (root / names[0]).glob("*.npy"))
    for name in names:
        have = sorted(p.name for p in (root / name).glob("*.npy"))
        if have != labels:
            odd = sorted(set(labels) ^ set(have))[0]
            raise ConfigError(f"{root / name / odd if odd in labels else root / names[0] / odd} is missing: every "
                              "source folder must hold the same <shard>.npy files")
    shards = []
    for label in labels:
        parts = [(root / name / label, None, *_npy_header(root / name / label), f"{root / name / label} (source "
                  f"{name!r})") for name in names]
        tokens = _npy_tokens(root / (label.removesuffix(".npy") + TOKENS_SUFFIX))
        shards.append(_make_shard(label, parts, False, tokens, len(names), NPY_FLOATS))
    return shards


def scan_folder(root: Path, check_first: bool = True) -> FileFolder:
    """Everything about the folder its headers say, checked (a ConfigError on the first problem); `check_first`
    also reads the first shard, one source at a time, for NaN/inf."""
    if not root.is_dir():
        raise ConfigError(f"sources.files.dir={str(root)!r} is not an existing folder; point it at the folder "
                          f"holding {SOURCES_FILE} and the shards")
    sources, hook = read_manifest(root)
    names = [source.name for source in sources]
    st_files = sorted(root.glob("*.safetensors"))
    npy_files = sorted(p for p in root.glob("*.npy") if not p.name.endswith(TOKENS_SUFFIX))
    folders = [root / name for name in names if (root / name).is_dir()]
    any_npy = npy_files or any(root.glob(f"*{TOKENS_SUFFIX}")) or any(any(f.glob("*.npy")) for f in folders)
    if st_files and any_npy:
        raise ConfigError(f"{root} holds both .safetensors and .npy files: keep one format (e.g. move "
                          f"{st_files[0].name} or the .npy files elsewhere)")
    if npy_files and folders:
        raise ConfigError(f"{root} holds both <shard>.npy files ({npy_files[0].name}) and per-source folders "
                          f"({folders[0].name}/): keep one layout")
    if st_files:
        shards = [_safetensors_shard(path, names) for path in st_files]
    elif npy_files:
        shards = [_make_shard(path.name, [(path, None, *_npy_header(path), str(path))], True,
                              _npy_tokens(path.with_name(path.stem + TOKENS_SUFFIX)), len(names), NPY_FLOATS)
                  for path in npy_files]
    elif folders:
        shards = _per_source_npy_shards(root, names)
    else:
        raise ConfigError(f"{root} holds no shards: add *.safetensors or *.npy files beside {SOURCES_FILE} "
                          f"({FORMAT_HINT})")
    for shard in shards[1:]:
        if shard.d != shards[0].d:
            raise ConfigError(f"{shard.files[0]} has d={shard.d} but {shards[0].files[0]} has d={shards[0].d}: every "
                              "shard needs the same width")
    folder = FileFolder(root, sources, hook, shards)
    if check_first:  # one source at a time: memory bounded by one column of one shard
        first = shards[0]
        for column in range(len(sources)):
            _check_finite(folder, 0, _read_rows(first, [(0, first.n)], range(column, column + 1)), column)
    return folder


def _take(path: Path, key: str | None, runs: list[tuple[int, int]], columns: slice | None) -> torch.Tensor:
    """Rows `runs` (and `columns`) of one array, reading only those bytes."""
    if key is None:
        array = _npy_array(path)
        return torch.cat([torch.from_numpy(np.array(array[a:b] if columns is None else array[a:b, columns]))
                          for a, b in runs])
    with safe_open(str(path), "pt") as f:
        stored = f.get_slice(key)
        return torch.cat([stored[a:b] if columns is None else stored[a:b, columns] for a, b in runs])


def _read_rows(shard: Shard, runs: list[tuple[int, int]], share: range) -> torch.Tensor:
    """[rows, len(share), d] float32 of the sources in `share`."""
    if shard.stacked:
        return _take(*shard.arrays[0][:2], runs, slice(share.start, share.stop)).float()
    return torch.stack([_take(*part[:2], runs, None).float() for part in shard.arrays[share.start:share.stop]], dim=1)


def _check_finite(folder: FileFolder, index: int, activations: torch.Tensor, offset: int) -> None:
    """Refuse NaN/inf, naming the file(s) and source(s); column c of `activations` is source offset + c."""
    bad = [offset + c for c in nonfinite_columns(activations)]
    if not bad:
        return
    shard = folder.shards[index]
    files = {str(shard.arrays[0 if shard.stacked else c][0]) for c in bad}
    raise ConfigError(f"{', '.join(sorted(files))} hold(s) NaN/inf activations of source(s) "
                      f"{', '.join(repr(folder.sources[c].name) for c in bad)}: recompute them, or clean them "
                      "(e.g. torch.nan_to_num) and re-save")


def fingerprint_regions(size: int) -> list[tuple[int, int]]:
    if size <= SAMPLE_HEAD + (SAMPLE_CHUNKS + 1) * SAMPLE_CHUNK:
        return [(0, size)]
    span = size - SAMPLE_CHUNK - SAMPLE_HEAD
    middle = [(SAMPLE_HEAD + span * k // (SAMPLE_CHUNKS + 1), SAMPLE_CHUNK) for k in range(1, SAMPLE_CHUNKS + 1)]
    return [(0, SAMPLE_HEAD), *middle, (size - SAMPLE_CHUNK, SAMPLE_CHUNK)]


def folder_fingerprint(folder: FileFolder) -> str:
    """sha256 of sources.json, every shard's file names, sizes and headers, and sampled bytes of every file: cheap,
    yet other files give another fingerprint, so a run resumed on changed data is refused (check_same_snapshots)."""
    digest = hashlib.sha256(FINGERPRINT_RECIPE)
    digest.update((folder.root / SOURCES_FILE).read_bytes() + b"\n")
    for shard in folder.shards:
        # Paths relative to the folder: a moved folder keeps its fingerprint, as a moved snapshot does.
        header = [[str(p[0].relative_to(folder.root)), *p[1:4]] for p in shard.arrays + [shard.token_ids]
                  if p is not None]
        digest.update(json.dumps([shard.label, header]).encode() + b"\n")
        for path in shard.files:
            size = path.stat().st_size
            digest.update(json.dumps([str(path.relative_to(folder.root)), size]).encode() + b"\n")
            with path.open("rb") as f:
                for offset, length in fingerprint_regions(size):
                    f.seek(offset)
                    digest.update(f.read(length))
    return digest.hexdigest()


def content_digests(root: Path, log: Callable[[str], None] = print) -> dict[str, str]:
    """`whole_file_digests` of an activation folder (sources.json and every shard file), by path relative to the
    folder."""
    folder = scan_folder(root, check_first=False)
    paths = [folder.root / SOURCES_FILE, *(path for shard in folder.shards for path in shard.files)]
    return whole_file_digests({str(path.relative_to(folder.root)): path for path in paths},
                              f"the activation folder {folder.root}", log)


def describe_file_sources(cfg: SourcesConfig) -> SourceInfo:
    """The sources of `sources.files.dir`, checked from headers (and the first shard's values), fingerprinted."""
    folder = scan_folder(files_root(cfg))
    fingerprint = folder_fingerprint(folder)
    specs = [SnapshotSpec(name=s.name, path=str(folder.root), revision=None, step=s.step, fingerprint=fingerprint,
                          layer=s.layer) for s in folder.sources]
    layers = [s.layer for s in folder.sources]
    if None not in layers and len(set(layers)) == len(layers):
        axis = "layer"
    else:
        axis = "step" if all(s.step is not None for s in folder.sources) else "source"
    return SourceInfo(specs=specs, tokenizer=None, d_model=folder.shards[0].d, hook=folder.hook, axis=axis,
                      folder=str(folder.root))


class FileActivations:
    """Streams the folder's shards as ActivationBlocks like CacheReader: block index = shard index, each rank
    reading only its own rows (`crosscoder.data.cache.rank_rows`) and its `sources` columns."""

    def __init__(self, cfg: SourcesConfig | str | Path, rank: int = 0, world_size: int = 1, batch_rows: int = 0,
                 sources: range | None = None) -> None:
        """`batch_rows` > 0 reads in global batch order, 0 one contiguous range per shard (see CacheReader);
        `sources`: read only these sources' columns (a snapshot rank's share; all when None)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.folder = scan_folder(files_root(cfg), check_first=False)  # the stream checks every shard as it reads it
        n_sources = len(self.folder.sources)
        self.sources = sources
        self._share = range(n_sources) if sources is None else sources
        if self._share.step != 1 or not 0 <= self._share.start < self._share.stop <= n_sources:
            raise ValueError(f"sources={sources} is not a contiguous share of the {n_sources} sources")
        self.rank, self.world_size, self.batch_rows = rank, world_size, batch_rows
        self.n_shards = len(self.folder.shards)
        counts = [shard.n for shard in self.folder.shards]
        self._offsets = [sum(counts[:index]) for index in range(len(counts))]  # first global row of each shard
        self.tokens_per_rank = self.tokens_from(0)

    def tokens_from(self, start: int) -> int:
        """This rank's tokens in shards start, start + 1, ... (what a stream resumed at `start` can serve)."""
        return sum(self._rows(index).shape[0] for index in range(start, self.n_shards))

    def _rows(self, index: int) -> torch.Tensor:
        return rank_rows(self.folder.shards[index].n, self._offsets[index], self.rank, self.world_size,
                         self.batch_rows)

    def iter_blocks(self, start: int = 0) -> Iterator[ActivationBlock]:
        """Shards start, start + 1, ... once each, as float32, each checked for NaN/inf before it is yielded."""
        for index in range(start, self.n_shards):
            block = self._read_shard(index)
            if block is not None:
                yield block

    def _read_shard(self, index: int) -> ActivationBlock | None:
        shard, rows = self.folder.shards[index], self._rows(index)
        if rows.numel() == 0:
            return None
        runs = row_runs(rows)
        try:
            activations = _read_rows(shard, runs, self._share)
            if shard.token_ids is None:  # no ids given: the global row number stands in (see the module docstring)
                token_ids = self._offsets[index] + rows.to(torch.int64)
            else:
                token_ids = _take(*shard.token_ids[:2], [(0, shard.n)], None).to(torch.int64)[rows]
        except ConfigError:
            raise
        except Exception as error:  # a file changed or vanished since start-up, a truncated file
            raise ConfigError(f"shard {', '.join(map(str, shard.files))} is unreadable ({type(error).__name__}: "
                              f"{error}); restore the file or restart on the current folder") from error
        _check_finite(self.folder, index, activations, self._share.start)
        return ActivationBlock(index, activations, token_ids)
