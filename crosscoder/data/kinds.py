"""The source kinds, by name: one class per `sources.kind` saying what its sources are called, how they are
checked and described before anything loads, how a rank's activations are opened, and how a dictionary's
activations are re-read for analysis.

`hf` and `toy` run snapshots of a model on text, `planted` draws activations from a planted dictionary, `files`
reads activation shards the user already has. A new kind is one class here and one line in `SOURCE_KIND_REGISTRY`
(plus its value rules in crosscoder.config.sources.KIND_RULES, the half the config layer can see: a test keeps
the two equal to `SourceKind`). Nothing outside this module branches on the kind's name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from crosscoder.config import DataConfig, SourcesConfig
from crosscoder.data.activations import paired_activations, valid_token_mask
from crosscoder.data.cache_reader import CacheReader, check_cache_matches
from crosscoder.data.files import FileActivations, content_digests, describe_file_sources
from crosscoder.data.planted import held_out_draws, planted_specs
from crosscoder.data.source_sets import ModelSources, PlantedSources, ShardedSources, SourceSet
from crosscoder.data.tokens import iter_token_batches, special_token_ids
from crosscoder.errors import ConfigError
from crosscoder.sources.fingerprint import snapshot_file_digests
from crosscoder.sources.manifest import file_source_names, files_root
from crosscoder.sources.models import (
    LoadedSources,
    check_model_configs,
    check_names_and_order,
    configured_hooks,
    describe_model_sources,
    expand_hooks,
    hf_snapshot_names,
    load_runners,
)
from crosscoder.sources.models import resolve_snapshots as resolve_hf_snapshots
from crosscoder.sources.spec import SnapshotSpec, SourceInfo

if TYPE_CHECKING:
    from crosscoder.toy import ToyLMConfig

Log = Callable[[str], None]


class SourceKind:
    """One `sources.kind`. `open` and `activations` take the two config groups a stream reads (`sources`, `data`)
    and the described sources; `share` is the range of sources this rank reads."""

    name: ClassVar[str]
    has_ground_truth: ClassVar[bool] = False
    """Its activations come from a known (planted) dictionary that a trained one can be scored against."""

    def names(self, sources: SourcesConfig) -> list[str]:
        """The sources' names as the config gives them, before anything is built or read (`describe` names them
        the same way)."""
        raise NotImplementedError

    def count(self, sources: SourcesConfig) -> int:
        """How many sources the crosscoder has, before any model loads."""
        return len(self.names(sources))

    def check(self, sources: SourcesConfig) -> None:
        """Start-up checks against the disk, in milliseconds (the config's value rules ran before)."""

    def preflight(self, sources: SourcesConfig, data: DataConfig) -> None:
        """The checks the sources' own configs allow, before anything is built, loaded or compiled (DeepSpeed's
        op, the accelerator, the embedded model): cheap reads only."""

    def describe(self, sources: SourcesConfig, log: Log) -> SourceInfo:
        """Resolve the sources and check they are compatible, reading configs and headers only (cheap)."""
        raise NotImplementedError

    def finite_origin(self, sources: SourcesConfig) -> tuple[str, str]:
        """(what holds this kind's rows, how to get more), for a run its rows cannot feed; only a kind whose
        `open` gives a finite set is asked."""
        return f"sources.kind={self.name}", "give it more rows"

    def content_digests(self, sources: SourcesConfig, info: SourceInfo, log: Log) -> dict[str, str] | None:
        """Every input file's whole-content digest, for a kind whose `describe` fingerprint only samples its data
        and whose data a user may rewrite between a stop and a resume; None where the fingerprint says enough."""
        return None

    def open(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, rank: int, world_size: int,
             share: range, batch_rows: int, log: Log, on_loaded: Callable[[list[str]], None] | None = None
             ) -> SourceSet:
        """The activations of data rank `rank` of `world_size` for the sources in `share`; `batch_rows` > 0 reads a
        finite set in global batch order (crosscoder.data.source_sets)."""
        raise NotImplementedError

    def activations(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, n_tokens: int,
                    device: torch.device, log: Log) -> Iterator[torch.Tensor]:
        """Raw activation batches [B, S, d] for analysing a dictionary trained on these sources."""
        raise NotImplementedError


class ModelKind(SourceKind):
    """Snapshots of a model, run on text by activation workers (or inline); the subclasses say which snapshots."""

    def snapshot_names(self, sources: SourcesConfig) -> list[str]:
        raise NotImplementedError

    def snapshots(self, sources: SourcesConfig, log: Log) -> list[SnapshotSpec]:
        """The snapshots, resolved (built first where the kind builds them)."""
        raise NotImplementedError

    def names(self, sources: SourcesConfig) -> list[str]:
        specs = [SnapshotSpec(name, "") for name in self.snapshot_names(sources)]
        return [spec.name for spec in expand_hooks(specs, sources)]

    def describe(self, sources: SourcesConfig, log: Log) -> SourceInfo:
        return describe_model_sources(sources, self.snapshots(sources, log))

    def content_digests(self, sources: SourcesConfig, info: SourceInfo, log: Log) -> dict[str, str] | None:
        """Local snapshot directories' weight files, whole (a hub snapshot's commit is exact already)."""
        return snapshot_file_digests(info.specs, log)

    def open(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, rank: int, world_size: int,
             share: range, batch_rows: int, log: Log, on_loaded: Callable[[list[str]], None] | None = None
             ) -> SourceSet:
        check_positions(data, info.max_positions)
        return ModelSources(sources, data, info, rank, world_size, share, log, on_loaded)

    def activations(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, n_tokens: int,
                    device: torch.device, log: Log) -> Iterator[torch.Tensor]:
        """Every snapshot re-run inline (no workers) on the run's own token stream, valid tokens only."""
        check_positions(data, info.max_positions)
        runners = load_runners(sources, info.specs, device)
        bos, pad = special_token_ids(info.tokenizer)
        seen = 0
        for batch in iter_token_batches(data, info.tokenizer, shard=0, n_shards=1):
            keep = min(int(valid_token_mask(batch, bos, pad).sum()), n_tokens - seen)
            if keep > 0:
                yield paired_activations(batch, runners, bos, pad, device)[:keep]
                seen += keep
            if seen >= n_tokens:
                return
        if seen == 0:
            raise ConfigError(f"the token stream (data.kind={data.kind!r}) gave no tokens")


def check_positions(data: DataConfig, max_positions: int | None) -> None:
    """A sequence longer than the positions the snapshots were built for (`SourceInfo.max_positions`) fails in
    the model (learned positions: an index error) or runs silently past the context they were trained on
    (rotary): refused before any loads."""
    if max_positions is not None and data.seq_len > max_positions:
        raise ConfigError(f"data.seq_len={data.seq_len} is longer than the {max_positions} positions the "
                          "snapshots were trained for (their configs' max_position_embeddings): set data.seq_len "
                          f"<= {max_positions}")


class HubSnapshots(ModelKind):
    """`hf`: HF checkpoints, local dirs or a hub id with revisions."""

    name = "hf"

    def snapshot_names(self, sources: SourcesConfig) -> list[str]:
        return hf_snapshot_names(sources)

    def preflight(self, sources: SourcesConfig, data: DataConfig) -> None:
        """Each snapshot's config (config.json: a local read, or a small download for a hub id)."""
        _, max_positions = check_model_configs(sources, resolve_hf_snapshots(sources))
        check_positions(data, max_positions)

    def snapshots(self, sources: SourcesConfig, log: Log) -> list[SnapshotSpec]:
        return resolve_hf_snapshots(sources)


class ToySnapshots(ModelKind):
    """`toy`: the embedded tiny GPT-NeoX, trained once per machine when its snapshots are missing."""

    name = "toy"

    def snapshot_names(self, sources: SourcesConfig) -> list[str]:
        return [f"step{step}" for step in sources.toy.snapshot_steps]

    def preflight(self, sources: SourcesConfig, data: DataConfig) -> None:
        """The embedded model's shape is its config's: hooks within its blocks, sequences within its positions,
        known before it is trained."""
        toy = _toy_config(sources)
        for hook in configured_hooks(sources):
            if hook.layer >= toy.num_layers:
                key = "sources.hooks" if sources.hooks else "sources.hook"
                raise ConfigError(f"{key}={hook.name}: the embedded toy model has only {toy.num_layers} blocks "
                                  f"(0..{toy.num_layers - 1}; sources.toy.num_layers)")
        check_positions(data, toy.seq_len)

    def snapshots(self, sources: SourcesConfig, log: Log) -> list[SnapshotSpec]:
        from crosscoder.toy import ensure_toy_snapshots

        built = ensure_toy_snapshots(Path(sources.toy.cache_dir).expanduser(), _toy_config(sources), log=log)
        specs = [SnapshotSpec(name=f"step{s.step}", path=str(s.path), step=s.step) for s in built]
        check_names_and_order(specs)
        return specs


def _toy_config(sources: SourcesConfig) -> ToyLMConfig:
    from crosscoder.toy import ToyLMConfig  # the toy package imports its trainer: only where it is used

    return ToyLMConfig(hidden_size=sources.toy.hidden_size, num_layers=sources.toy.num_layers,
                       train_steps=sources.toy.train_steps, snapshot_steps=tuple(sources.toy.snapshot_steps))


class PlantedDraws(SourceKind):
    """`planted`: synthetic snapshots of a planted dictionary; no model, no tokenizer (crosscoder.data.planted)."""

    name = "planted"
    has_ground_truth = True

    def names(self, sources: SourcesConfig) -> list[str]:
        return [spec.name for spec in planted_specs(sources)]

    def describe(self, sources: SourcesConfig, log: Log) -> SourceInfo:
        return SourceInfo(specs=planted_specs(sources), tokenizer=None, d_model=sources.planted.d_model, hook="planted")

    def open(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, rank: int, world_size: int,
             share: range, batch_rows: int, log: Log, on_loaded: Callable[[list[str]], None] | None = None
             ) -> SourceSet:
        return PlantedSources(sources, data, info, rank, world_size, share)

    def activations(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, n_tokens: int,
                    device: torch.device, log: Log) -> Iterator[torch.Tensor]:
        """Fresh draws, seeded apart from the training stream's blocks: held out."""
        return held_out_draws(sources.planted, n_tokens)


class ActivationFiles(SourceKind):
    """`files`: a folder of activation shards plus `sources.json` (crosscoder.data.files)."""

    name = "files"

    def names(self, sources: SourcesConfig) -> list[str]:
        return file_source_names(sources)

    def check(self, sources: SourcesConfig) -> None:
        folder = sources.files.dir
        if not (folder and os.path.isdir(os.path.expanduser(folder))):
            raise ConfigError(f"sources.files.dir={folder!r} is not an existing folder: set it to the folder "
                              "holding sources.json and the activation shards (sources.kind=files)")

    def describe(self, sources: SourcesConfig, log: Log) -> SourceInfo:
        return describe_file_sources(sources)

    def finite_origin(self, sources: SourcesConfig) -> tuple[str, str]:
        return f"the activation folder sources.files.dir={sources.files.dir!r}", "add shards to it"

    def content_digests(self, sources: SourcesConfig, info: SourceInfo, log: Log) -> dict[str, str] | None:
        return content_digests(files_root(sources), log)

    def open(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, rank: int, world_size: int,
             share: range, batch_rows: int, log: Log, on_loaded: Callable[[list[str]], None] | None = None
             ) -> SourceSet:
        files = FileActivations(sources, rank=rank, world_size=world_size, batch_rows=batch_rows, sources=share)
        log(f"reading activations from the files in {sources.files.dir} ({files.tokens_per_rank} tokens for "
            "this rank)")
        return ShardedSources("files", files)

    def activations(self, sources: SourcesConfig, data: DataConfig, info: SourceInfo, n_tokens: int,
                    device: torch.device, log: Log) -> Iterator[torch.Tensor]:
        """The folder's first rows, re-read (not held out: the files are all there is)."""
        seen = 0
        for block in FileActivations(sources).iter_blocks():
            keep = min(block.activations.shape[0], n_tokens - seen)
            yield block.activations[:keep]
            seen += keep
            if seen >= n_tokens:
                return


SOURCE_KIND_REGISTRY: dict[str, SourceKind] = {
    kind.name: kind for kind in (HubSnapshots(), ToySnapshots(), PlantedDraws(), ActivationFiles())
}
"""One entry per `sources.kind` (crosscoder.config.sources.SourceKind)."""


def source_kind(name: str) -> SourceKind:
    """The kind called `name`; ConfigError naming the known ones otherwise."""
    if name not in SOURCE_KIND_REGISTRY:
        raise ConfigError(f"sources.kind={name!r} is not one of {', '.join(SOURCE_KIND_REGISTRY)}")
    return SOURCE_KIND_REGISTRY[name]


def describe_sources(cfg: SourcesConfig, log: Log = print) -> SourceInfo:
    """Resolve the sources and check they are compatible; ConfigError names the first problem."""
    return source_kind(cfg.kind).describe(cfg, log)


def configured_snapshot_names(cfg: SourcesConfig) -> list[str]:
    """The sources' names as the config gives them, before anything is built or read: what a driver over the
    sources (SAE-Track's chain) walks."""
    return source_kind(cfg.kind).names(cfg)


def count_sources(cfg: SourcesConfig) -> int:
    """How many sources the crosscoder has, before any model loads: the snapshots times the hooks, or the
    entries of an activation folder's sources.json."""
    return source_kind(cfg.kind).count(cfg)


def resolve_snapshots(cfg: SourcesConfig, log: Log = print) -> list[SnapshotSpec]:
    """The snapshots of a model kind, resolved (the embedded toy ones built first when missing)."""
    kind = source_kind(cfg.kind)
    if not isinstance(kind, ModelKind):
        raise ConfigError(f"sources.kind={cfg.kind} has no model snapshots to resolve")
    return kind.snapshots(cfg, log)


def load_sources(cfg: SourcesConfig, device: torch.device, log: Log = print) -> LoadedSources:
    """Resolve, check and load all snapshots; raise a ConfigError naming the offending snapshot."""
    info = describe_sources(cfg, log=log)
    runners = load_runners(cfg, info.specs, device)
    log(f"loaded {len(runners)} snapshots ({', '.join(r.name for r in runners)}) at {info.hook}, "
        f"d={info.d_model}")
    return LoadedSources(specs=info.specs, tokenizer=info.tokenizer, d_model=info.d_model, hook=info.hook,
                         axis=info.axis, runners=runners)


def open_source_set(sources: SourcesConfig, data: DataConfig, info: SourceInfo, rank: int, world_size: int,
                    micro_batch: int, share: range | None = None, log: Log = print) -> SourceSet:
    """The source set the config asks for, for data rank `rank` of `world_size` and the sources in `share` (all
    when None): a cache when `data.cache.dir` is set, else the kind's own."""
    share = range(len(info.specs)) if share is None else share
    # Unshuffled, finite sets are read in global batch order, so any number of ranks trains on the same batches.
    batch_rows = micro_batch if data.shuffle.buffer_tokens == 0 else 0
    if data.cache.dir:
        reader = CacheReader(data.cache.dir, rank=rank, world_size=world_size, batch_rows=batch_rows, sources=share)
        check_cache_matches(reader.manifest, info, data.cache.dir)
        log(f"reading activations from the cache {data.cache.dir} ({reader.tokens_per_rank} tokens for this rank)")
        return ShardedSources("cache", reader)
    return source_kind(sources.kind).open(sources, data, info, rank, world_size, share, batch_rows, log)
