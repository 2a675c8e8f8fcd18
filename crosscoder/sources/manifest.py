"""`sources.json`: what the sources of an activation folder are (`sources.kind=files`), read before any shard.

The folder format itself is documented in crosscoder.data.files, which streams the shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from crosscoder.config import SourcesConfig
from crosscoder.errors import ConfigError

SOURCES_FILE = "sources.json"

RESERVED_NAMES = ("activations", "token_ids")  # tensor names with a meaning in a safetensors shard


FORMAT_HINT = ("see the folder format in crosscoder/data/files.py (docs/sources-and-data.md, 'Activations you already "
               "have')")


@dataclass(frozen=True)
class FileSource:
    name: str
    step: int | None = None
    layer: int | None = None


def files_root(cfg: SourcesConfig | str | Path) -> Path:
    return Path(cfg.files.dir if isinstance(cfg, SourcesConfig) else cfg).expanduser()


def read_manifest(root: Path) -> tuple[list[FileSource], str]:
    path = root / SOURCES_FILE
    example = '{"sources": [{"name": "L0", "layer": 0}, ...]}'
    if not path.is_file():
        raise ConfigError(f"{path} is missing: write {example} naming each source, in column order ({FORMAT_HINT})")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); write {example}") from error
    entries = raw.get("sources") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path} must be an object with a non-empty list `sources`: {example}")
    if not isinstance(raw.get("hook", ""), str):
        raise ConfigError(f"{path}: `hook` must be text describing what was hooked, not {raw['hook']!r}")
    sources: list[FileSource] = []
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: sources[{i}] = {entry!r} needs a non-empty string `name`")
        if name in RESERVED_NAMES or "/" in name or "\\" in name:
            raise ConfigError(f"{path}: source name {name!r} is reserved or holds a path separator; rename it")
        if name in [s.name for s in sources]:
            raise ConfigError(f"{path}: source name {name!r} appears twice; every source needs a unique name")
        for key in ("step", "layer"):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{path}: source {name!r} has {key}={value!r}; it must be an integer (or left out)")
        sources.append(FileSource(name, entry.get("step"), entry.get("layer")))
    _check_order(sources, path)
    return sources, raw.get("hook") or "files"


def _check_order(sources: list[FileSource], path: Path) -> None:
    """The analysis reads the sources' order as their axis (time for steps, depth for layers), so sources whose
    steps (or layers) are all given must be listed in that order, snapshot by snapshot as HF sources are (layers
    restart at each step; two hooks of one step or layer may sit side by side)."""
    for key, axis in (("step", "training order (the analysis reads it as time)"),
                      ("layer", "depth order (the analysis reads it as depth)")):
        values = [getattr(source, key) for source in sources]
        if None in values:
            continue
        for before, after in zip(sources, sources[1:], strict=False):
            if key == "layer" and before.step != after.step:
                continue
            if getattr(after, key) < getattr(before, key):
                raise ConfigError(
                    f"{path}: source {after.name!r} ({key} {getattr(after, key)}) is listed after {before.name!r} "
                    f"({key} {getattr(before, key)}): list the sources in {axis}; the {key}s as listed are {values}")


def file_source_names(cfg: SourcesConfig) -> list[str]:
    """The sources' names, from sources.json alone (what the config's checks count before anything is read)."""
    return [source.name for source in read_manifest(files_root(cfg))[0]]
