"""Typed configuration: one dataclass per Hydra config group, validated once with clear errors.

The YAML files in `conf/` fill these schemas; `register_configs()` puts the schemas in Hydra's ConfigStore
so an unknown key or a wrongly typed value fails at composition time, and `RunConfig.validate()` checks
what types cannot (ranges, cross-field constraints).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import MISSING

ACTIVATION_NAMES = ("relu", "topk", "batchtopk", "jumprelu", "snapshot_jumprelu")
JUMPRELU_FAMILIES = ("jumprelu", "snapshot_jumprelu")
INIT_SCHEMES = ("matched_filter", "anthropic_2025")
SOURCE_KINDS = ("hf", "toy", "planted", "files")
DATA_KINDS = ("toy", "text_files", "hf_dataset")
PRECISIONS = ("fp32", "bf16", "fp16")
TRACKING_MODES = ("online", "offline", "disabled")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
METHOD_NAMES = ("crosscoder", "independent", "sae_track")
HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
HOOK_FORMS = "blocks.L.hook_resid_pre, blocks.L.hook_resid_post, blocks.L.hook_attn_out or blocks.L.hook_mlp_out"
HOOK_POSITIONS = ("pre", "attn_out", "mlp_out", "post")
"""Hook positions within a block, in the order a sequential block computes them (crosscoder.hooks reads them)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the value."""


@dataclass(frozen=True)
class HookPoint:
    layer: int
    position: str
    """`pre`: input of block `layer`; `post`: its output (the residual stream after it); `attn_out` / `mlp_out`:
    what its attention / MLP sublayer adds to the residual stream (crosscoder.hooks)."""

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
            _positive(f"{prefix}.{key}", getattr(self, key))
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
    `planted`: synthetic snapshots from a known dictionary (crosscoder.toy.planted); `files`: activations already
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


@dataclass
class WorkersConfig:
    """Processes that run the snapshots on token batches and hand activations to the trainer."""

    num_workers: int = 2
    """Spawned worker processes per rank; 0 runs the snapshots inline in the trainer process."""
    device: str = "auto"
    """Where workers run the snapshots: `auto` (the rank's GPU, else CPU), `cpu`, `cuda:1`, ..."""
    threads: int = 1
    """CPU threads per worker (torch.set_num_threads), so workers do not starve the trainer of cores."""
    cpus: list[int] = field(default_factory=list)
    """CPU cores the workers are pinned to (Linux); empty leaves placement to the OS."""
    slots: int = 4
    """Shared-memory activation blocks in flight per worker: the back-pressure bound on memory."""
    start_timeout_s: float = 600.0
    """Seconds a worker may take to load its snapshots before the trainer gives up."""


@dataclass
class ShuffleConfig:
    """The buffer in the trainer process that mixes tokens from many sequences into each batch."""

    buffer_tokens: int = 32768
    """Tokens held; a batch is drawn at random from them (0 disables shuffling: batches in stream order)."""
    refill_fraction: float = 0.5
    """Share of the buffer served (then refilled) per round; every token is served once, none dropped."""
    seed: int = 0
    """Seed of the draw; the rank is mixed in so ranks draw differently."""


@dataclass
class CacheConfig:
    """A reusable on-disk copy of the paired activations (`crosscoder-cache` writes it, training reads it)."""

    dir: str | None = None
    """Cache folder. Training reads activations from it when set; `crosscoder-cache` writes it."""
    tokens: int = 0
    """Tokens `crosscoder-cache` writes; 0 means trainer.total_tokens plus one shuffle buffer of slack."""
    dtype: str = "float32"
    """Stored dtype (float32, bfloat16, float16); training reads them back as float32."""
    shard_batches: int = 16
    """Model batches (data.model_batch_size sequences each) per shard file."""


@dataclass
class DataConfig:
    """The token stream every snapshot reads, identically."""

    kind: str = "toy"
    """`toy`: text generated by the package; `text_files`: local .txt/.jsonl; `hf_dataset`: a hub dataset."""
    paths: list[str] = field(default_factory=list)
    """Files for `text_files` (.txt: one document per blank-line-separated block; .jsonl: `text_field`)."""
    dataset: str = ""
    """Hub dataset id for `hf_dataset` (streamed; needs the `hub` extra)."""
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 64
    """Tokens per sequence, BOS included; BOS and padding positions are never trained on."""
    model_batch_size: int = 32
    """Sequences per snapshot forward pass."""
    toy_documents: int = 4000
    """Documents of generated text for `toy`."""
    seed: int = 1234
    """Seed of the document order (and of the toy corpus)."""
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class JumpReLUConfig:
    """The JumpReLU families (crosscoder.activations): a learned threshold per latent; `jumprelu` gates once for
    every snapshot with a tanh penalty, `snapshot_jumprelu` gates each snapshot with a tanh-quad one."""

    bandwidth: float = 0.5
    """eps of the straight-through threshold gradient's rectangle kernel, in normalised pre-activation units."""
    initial_threshold: float = 1.0
    """theta every latent starts with (normalised units: inputs have E||x_s||^2 = d)."""
    tanh_scale: float = 4.0
    """c in the penalty sum_i tanh(c f_i w_i) (scaled by crosscoder.l1_coeff, warmed up over l1_warmup_steps)."""
    preact_coeff: float = 3e-6
    """lambda_P of the pre-activation loss sum_i ReLU(theta_i - pre_i) w_i (0 turns it off)."""
    frequency_scale: float = 0.01
    """snapshot_jumprelu: the tanh-quad penalty sum_i p_i (1 + p_i / frequency_scale) turns quadratic in a latent's
    firing frequency p_i above about this."""


@dataclass
class CrosscoderConfig:
    """The dictionary: F latents shared by all snapshots, a decoder vector per latent and snapshot."""

    dict_size: int = 1024
    """F, the number of latents."""
    activation: str = "relu"
    """relu (with L1 of decoder norms), topk, batchtopk, jumprelu (a learned threshold, tanh penalty), or
    snapshot_jumprelu (the threshold applied per snapshot, a code per snapshot; tanh-quad penalty)."""
    k: int = 16
    """Active latents per token for topk / batchtopk (batchtopk keeps k * batch over the batch)."""
    l1_coeff: float = 2.0
    """lambda of the sparsity penalty: ReLU's lambda * sum_i f_i * sum_s ||W_dec[i, s]||, JumpReLU's tanh one (the
    crosscoder=<family> groups ship their own: relu 0.5, jumprelu 5, snapshot_jumprelu 3)."""
    l1_warmup_steps: int = 200
    """lambda rises linearly from 0 over these steps (ReLU and JumpReLU)."""
    jumprelu: JumpReLUConfig = field(default_factory=JumpReLUConfig)
    aux_k: int = 0
    """Dead latents used by the AuxK loss (topk / batchtopk); 0 means d/2 as in Gao et al."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss."""
    sparse_topk: bool = True
    """topk / batchtopk: decode and back-propagate through the active latents only (crosscoder/sparse.py), the
    dense path's loss and gradients at a fraction of its work; false takes the dense path."""
    dead_after_tokens: int = 200_000
    """A latent that has not fired in this many tokens counts as dead."""
    init: str = "matched_filter"
    """`matched_filter`: decoder rows of norm init_decoder_norm per snapshot, encoder = decoder transpose;
    `anthropic_2025` (Anthropic's January 2025 recipe): W_dec ~ U(+-1/sqrt(n)), W_enc = (n/F) W_dec^T with
    n = S * d, and b_enc set from the first batches so each latent fires on init_firing_fraction of tokens."""
    init_from: str = ""
    """An exported dictionary folder whose weights start this run (unfolded into normalised space; the optimizer
    and schedule start fresh): SAE-Track's warm start. Its activation, dict_size, width and snapshot count must
    match this run's. Replaces `init`."""
    init_firing_fraction: float = 0.0
    """anthropic_2025: the share of tokens each latent starts firing on; 0 means the published 10000 / F, capped at
    0.1 (a small dictionary would otherwise start dense)."""
    init_decoder_norm: float = 0.1
    """matched_filter: per-snapshot norm of each decoder row at init."""
    normalize_inputs: bool = True
    """Scale each snapshot to E||x_s||^2 = d (estimated once, saved, folded out at export)."""
    norm_estimation_batches: int = 8
    """Batches used to estimate the per-snapshot scale."""

    def activation_options(self) -> dict[str, Any]:
        """Keyword arguments of the activation's class beyond k (crosscoder.model.Crosscoder)."""
        if self.activation not in JUMPRELU_FAMILIES:
            return {}
        options = asdict(self.jumprelu)
        if self.activation == "jumprelu":
            del options["frequency_scale"]
        return options

    def firing_fraction(self) -> float:
        """init_firing_fraction, its 0 resolved to the published min(10000 / F, 0.1)."""
        return self.init_firing_fraction or min(10_000 / self.dict_size, 0.1)


@dataclass
class TrainerConfig:
    """The optimisation loop."""

    total_tokens: int = 600_000
    """Training tokens (all ranks together)."""
    batch_size: int = 1024
    """Tokens per optimiser step, all ranks together."""
    lr: float = 1e-3
    lr_warmup_steps: int = 50
    lr_decay_fraction: float = 0.2
    """The LR decays linearly to 0 over this last fraction of training."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    """Gradient norm clip (0 disables)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (DeepSpeed mixed precision; bf16 on GPUs that have it)."""
    seed: int = 0
    log_every: int = 50
    """Steps between metric logs (decoder norms included)."""
    checkpoint_every: int = 0
    """Steps between exported dictionaries (0: only at the end)."""
    state_every: int = 250
    """Steps between training-state checkpoints a run can resume from (0: only when stopped by SIGTERM)."""
    keep_states: int = 2
    """Training states kept; an older one is deleted once a newer one is complete."""
    eval_tokens: int = 2048
    """Held-out tokens of the spliced-in LM loss run on each exported dictionary (crosscoder.evaluation: CE with
    each snapshot's hooked activation replaced by its reconstruction, by zero and by its mean); model sources only
    (planted ones have no LM); 0 skips it."""
    resume: str = "none"
    """`none`, `auto` (the latest complete training state under output_dir; a fresh start if there is none), or
    the path of one training-state folder."""


@dataclass
class DeepSpeedConfig:
    """The parallelism plan: how DeepSpeed shards the crosscoder and its optimiser state."""

    zero_stage: int | None = None
    """ZeRO stage 0-3; None takes the accelerate launch config's stage, else 2 (0 with one data-parallel rank)."""
    offload_optimizer: str = "none"
    """none or cpu: keep Adam state in host memory."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged verbatim into the DeepSpeed JSON config (expert knobs)."""


@dataclass
class ParallelConfig:
    """How the ranks of a launch split the work: world = data_parallel x snapshot_parallel (crosscoder.layout)."""

    snapshot_parallel: int = 1
    """Ranks that share one token stream and split the snapshots between them (each loads and runs only its own
    snapshots and holds only their slice of the crosscoder); the world size divided by it is the data-parallel
    size, over which ZeRO shards. 1: every rank runs every snapshot."""
    token_check_every: int = 1
    """Steps between checks that a snapshot group's ranks train on the same tokens (one tiny all-reduce;
    0 disables)."""
    sparse_topk_gradient: bool = True
    """TopK / BatchTopK: the backward sums only the active entries of d pre over the snapshot group (their
    codes are k-sparse and the same on every rank) instead of all B x F; identical result, less traffic."""


@dataclass
class MethodConfig:
    """What is trained on the snapshots (issue 14): one crosscoder, or a stack of single-snapshot dictionaries of
    the `crosscoder` group's family (crosscoder.stack)."""

    name: str = "crosscoder"
    """`crosscoder` (one dictionary over all snapshots), `independent` (one dictionary per snapshot, all trained
    at once from the same stream; split by snapshot, a rank trains its own snapshots'), or `sae_track` (a chain:
    snapshot 0 from scratch, each next one warm-started from the previous one's weights; crosscoder.sae_track)."""
    snapshot: str = ""
    """Train on this one snapshot (by name) only: a plain SAE of one checkpoint. SAE-Track's links set it."""
    first_tokens: int = 0
    """sae_track: tokens of the from-scratch first link (0: trainer.total_tokens)."""
    link_tokens: int = 0
    """sae_track: tokens of each warm-started link (0: first_tokens / 20, the paper's 300 M then 15 M)."""
    link_lr: float = 0.0
    """sae_track: learning rate of the warm-started links (0: trainer.lr / 10, the paper's 4e-4 then 4e-5)."""


@dataclass
class TrackingConfig:
    """Weights & Biases."""

    mode: str = "offline"
    """online, offline (sync later with `wandb sync`) or disabled."""
    project: str = "crosscoder"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_artifacts: bool = True
    """Log each exported dictionary as a W&B artifact."""
    log_analysis: bool = True
    """Analyse each exported dictionary (report in <dictionary>/analysis) and log its feature table and plots."""


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

    def validate(self) -> RunConfig:
        """Raise ConfigError naming the first bad value; return self for chaining."""
        s, d, c, t = self.sources, self.data, self.crosscoder, self.trainer
        _one_of("sources.kind", s.kind, SOURCE_KINDS)
        _one_of("data.kind", d.kind, DATA_KINDS)
        _one_of("crosscoder.activation", c.activation, ACTIVATION_NAMES)
        _one_of("trainer.precision", t.precision, PRECISIONS)
        _one_of("tracking.mode", self.tracking.mode, TRACKING_MODES)
        _one_of("deepspeed.offload_optimizer", self.deepspeed.offload_optimizer, ("none", "cpu"))
        _validate_hooks(s)
        if s.kind == "hf":
            if not s.model and not s.paths:
                raise ConfigError("sources.model (hub id or dir) or sources.paths must be set for sources.kind=hf")
            if s.model and s.paths:
                raise ConfigError("set sources.model+revisions or sources.paths, not both")
            if s.steps and len(s.steps) != self.n_snapshots():
                raise ConfigError(f"sources.steps has {len(s.steps)} entries for {self.n_snapshots()} snapshots")
        if s.kind == "planted":
            s.planted.validate()
        if s.kind == "files" and not (s.files.dir and os.path.isdir(os.path.expanduser(s.files.dir))):
            raise ConfigError(f"sources.files.dir={s.files.dir!r} is not an existing folder: set it to the folder "
                              "holding sources.json and the activation shards (sources.kind=files)")
        _positive("crosscoder.dict_size", c.dict_size)
        _validate_data(d)
        _positive("data.seq_len", d.seq_len)
        _positive("data.model_batch_size", d.model_batch_size)
        _positive("trainer.batch_size", t.batch_size)
        _positive("trainer.total_tokens", t.total_tokens)
        _positive("trainer.log_every", t.log_every)
        _positive("crosscoder.norm_estimation_batches", c.norm_estimation_batches)
        if d.seq_len < 2:
            raise ConfigError(f"data.seq_len={d.seq_len}: needs room for BOS and at least one token")
        if c.activation in ("topk", "batchtopk"):
            _positive("crosscoder.k", c.k)
            if c.k > c.dict_size:
                raise ConfigError(f"crosscoder.k={c.k} is larger than crosscoder.dict_size={c.dict_size}")
            if c.aux_k < 0 or c.aux_k > c.dict_size:
                raise ConfigError(f"crosscoder.aux_k={c.aux_k} must be in [0, dict_size={c.dict_size}]")
        if c.init not in INIT_SCHEMES:
            raise ConfigError(f"crosscoder.init={c.init!r} is not one of {list(INIT_SCHEMES)}")
        if not 0 <= c.init_firing_fraction < 1:
            raise ConfigError(f"crosscoder.init_firing_fraction={c.init_firing_fraction} must be in [0, 1)")
        if c.init == "anthropic_2025" and self.parallel.snapshot_parallel > 1:
            raise ConfigError("crosscoder.init=anthropic_2025 draws the whole decoder at once: use "
                              "parallel.snapshot_parallel=1 or crosscoder.init=matched_filter")
        if c.activation in JUMPRELU_FAMILIES:
            j = c.jumprelu
            for key in ("bandwidth", "initial_threshold", "tanh_scale", "frequency_scale"):
                if not getattr(j, key) > 0:
                    raise ConfigError(f"crosscoder.jumprelu.{key}={getattr(j, key)} must be > 0")
            if j.preact_coeff < 0:
                raise ConfigError(f"crosscoder.jumprelu.preact_coeff={j.preact_coeff} must be >= 0")
            if self.parallel.snapshot_parallel > 1:
                raise ConfigError(f"crosscoder.activation={c.activation} cannot be split by snapshot yet (its "
                                  "thresholds' gradient is not summed over the snapshot group): use "
                                  "parallel.snapshot_parallel=1")
        if c.l1_coeff < 0:
            raise ConfigError(f"crosscoder.l1_coeff={c.l1_coeff} must be >= 0")
        if t.lr <= 0:
            raise ConfigError(f"trainer.lr={t.lr} must be > 0")
        if not 0 <= t.lr_decay_fraction <= 1:
            raise ConfigError(f"trainer.lr_decay_fraction={t.lr_decay_fraction} must be in [0, 1]")
        if t.checkpoint_every < 0:
            raise ConfigError(f"trainer.checkpoint_every={t.checkpoint_every} must be >= 0")
        if t.state_every < 0:
            raise ConfigError(f"trainer.state_every={t.state_every} must be >= 0 (0: only on SIGTERM)")
        _positive("trainer.keep_states", t.keep_states)
        if t.eval_tokens < 0:
            raise ConfigError(f"trainer.eval_tokens={t.eval_tokens} must be >= 0 (0 skips the spliced-in evaluation)")
        if not t.resume:
            raise ConfigError("trainer.resume='' must be none, auto or a training-state folder")
        if t.total_tokens < t.batch_size:  # zero steps would export the initial, untrained dictionary as final
            raise ConfigError(
                f"trainer.total_tokens={t.total_tokens} is less than one batch (trainer.batch_size={t.batch_size}): "
                "the run would train zero steps"
            )
        stage = self.deepspeed.zero_stage
        if stage is not None and stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={stage} must be 0, 1, 2 or 3")
        _positive("parallel.snapshot_parallel", self.parallel.snapshot_parallel)
        n_sources = self.n_sources()
        if self.parallel.snapshot_parallel > n_sources:
            noun = "snapshots" if n_sources == self.n_snapshots() and s.kind != "files" else "sources"
            raise ConfigError(f"parallel.snapshot_parallel={self.parallel.snapshot_parallel} is more than the "
                              f"{n_sources} {noun}: every snapshot rank needs at least one")
        if self.parallel.token_check_every < 0:
            raise ConfigError(f"parallel.token_check_every={self.parallel.token_check_every} must be >= 0 (0: off)")
        _validate_method(self)
        return self

    def n_snapshots(self) -> int:
        """How many snapshots the sources name (known from the config alone, before anything loads)."""
        s = self.sources
        if s.kind == "toy":
            return len(s.toy.snapshot_steps)
        if s.kind == "planted":
            return s.planted.n_snapshots
        return len(s.paths) if s.paths else max(len(s.revisions), 1)

    def n_sources(self) -> int:
        """How many sources the crosscoder has (known before any model loads): the snapshots times the hooks, or
        the entries of a files source's sources.json."""
        s = self.sources
        if s.kind == "files":
            from crosscoder.data.files import file_source_names

            return len(file_source_names(s))
        return self.n_snapshots() * max(1, len(s.hooks))


def _validate_method(cfg: RunConfig) -> None:
    m, c = cfg.method, cfg.crosscoder
    _one_of("method.name", m.name, METHOD_NAMES)
    if m.snapshot and cfg.parallel.snapshot_parallel > 1:
        raise ConfigError(f"method.snapshot={m.snapshot!r} trains one snapshot: it cannot be split by snapshot "
                          "(parallel.snapshot_parallel=1)")
    if m.name == "crosscoder":
        return
    if m.snapshot:
        raise ConfigError(f"method.snapshot={m.snapshot!r} trains one snapshot's dictionary: use it with "
                          f"method.name=crosscoder, not {m.name} (which trains every snapshot's)")
    if cfg.n_sources() < 2:
        raise ConfigError(f"method.name={m.name} trains a stack of one dictionary per snapshot: it needs at least 2 "
                          f"snapshots, the sources name {cfg.n_sources()}")
    if c.activation == "snapshot_jumprelu":
        raise ConfigError(f"crosscoder.activation=snapshot_jumprelu gates latents per snapshot of one crosscoder; "
                          f"method.name={m.name} trains single-snapshot dictionaries: use jumprelu")
    if c.init_from:
        raise ConfigError(f"crosscoder.init_from warm-starts one dictionary; method.name={m.name} starts its first "
                          "from scratch")
    if m.name == "sae_track":
        if cfg.parallel.snapshot_parallel > 1:
            raise ConfigError("method.name=sae_track trains one snapshot at a time: use parallel.snapshot_parallel=1 "
                              "(its ranks are data parallel)")
        for key in ("first_tokens", "link_tokens"):
            if getattr(m, key) < 0:
                raise ConfigError(f"method.{key}={getattr(m, key)} must be >= 0 (0: the default)")
        if m.link_lr < 0:
            raise ConfigError(f"method.link_lr={m.link_lr} must be >= 0 (0: trainer.lr / 10)")
    elif m.first_tokens or m.link_tokens or m.link_lr:
        raise ConfigError(f"method.first_tokens, link_tokens and link_lr are SAE-Track's; method.name={m.name}")


def _validate_data(d: DataConfig) -> None:
    w, sh, ca = d.workers, d.shuffle, d.cache
    if w.num_workers < 0:
        raise ConfigError(f"data.workers.num_workers={w.num_workers} must be >= 0 (0 runs the snapshots inline)")
    _positive("data.workers.threads", w.threads)
    _positive("data.workers.slots", w.slots)
    n_cpus = os.cpu_count() or 1
    for cpu in w.cpus:
        if not 0 <= cpu < n_cpus:
            raise ConfigError(f"data.workers.cpus contains {cpu}; this machine has cores 0..{n_cpus - 1}")
    if w.device != "auto" and not re.match(r"^(cpu|cuda(:\d+)?|mps)$", w.device):
        raise ConfigError(f"data.workers.device={w.device!r} is not auto, cpu, cuda or cuda:N")
    if w.start_timeout_s <= 0:
        raise ConfigError(f"data.workers.start_timeout_s={w.start_timeout_s} must be > 0")
    if sh.buffer_tokens < 0:
        raise ConfigError(f"data.shuffle.buffer_tokens={sh.buffer_tokens} must be >= 0 (0 disables shuffling)")
    if not 0 < sh.refill_fraction <= 1:
        raise ConfigError(f"data.shuffle.refill_fraction={sh.refill_fraction} must be in (0, 1]")
    _one_of("data.cache.dtype", ca.dtype, CACHE_DTYPES)
    if ca.tokens < 0:
        raise ConfigError(f"data.cache.tokens={ca.tokens} must be >= 0 (0: trainer.total_tokens plus slack)")
    _positive("data.cache.shard_batches", ca.shard_batches)
    if d.kind == "text_files" and not _complete_cache(ca.dir):  # training from a cache never reads the corpus
        _check_text_files(d.paths)


def _complete_cache(cache_dir: str | None) -> bool:
    """Whether `cache_dir` holds a complete activation cache (its manifest is written last)."""
    from crosscoder.constants import CACHE_MANIFEST_FILE  # a leaf module

    return bool(cache_dir) and os.path.isfile(os.path.join(os.path.expanduser(cache_dir), CACHE_MANIFEST_FILE))


TEXT_PROBE_BYTES = 64 * 1024
"""At most this much of each data.paths file is read at start-up to tell a blank file from one with text."""


def _validate_hooks(s: SourcesConfig) -> None:
    """`sources.hook`, or `sources.hooks`: known hooks, in forward order, each once (the analysis reads the order of
    the sources as depth), and only for sources with a model to hook."""
    HookPoint.parse(s.hook)
    if not s.hooks:
        return
    if s.kind not in ("hf", "toy"):
        raise ConfigError(f"sources.hooks is set, but sources.kind={s.kind} has no model to hook; leave it empty")
    hooks = [HookPoint.parse(hook, f"sources.hooks[{index}]") for index, hook in enumerate(s.hooks)]
    for before, after in zip(hooks, hooks[1:], strict=False):
        if after.depth <= before.depth:
            raise ConfigError(f"sources.hooks lists {after.name} after {before.name}: list the hooks in forward order "
                              f"(earlier blocks first; in a block resid_pre, attn_out, mlp_out, resid_post), each "
                              f"once; as listed: {list(s.hooks)}")


def _check_text_files(paths: list[str]) -> None:
    """Every data.paths entry is a readable, non-blank UTF-8 file: checked at start-up, in milliseconds, rather
    than in an activation worker once the snapshots have loaded. A stat and the first few KB of each file."""
    import codecs

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


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


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
