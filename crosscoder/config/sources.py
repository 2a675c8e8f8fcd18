"""The `sources` group: which snapshots (or activations) the crosscoder reads, and at which hooks."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

from crosscoder.config.values import one_of, positive
from crosscoder.errors import ConfigError

SourceKind = Literal["hf", "toy", "planted", "files"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)

HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
HOOK_FORMS = "blocks.L.hook_resid_pre, blocks.L.hook_resid_post, blocks.L.hook_attn_out or blocks.L.hook_mlp_out"

HOOK_POSITIONS = ("pre", "attn_out", "mlp_out", "post")
"""Hook positions within a block, in the order a sequential block computes them (sources.hooks reads them)."""


@dataclass(frozen=True)
class HookPoint:
    layer: int
    position: str
    """`pre`: input of block `layer`; `post`: its output (the residual stream after it); `attn_out` / `mlp_out`:
    what its attention / MLP sublayer adds to the residual stream (crosscoder.sources.hooks)."""

    @classmethod
    def parse(cls, hook: str, key: str = "sources.hook") -> HookPoint:
        match = HOOK_PATTERN.match(hook)
        if match is None:
            raise ConfigError(f"{key}={hook!r} is not a known hook; use {HOOK_FORMS}")
        return cls(layer=int(match.group(1)), position=match.group(2).removeprefix("resid_"))

    @property
    def name(self) -> str:
        kind = f"resid_{self.position}" if self.position in ("pre", "post") else self.position
        return f"blocks.{self.layer}.hook_{kind}"

    @property
    def depth(self) -> tuple[int, int]:
        """Where the forward computes it: a later hook has a larger depth."""
        return self.layer, HOOK_POSITIONS.index(self.position)


@dataclass
class ToySourceConfig:
    """The embedded tiny GPT-NeoX whose training snapshots are made locally when missing."""

    cache_dir: str = "~/.cache/crosscoder/toy"
    """Where the trained snapshots are kept, so the model is trained once per machine."""
    hidden_size: int = 64
    """Residual-stream width d of the tiny model."""
    num_layers: int = 2
    """Transformer blocks."""
    train_steps: int = 300
    """Optimiser steps of the tiny LM; the last snapshot is taken here."""
    snapshot_steps: list[int] = field(default_factory=lambda: [0, 3, 8, 20, 45, 100, 180, 300])
    """Training steps at which a snapshot is saved (log-spaced, step 0 included)."""


@dataclass
class PlantedSourceConfig:
    """Synthetic snapshots from a planted dictionary whose per-snapshot feature magnitudes are known."""

    n_snapshots: int = 8
    """S, snapshots generated."""
    d_model: int = 64
    """Width d of every snapshot."""
    n_features: int = 128
    """F_true, planted features (may exceed d_model: superposition)."""
    persistent_share: float = 0.3
    """Share of features alive at every snapshot."""
    emerging_share: float = 0.4
    """Share that switch on at a snapshot t in 1..S-1 and stay on."""
    vanishing_share: float = 0.15
    """Share alive until a snapshot t in 1..S-1, then off."""
    transient_share: float = 0.15
    """Share alive only on an interior window [t0, t1); the four shares sum to 1."""
    active_per_token: float = 5.0
    """Expected active features per token (each is on independently with probability this / n_features)."""
    rotation_fraction: float = 0.25
    """Share of features whose direction turns smoothly across snapshots."""
    rotation_cosine: float = 0.6
    """Cosine between a rotating feature's first- and last-snapshot directions."""
    noise: float = 0.1
    """Std of isotropic Gaussian noise relative to the signal's (noise energy = noise^2 * signal energy)."""
    seed: int = 0
    """Seed of the planted dictionary and of the token stream."""

    def validate(self, prefix: str = "sources.planted") -> None:
        """Raise ConfigError naming the first out-of-range field."""
        for key in ("n_snapshots", "d_model", "n_features"):
            positive(f"{prefix}.{key}", getattr(self, key))
        shares = {k: getattr(self, f"{k}_share") for k in ("persistent", "emerging", "vanishing", "transient")}
        for kind, share in shares.items():
            if not 0 <= share <= 1:
                raise ConfigError(f"{prefix}.{kind}_share={share} must be in [0, 1]")
        if abs(sum(shares.values()) - 1) > 1e-6:
            raise ConfigError(f"{prefix} shares {shares} sum to {sum(shares.values()):.6g}, not 1")
        if self.n_snapshots < (3 if self.transient_share > 0 else 2):
            raise ConfigError(f"{prefix}.n_snapshots={self.n_snapshots} is too few: emerging/vanishing features "
                              "need 2, transient ones (an interior window) 3")
        if not 0 < self.active_per_token <= self.n_features:
            raise ConfigError(f"{prefix}.active_per_token={self.active_per_token} must be in "
                              f"(0, n_features={self.n_features}]")
        if not 0 <= self.rotation_fraction <= 1:
            raise ConfigError(f"{prefix}.rotation_fraction={self.rotation_fraction} must be in [0, 1]")
        if not -1 <= self.rotation_cosine <= 1:
            raise ConfigError(f"{prefix}.rotation_cosine={self.rotation_cosine} must be in [-1, 1]")
        if self.noise < 0:
            raise ConfigError(f"{prefix}.noise={self.noise} must be >= 0")


@dataclass
class FilesSourceConfig:
    """Activations computed elsewhere (nnsight, TransformerLens, a peer's cache), read from a folder."""

    dir: str = ""
    """The folder: `sources.json` plus `*.safetensors` or `*.npy` shards (format: crosscoder.data.files)."""


@dataclass
class SourcesConfig:
    """The snapshots the crosscoder reads: one hook point in each of several checkpoints of one model."""

    kind: str = "hf"
    """`hf`: snapshots named below (hub ids or local dirs); `toy`: the embedded tiny model, built on demand;
    `planted`: synthetic snapshots from a known dictionary (crosscoder.data.planted); `files`: activations already
    on disk (`files.dir`, crosscoder.data.files)."""
    model: str = ""
    """Hub id (e.g. EleutherAI/pythia-160m-deduped) or local directory shared by all `revisions`."""
    revisions: list[str] = field(default_factory=list)
    """One snapshot per revision of `model` (e.g. step0, step1000, ..., step143000)."""
    paths: list[str] = field(default_factory=list)
    """Alternatively one local HF checkpoint directory per snapshot."""
    steps: list[int] = field(default_factory=list)
    """Training step of each snapshot, for reports; read from `stepN` revision/dir names when empty."""
    hook: str = "blocks.1.hook_resid_post"
    """Hook point: blocks.L.hook_resid_pre / hook_resid_post (the residual stream entering / leaving block L),
    blocks.L.hook_attn_out / hook_mlp_out (what its attention / MLP sublayer adds to the residual stream)."""
    hooks: list[str] = field(default_factory=list)
    """Several hook points instead of `hook`, in forward order: every snapshot is read at each of them in one
    forward, and each (snapshot, hook) pair is a source (many layers of one snapshot, or a product)."""
    dtype: str = "float32"
    """Dtype the snapshots run in (float32, bfloat16, float16)."""
    trust_remote_code: bool = False
    """Passed to transformers; off unless you trust the checkpoint's code."""
    toy: ToySourceConfig = field(default_factory=ToySourceConfig)
    planted: PlantedSourceConfig = field(default_factory=PlantedSourceConfig)
    files: FilesSourceConfig = field(default_factory=FilesSourceConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value of this group (values only: whether a folder exists is
        checked at start-up, crosscoder.data.checks)."""
        one_of("sources.kind", self.kind, SOURCE_KINDS)
        self._validate_hooks()
        KIND_RULES[self.kind].validate(self)

    def _validate_hooks(self) -> None:
        """`sources.hook`, or `sources.hooks`: known hooks, in forward order, each once (the analysis reads the order
        of the sources as depth), and only for sources with a model to hook."""
        HookPoint.parse(self.hook)
        if not self.hooks:
            return
        if not self.has_model():
            raise ConfigError(f"sources.hooks is set, but sources.kind={self.kind} has no model to hook; leave it "
                              "empty")
        hooks = [HookPoint.parse(hook, f"sources.hooks[{index}]") for index, hook in enumerate(self.hooks)]
        for before, after in zip(hooks, hooks[1:], strict=False):
            if after.depth <= before.depth:
                raise ConfigError(f"sources.hooks lists {after.name} after {before.name}: list the hooks in forward "
                                  f"order (earlier blocks first; in a block resid_pre, attn_out, mlp_out, resid_post), "
                                  f"each once; as listed: {list(self.hooks)}")

    def has_model(self) -> bool:
        """Whether the sources are snapshots of a model run on text (hooks, tokens, an LM loss, contexts)."""
        return KIND_RULES[self.kind].has_model

    def n_snapshots(self) -> int | None:
        """How many snapshots the sources name, known from the config alone before anything loads; None where
        only the data tells (an activation folder's sources.json: crosscoder.data.kinds)."""
        return KIND_RULES[self.kind].n_snapshots(self)


def _hf_snapshots(sources: SourcesConfig) -> int:
    return len(sources.paths) if sources.paths else max(len(sources.revisions), 1)


def _validate_hf(sources: SourcesConfig) -> None:
    if not sources.model and not sources.paths:
        raise ConfigError("sources.model (hub id or dir) or sources.paths must be set for sources.kind=hf")
    if sources.model and sources.paths:
        raise ConfigError("set sources.model+revisions or sources.paths, not both")
    if sources.steps and len(sources.steps) != _hf_snapshots(sources):
        raise ConfigError(f"sources.steps has {len(sources.steps)} entries for {_hf_snapshots(sources)} snapshots")


def _no_rules(sources: SourcesConfig) -> None:
    """A kind whose settings need no check beyond their types."""


@dataclass(frozen=True)
class KindRules:
    """What the config alone knows of a source kind: its value rules and snapshot count. How a kind is checked on
    disk, described, opened and replayed is the data layer's half of the registry (crosscoder.data.kinds), which
    the config layer cannot import; a test keeps the two halves' names equal to `SourceKind`."""

    has_model: bool
    """Runs snapshots of a model on text: hooks, tokens, an LM loss and contexts."""
    n_snapshots: Callable[[SourcesConfig], int | None]
    validate: Callable[[SourcesConfig], None] = _no_rules


KIND_RULES: dict[str, KindRules] = {
    "hf": KindRules(has_model=True, n_snapshots=_hf_snapshots, validate=_validate_hf),
    "toy": KindRules(has_model=True, n_snapshots=lambda sources: len(sources.toy.snapshot_steps)),
    "planted": KindRules(has_model=False, n_snapshots=lambda sources: sources.planted.n_snapshots,
                         validate=lambda sources: sources.planted.validate()),
    "files": KindRules(has_model=False, n_snapshots=lambda sources: None),
}
"""The config's half of the source-kind registry, one entry per `SourceKind`."""
MODEL_KINDS: tuple[str, ...] = tuple(name for name, rules in KIND_RULES.items() if rules.has_model)
"""Source kinds that run snapshots of a model on text: they have hooks, tokens, an LM loss and contexts."""
