"""Start-up checks of a run's inputs against the machine and the disk, before any model loads: the folders and
files it names exist and hold what they must, the cores it pins exist, and the rules that need the number of
sources of an activation folder. Value checks are the config's own (`RunConfig.validate`)."""

from __future__ import annotations

import codecs
import os
from importlib.util import find_spec

from crosscoder.config import DataConfig, RunConfig
from crosscoder.constants import CACHE_MANIFEST_FILE
from crosscoder.data.kinds import count_sources, source_kind
from crosscoder.errors import ConfigError

TEXT_PROBE_BYTES = 64 * 1024
"""At most this much of each data.paths file is read at start-up to tell a blank file from one with text."""


def check_inputs(cfg: RunConfig) -> RunConfig:
    """`cfg.validate()`, then every check against the machine and the disk; ConfigError names the first problem.
    Returns `cfg` for chaining."""
    cfg.validate()
    kind = source_kind(cfg.sources.kind)
    kind.check(cfg.sources)
    _check_data(cfg.data)
    kind.preflight(cfg.sources, cfg.data)  # the snapshots' own configs, before anything is built or compiled
    if cfg.n_sources() is None:  # the rules that need the count, now that the sources can tell it
        cfg.check_source_count(count_sources(cfg.sources))
    return cfg


def device_problem(device: str) -> str | None:
    """Why this machine cannot run on `device` (auto, cpu, cuda, cuda:N, mps), or None: checked at start-up, not
    when the first tensor moves there."""
    import torch

    if device in ("auto", "cpu"):
        return None
    if device == "mps":
        return None if torch.backends.mps.is_available() else "this machine has no MPS device"
    if device == "cuda" or device.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if count == 0:
            return "this machine has no CUDA device"
        if index >= count:
            return f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
        return None
    return "not auto, cpu, cuda, cuda:N or mps"


def _check_data(data: DataConfig) -> None:
    if (problem := device_problem(data.workers.device)) is not None:
        raise ConfigError(f"data.workers.device={data.workers.device!r}: {problem}")
    n_cpus = os.cpu_count() or 1
    for cpu in data.workers.cpus:
        if not 0 <= cpu < n_cpus:
            raise ConfigError(f"data.workers.cpus contains {cpu}; this machine has cores 0..{n_cpus - 1}")
    if data.kind == "text_files" and not complete_cache(data.cache.dir):  # a cache never reads the corpus
        _check_text_files(data.paths)
    if data.kind == "hf_dataset" and not complete_cache(data.cache.dir) and find_spec("datasets") is None:
        raise ConfigError(f"data.kind=hf_dataset (data.dataset={data.dataset!r}) needs the `datasets` package: "
                          "pip install -e '.[hub]'")


def complete_cache(cache_dir: str | None) -> bool:
    """Whether `cache_dir` holds a complete activation cache (its manifest is written last)."""
    return bool(cache_dir) and os.path.isfile(os.path.join(os.path.expanduser(cache_dir), CACHE_MANIFEST_FILE))


def _check_text_files(paths: list[str]) -> None:
    """Every data.paths entry is a readable, non-blank UTF-8 file: checked at start-up, in milliseconds, rather
    than in an activation worker once the snapshots have loaded. A stat and the first few KB of each file."""

    if not paths:
        raise ConfigError("data.paths must list at least one file for data.kind=text_files")
    for index, raw in enumerate(paths):
        where = f"data.paths[{index}]={raw!r}"
        path = os.path.expanduser(raw)
        if not os.path.exists(path):
            raise ConfigError(f"{where} does not exist")
        if os.path.isdir(path):
            raise ConfigError(f"{where} is a directory, not a text file; list the files in it")
        if not os.path.isfile(path):
            raise ConfigError(f"{where} is not a regular file")
        decoder = codecs.getincrementaldecoder("utf-8")()  # a character may straddle two reads
        try:
            with open(path, "rb") as file:
                read = 0
                while read < TEXT_PROBE_BYTES:  # a file blank beyond that is left to the stream's own check
                    chunk = file.read(4096)
                    read += len(chunk)
                    if decoder.decode(chunk, final=not chunk).strip():
                        break
                    if not chunk:
                        raise ConfigError(f"{where} is empty" + (" (whitespace only)" if read else ""))
        except OSError as error:
            raise ConfigError(f"{where} cannot be read ({error.strerror or error})") from error
        except UnicodeDecodeError as error:
            raise ConfigError(f"{where} is not UTF-8 text ({error.reason}); is it a binary or compressed file?") \
                from error


