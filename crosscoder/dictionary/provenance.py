"""Where an exported dictionary came from: its training run's configuration rebuilt from `config.json`, and its
sources described again and checked to be the ones it was trained on (names, width, weight fingerprints).

What the spliced-in evaluation and every replay of a dictionary's inputs start from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from crosscoder.config import MODEL_KINDS, RunConfig
from crosscoder.data.kinds import describe_sources
from crosscoder.dictionary.io import DictionaryMeta
from crosscoder.errors import ConfigError
from crosscoder.sources.fingerprint import check_same_snapshots
from crosscoder.sources.spec import SYNTHETIC_PATH, SourceInfo


def unsupported_reason(meta: DictionaryMeta) -> str | None:
    """Why this dictionary's snapshots cannot be re-run on text (None when they can)."""
    try:
        run_config_of(meta)
    except ConfigError as error:
        return str(error)
    return None


def run_config_of(meta: DictionaryMeta, need_text: bool = True) -> RunConfig:
    """The training run's RunConfig, rebuilt from `meta.training`; ConfigError when it holds no run configuration,
    or (with `need_text`) when its sources cannot give tokens."""
    sources = meta.training.get("sources")
    if not isinstance(sources, dict):
        raise ConfigError("the dictionary's config.json holds no run configuration (training.sources): snapshots "
                          "unknown")
    try:  # output_dir defaults to "" so a config saved without it is not MISSING
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig(output_dir="")), meta.training)
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ConfigError(f"the dictionary's run configuration does not fit RunConfig: {error}") from error
    if need_text:
        if cfg.sources.kind not in MODEL_KINDS:
            raise ConfigError(f"sources.kind={cfg.sources.kind!r}: top contexts need snapshots that read text "
                              f"({' or '.join(MODEL_KINDS)}); {cfg.sources.kind} sources have no tokenizer or token "
                              "stream")
        try:
            cfg.sources.validate()
        except ConfigError as error:
            raise ConfigError(f"the dictionary's run configuration names no snapshots to re-run: {error}") from error
    return cfg


def dictionary_sources(meta: DictionaryMeta, log: Callable[[str], None] = print, need_text: bool = True
                       ) -> tuple[RunConfig, SourceInfo]:
    """The run configuration of an exported dictionary and its snapshots described again, refused (ConfigError)
    unless they are the snapshots it was trained on: the same names and width, and the same weights where the
    export recorded their fingerprints."""
    cfg = run_config_of(meta, need_text)
    info = describe_sources(cfg.sources, log=log)
    # Generated snapshots are known by position, not by name: their count and width must fit.
    generated = all(spec.path == SYNTHETIC_PATH for spec in info.specs)
    if not generated:
        info = _own_snapshots(info, meta.source_names)
    names = [spec.name for spec in info.specs]
    same_names = len(names) == len(meta.source_names) if generated else names == meta.source_names
    if not same_names or info.d_model != meta.d_model:
        raise ConfigError(f"the run configuration gives snapshots {names} (d={info.d_model}), but the dictionary "
                          f"was trained on {meta.source_names} (d={meta.d_model})")
    if all(source.get("fingerprint") for source in meta.sources):  # the same names may hold other weights now
        check_same_snapshots(meta.sources, info.specs, "the dictionary", folder=info.folder)
    return cfg, info


def _own_snapshots(info: SourceInfo, trained_on: list[str]) -> SourceInfo:
    """The snapshots of `info` the dictionary was trained on. A stack member (an independent dictionary, an
    SAE-Track link) records its whole run's configuration but covers one of its snapshots: that one alone."""
    names = [spec.name for spec in info.specs]
    if len(trained_on) >= len(names) or not set(trained_on) <= set(names):
        return info  # a whole run's dictionary, or other snapshots (refused by the caller)
    return dataclasses.replace(info, specs=[spec for spec in info.specs if spec.name in trained_on])
