"""The source kinds, by name: how each is described before anything loads and how many sources it has.

`hf` and `toy` run snapshots of a model, `planted` draws activations from a planted dictionary, `files` reads
activation shards the user already has. The description reads configs, tokenizers and headers only (cheap); the
shards of a `files` source are read here, the models of the others in crosscoder.sources.models.
"""

from __future__ import annotations

from collections.abc import Callable

from crosscoder.config import RunConfig, SourcesConfig
from crosscoder.data.files import describe_file_sources
from crosscoder.sources.manifest import file_source_names
from crosscoder.sources.models import describe_model_sources
from crosscoder.sources.spec import SourceInfo

Describe = Callable[[SourcesConfig, Callable[[str], None]], SourceInfo]
DESCRIBE: dict[str, Describe] = {
    "hf": describe_model_sources,
    "toy": describe_model_sources,
    "planted": describe_model_sources,
    "files": lambda cfg, log: describe_file_sources(cfg),
}
"""One entry per `sources.kind` (config.sources.SourceKind)."""


def describe_sources(cfg: SourcesConfig, log: Callable[[str], None] = print) -> SourceInfo:
    """Resolve the sources and check they are compatible (crosscoder.sources.models.describe_model_sources for
    snapshots, crosscoder.data.files for an activation folder); ConfigError names the first problem."""
    return DESCRIBE[cfg.kind](cfg, log)


def count_sources(cfg: RunConfig) -> int:
    """How many sources the crosscoder has, before any model loads: the snapshots times the hooks, or the
    entries of an activation folder's sources.json."""
    if cfg.sources.kind == "files":
        return len(file_source_names(cfg.sources))
    return cfg.n_sources()
