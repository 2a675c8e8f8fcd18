"""`RunConfig`: every group of one run, the rules that join groups, unknown-key checks and Hydra's ConfigStore.

Each group validates its own values (`<Group>.validate`); what is checked against the machine and the disk (a
folder exists, a file holds text, a core exists, how many sources an activation folder has) is checked at
start-up by crosscoder.data.checks, which calls `validate` with what it found.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from crosscoder.config.data import DataConfig
from crosscoder.config.dictionary import JUMPRELU_FAMILIES, CrosscoderConfig
from crosscoder.config.method import MethodConfig
from crosscoder.config.parallel import DeepSpeedConfig, ParallelConfig
from crosscoder.config.recipes import describe_recipe, fill_recipe
from crosscoder.config.sources import SourcesConfig
from crosscoder.config.tracking import TrackingConfig
from crosscoder.config.trainer import TrainerConfig
from crosscoder.errors import ConfigError


@dataclass
class RunConfig:
    """Everything one training run needs."""

    sources: SourcesConfig = field(default_factory=SourcesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crosscoder: CrosscoderConfig = field(default_factory=CrosscoderConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    output_dir: str = MISSING
    """Run directory (Hydra's output dir unless set)."""

    def validate(self, n_sources: int | None = None) -> RunConfig:
        """Fill the family's recipe into the keys left unset (`apply_recipe`), then raise ConfigError naming the
        first bad value; return self for chaining. `n_sources`: the source count where the config alone cannot
        tell it (an activation folder's sources.json; crosscoder.data.checks reads it); without it, the rules that
        need it are left to that start-up check."""
        self.crosscoder.validate()  # a family the recipes know, before its recipe is read
        self.trainer.validate()
        self.apply_recipe()
        for group in (self.sources, self.crosscoder, self.data, self.trainer, self.deepspeed, self.parallel,
                      self.tracking, self.method):
            group.validate()
        c, parallel = self.crosscoder, self.parallel
        # The family first: both JumpReLU recipes start from anthropic_2025, which is refused below for the same split.
        if c.activation in JUMPRELU_FAMILIES and parallel.snapshot_parallel > 1:
            raise ConfigError(f"crosscoder.activation={c.activation} cannot be split by snapshot yet (its "
                              "thresholds' gradient is not summed over the snapshot group): use "
                              "parallel.snapshot_parallel=1")
        if c.init == "anthropic_2025" and parallel.snapshot_parallel > 1:
            raise ConfigError("crosscoder.init=anthropic_2025 draws the whole decoder at once: use "
                              "parallel.snapshot_parallel=1 or crosscoder.init=matched_filter")
        self._validate_method()
        n_sources = n_sources if n_sources is not None else self.n_sources()
        if n_sources is not None:
            self.check_source_count(n_sources)
        return self

    def apply_recipe(self) -> dict[str, Any]:
        """Fill every recipe key left None with the family's value (crosscoder.config.recipes); what the user set
        stays. Returns what this call filled; `recipe_filled` keeps every key filled so far (a resume hands those
        back to the values its training state was saved with)."""
        filled = fill_recipe(self, self.crosscoder.activation, self.trainer.total_tokens // self.trainer.batch_size)
        self.recipe_filled = {**getattr(self, "recipe_filled", {}), **filled}
        return filled

    def describe_recipe(self) -> str:
        """The start-up line: the family's recipe as this run applies it, and the user's settings it kept."""
        return describe_recipe(self, self.crosscoder.activation, getattr(self, "recipe_filled", {}))

    def check_source_count(self, n_sources: int) -> None:
        """The rules that need the number of sources: from the config alone (`validate`), or once an activation
        folder's sources.json has been read (crosscoder.data.checks)."""
        parallel, method = self.parallel, self.method
        if parallel.snapshot_parallel > n_sources:
            noun = "snapshots" if n_sources == self.n_snapshots() else "sources"
            raise ConfigError(f"parallel.snapshot_parallel={parallel.snapshot_parallel} is more than the "
                              f"{n_sources} {noun}: every snapshot rank needs at least one")
        if method.name != "crosscoder" and n_sources < 2:
            raise ConfigError(f"method.name={method.name} trains a stack of one dictionary per snapshot: it needs at "
                              f"least 2 snapshots, the sources name {n_sources}")

    def _validate_method(self) -> None:
        m, c = self.method, self.crosscoder
        if m.snapshot and self.parallel.snapshot_parallel > 1:
            raise ConfigError(f"method.snapshot={m.snapshot!r} trains one snapshot: it cannot be split by snapshot "
                              "(parallel.snapshot_parallel=1)")
        if m.name == "crosscoder":
            return
        if m.snapshot:
            raise ConfigError(f"method.snapshot={m.snapshot!r} trains one snapshot's dictionary: use it with "
                              f"method.name=crosscoder, not {m.name} (which trains every snapshot's)")
        if c.activation == "snapshot_jumprelu":
            raise ConfigError(f"crosscoder.activation=snapshot_jumprelu gates latents per snapshot of one crosscoder; "
                              f"method.name={m.name} trains single-snapshot dictionaries: use jumprelu")
        if c.init_from:
            raise ConfigError(f"crosscoder.init_from warm-starts one dictionary; method.name={m.name} starts its "
                              "first from scratch")
        if m.name == "sae_track" and self.parallel.snapshot_parallel > 1:
            raise ConfigError("method.name=sae_track trains one snapshot at a time: use parallel.snapshot_parallel=1 "
                              "(its ranks are data parallel)")

    def n_snapshots(self) -> int | None:
        """How many snapshots the sources name, known from the config alone before anything loads (None: only the
        data tells, crosscoder.data.kinds)."""
        return self.sources.n_snapshots()

    def n_sources(self) -> int | None:
        """How many sources the crosscoder has, when the config alone tells it: the snapshots times the hooks.
        None for an activation folder, whose sources.json says (crosscoder.data.kinds.count_sources)."""
        n_snapshots = self.n_snapshots()
        return None if n_snapshots is None else n_snapshots * max(1, len(self.sources.hooks))


def unknown_keys(tree: dict[str, Any], schema: type | None = None, prefix: str = "") -> list[str]:
    """Keys of a composed config (as a plain dict) that its schema (RunConfig by default) does not have, with a
    close match if there is one. Hydra's `+key=value` adds a key even to a typed config, and the dataclass would
    carry it unread."""
    schema = schema or RunConfig
    types = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    found = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            found.append(name + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        elif dataclasses.is_dataclass(types[key]) and isinstance(value, dict):  # free-form dicts are not checked
            found += unknown_keys(value, types[key], name + ".")
    return found


def check_known_keys(tree: dict[str, Any]) -> None:
    """Raise ConfigError naming every key the schema does not know (however it was spelled on the command line)."""
    if found := unknown_keys(tree):
        raise ConfigError(f"unknown configuration key(s): {', '.join(found)}")


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore; conf/config.yaml lists `base_config` first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=RunConfig)
