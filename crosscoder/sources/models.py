"""Sources: one hook point in each of several snapshots of one model, read with forward hooks.

A snapshot is an HF checkpoint: a local directory, or a hub id plus a revision (`EleutherAI/pythia-160m` at
`step1000`). All snapshots must share one tokenizer and one width, so the same token ids mean the same text
and the crosscoder's per-source blocks line up. The forward pass stops at the last hooked block: no later
layers, no final norm, no logits (crosscoder.evaluation.splicing runs on to the logits, for the spliced-in evaluation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crosscoder.config import HookPoint, SourcesConfig
from crosscoder.errors import ConfigError
from crosscoder.sources.causal_check import check_causal_decoder, describe_snapshot
from crosscoder.sources.fingerprint import snapshot_fingerprint
from crosscoder.sources.hooks import SnapshotRunner, language_config
from crosscoder.sources.spec import SnapshotSpec, SourceInfo

STEP_PATTERN = re.compile(r"step[_-]?(\d+)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _step_from_name(name: str) -> int | None:
    match = STEP_PATTERN.search(name)
    return int(match.group(1)) if match else None


def resolve_snapshots(cfg: SourcesConfig) -> list[SnapshotSpec]:
    """The snapshots named by an `hf` sources config (local dirs, or a hub id and its revisions) as specs; refuse
    names that collide and known steps out of training order (both would give a silently wrong result). Other
    kinds resolve theirs in crosscoder.data.kinds."""
    specs = _hf_specs(cfg)
    check_names_and_order(specs)
    return specs


def hf_snapshot_names(cfg: SourcesConfig) -> list[str]:
    """The snapshots' names as an `hf` sources config gives them, before anything is read."""
    if cfg.paths:
        return [Path(raw).expanduser().name for raw in cfg.paths]
    return [revision or "main" for revision in (list(cfg.revisions) or [None])]


def configured_hooks(cfg: SourcesConfig) -> list[HookPoint]:
    """The hook points every snapshot is read at: `sources.hooks`, else the one `sources.hook`."""
    if cfg.hooks:
        return [HookPoint.parse(hook, f"sources.hooks[{index}]") for index, hook in enumerate(cfg.hooks)]
    return [HookPoint.parse(cfg.hook)]


def expand_hooks(snapshots: list[SnapshotSpec], cfg: SourcesConfig) -> list[SnapshotSpec]:
    """The sources: each snapshot as it is under one hook; under several (`sources.hooks`), one source per
    (snapshot, hook) pair, snapshot-major (so a snapshot's sources are adjacent and one forward reads them all),
    named after the hook (one snapshot) or `<snapshot>:<hook>`."""
    if not cfg.hooks:
        return snapshots
    hooks = configured_hooks(cfg)
    return [replace(snapshot, name=f"{snapshot.name}:{hook.name}" if len(snapshots) > 1 else hook.name,
                    hook=hook.name, layer=hook.layer, snapshot=snapshot.name)
            for snapshot in snapshots for hook in hooks]


def source_axis(cfg: SourcesConfig, n_snapshots: int) -> str:
    """What the crosscoder's source axis is, for labels and plots: `step` (snapshots of a training run), `layer`
    (hooks of one snapshot at distinct blocks), `hook` (hooks of one snapshot, some in one block) or `source`
    (snapshots x hooks)."""
    hooks = configured_hooks(cfg) if cfg.has_model() else []
    if len(hooks) <= 1:
        return "step"
    if n_snapshots > 1:
        return "source"
    return "layer" if len({hook.layer for hook in hooks}) == len(hooks) else "hook"


def check_names_and_order(specs: list[SnapshotSpec]) -> None:
    """Every snapshot names its metrics, W&B keys and feature-table columns, so names must be unique; the
    crosscoder's snapshot axis is read as time, so snapshots whose steps are all known must come in training order."""
    seen: dict[str, SnapshotSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(
                f"snapshots {describe_snapshot(seen[spec.name])} and {describe_snapshot(spec)} are both named "
                f"{spec.name!r}: their metrics and decoder norms would overwrite each other; give the snapshot "
                "directories distinct names"
            )
        seen[spec.name] = spec
    steps = [spec.step for spec in specs]
    if None in steps:
        return
    for before, after in zip(specs, specs[1:], strict=False):
        if after.step <= before.step:  # type: ignore[operator]
            raise ConfigError(
                f"snapshot {after.name!r} (step {after.step}) is listed after {before.name!r} (step {before.step}): "
                "the snapshots must be listed in training order (the analysis reads their order as time); "
                f"the steps as listed are {steps}"
            )


def _hf_specs(cfg: SourcesConfig) -> list[SnapshotSpec]:
    if cfg.paths:
        specs = []
        for i, raw in enumerate(cfg.paths):
            path = Path(raw).expanduser()
            if not path.is_dir():
                raise ConfigError(f"sources.paths[{i}]={raw!r}: snapshot directory does not exist")
            step = cfg.steps[i] if cfg.steps else _step_from_name(path.name)
            specs.append(SnapshotSpec(name=path.name, path=str(path), step=step))
        return specs
    local = Path(cfg.model).expanduser()
    if (cfg.model.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
        raise ConfigError(f"sources.model={cfg.model!r}: snapshot directory does not exist")
    revisions: list[str | None] = list(cfg.revisions) or [None]
    return [
        SnapshotSpec(
            name=revision or "main",
            path=str(local) if local.is_dir() else cfg.model,
            revision=revision,
            step=cfg.steps[i] if cfg.steps else (_step_from_name(revision) if revision else None),
        )
        for i, revision in enumerate(revisions)
    ]


def load_tokenizer(spec: SnapshotSpec, trust_remote_code: bool = False):  # noqa: ANN201 (HF tokenizer type)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # ValueError: a directory without (usable) tokenizer files
        raise ConfigError(f"cannot load the tokenizer of snapshot {describe_snapshot(spec)}: {error}") from error


def load_snapshot_model(spec: SnapshotSpec, dtype: str = "float32", trust_remote_code: bool = False,
                        with_lm_head: bool = False) -> nn.Module:
    """The base model (no LM head) of one snapshot, in eval mode with gradients off; `with_lm_head` loads the
    causal LM (same blocks, plus the final head) for forwards that run to logits (crosscoder.evaluation.splicing)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # The base model is loaded from a causal-LM checkpoint: its unused LM head is expected, not news.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # one bar per snapshot per worker is noise
    if dtype not in DTYPES:
        raise ConfigError(f"sources.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        model = (AutoModelForCausalLM if with_lm_head else AutoModel).from_pretrained(
            spec.path, revision=spec.revision, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:  # ValueError: a config.json transformers does not recognise
        raise ConfigError(f"cannot load snapshot {describe_snapshot(spec)}: {error}") from error
    model.eval().requires_grad_(False)
    check_finite_parameters(model, spec)
    return model


def check_finite_parameters(model: nn.Module, spec: SnapshotSpec) -> None:
    """Refuse a snapshot with a NaN/inf weight, naming the first such parameter: its activations would be NaN (or
    silently huge) and poison the crosscoder. One pass over the weights: a sum is finite only if every term is, so
    the element-wise test runs only on a parameter whose sum is not (which a finite overflow can also cause)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.numel() == 0 or torch.isfinite(parameter.sum(dtype=torch.float32)):
                continue
            bad = ~torch.isfinite(parameter)
            if bad.any():
                raise ConfigError(
                    f"snapshot {spec.name!r} ({describe_snapshot(spec)}) has non-finite weights: parameter {name!r} "
                    f"holds {int(bad.sum())} NaN/inf values of {parameter.numel()}; the checkpoint is corrupt or its "
                    "training diverged"
                )




def check_same_tokenizer(tokenizers: list, specs: list[SnapshotSpec]) -> None:
    """Raise unless every snapshot tokenizes identically (same vocabulary and special tokens)."""
    def signature(tok) -> tuple:  # noqa: ANN001
        return (tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

    reference = signature(tokenizers[0])
    for tok, spec in zip(tokenizers[1:], specs[1:], strict=True):
        if signature(tok) != reference:
            raise ConfigError(
                f"snapshot {describe_snapshot(spec)} has a different tokenizer from {describe_snapshot(specs[0])}; "
                "all snapshots must share one tokenizer so they read the same tokens"
            )


@dataclass
class LoadedSources(SourceInfo):
    """The snapshots themselves, ready to run: one runner per snapshot, in `specs` order."""

    runners: list[SnapshotRunner] = field(default_factory=list)


def load_model_config(spec: SnapshotSpec, trust_remote_code: bool = False):  # noqa: ANN201 (HF config type)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load snapshot {describe_snapshot(spec)}: {error}") from error


def snapshot_model_bytes(spec: SnapshotSpec, dtype: str, trust_remote_code: bool = False) -> int:
    """What one loaded copy of the snapshot's base model takes in `dtype` (parameters and buffers), counted on the
    meta device from its config: no weight is read and nothing is allocated."""
    from transformers import AutoModel

    config = load_model_config(spec, trust_remote_code)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    elements = sum(tensor.numel() for tensor in (*model.parameters(), *model.buffers()))
    return elements * torch.empty((), dtype=DTYPES.get(dtype, torch.float32)).element_size()


NO_SUBLAYER_TYPES = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm")
"""Model types whose blocks have no attention or MLP sublayer for hook_attn_out / hook_mlp_out to read."""


def _check_hooks(cfg: SourcesConfig, model_config: Any, spec: SnapshotSpec) -> None:  # noqa: ANN401 (HF config)
    """Every hook within the model's blocks, and sublayer hooks only where the blocks have sublayers."""
    n_layers = getattr(language_config(model_config), "num_hidden_layers", None)
    model_type = getattr(model_config, "model_type", "")
    for hook in configured_hooks(cfg):
        if n_layers is not None and hook.layer >= n_layers:
            key = "sources.hooks" if cfg.hooks else "sources.hook"
            raise ConfigError(f"{key}={hook.name}: snapshot {spec.name!r} has only {n_layers} blocks "
                              f"(0..{n_layers - 1})")
        if hook.position in ("attn_out", "mlp_out") and model_type in NO_SUBLAYER_TYPES:
            raise ConfigError(f"{hook.name}: snapshot {spec.name!r} is a {model_type} model, whose blocks have no "
                              "attention or MLP sublayer; hook its residual stream (hook_resid_pre/post)")


def check_model_configs(cfg: SourcesConfig, specs: list[SnapshotSpec]) -> tuple[int, int | None]:
    """From the snapshots' configs alone (no weights, no tokenizer): each is a decoder-only causal LM with the
    hooked blocks, all share one width. Returns (the width, the fewest positions any was built for, or None)."""
    widths, positions = [], []
    for spec in specs:
        model_config = load_model_config(spec, cfg.trust_remote_code)
        check_causal_decoder(model_config, spec)
        text = language_config(model_config)
        if getattr(text, "hidden_size", None) is None:
            raise ConfigError(f"snapshot {describe_snapshot(spec)} ({type(model_config).__name__}) names no "
                              "hidden_size for its language model: this tool cannot tell its residual width")
        width = int(text.hidden_size)
        if isinstance(getattr(text, "max_position_embeddings", None), int):
            positions.append(text.max_position_embeddings)
        if widths and width != widths[0]:
            raise ConfigError(
                f"snapshot {describe_snapshot(spec)} has width {width}, but {describe_snapshot(specs[0])} has "
                f"{widths[0]}; all snapshots must share one width"
            )
        _check_hooks(cfg, model_config, spec)
        widths.append(width)
    return widths[0], (min(positions) if positions else None)


def describe_model_sources(cfg: SourcesConfig, specs: list[SnapshotSpec]) -> SourceInfo:
    """Sources with a model behind them (hf, toy), from their resolved snapshots `specs` (crosscoder.data.kinds
    resolves them). Check they are compatible, reading only tokenizers and configs (cheap): one tokenizer, one width,
    every hook within every model, every model a decoder-only causal LM; then fingerprint each snapshot (a few MB
    of each local snapshot's weight files; a hub snapshot's commit and config). Every hook (sources.hooks) writes
    into the residual stream, so one width holds for all of a snapshot's hooks."""
    tokenizers = [load_tokenizer(spec, cfg.trust_remote_code) for spec in specs]
    check_same_tokenizer(tokenizers, specs)
    width, max_positions = check_model_configs(cfg, specs)
    # Once per run, after the cheap checks: what each snapshot is, so a cache or a training state made from other
    # weights under the same names is refused (crosscoder.sources.fingerprint).
    specs = [replace(spec, fingerprint=snapshot_fingerprint(spec)) for spec in specs]
    hook = ",".join(cfg.hooks) if cfg.hooks else cfg.hook
    return SourceInfo(specs=expand_hooks(specs, cfg), tokenizer=tokenizers[0], d_model=width, hook=hook,
                      axis=source_axis(cfg, len(specs)), max_positions=max_positions)


def snapshot_groups(cfg: SourcesConfig, specs: list[SnapshotSpec]) -> list[tuple[SnapshotSpec, list[HookPoint]]]:
    """The sources `specs` (adjacent per snapshot, as `expand_hooks` orders them) as (snapshot, its hooks)."""
    groups: list[tuple[SnapshotSpec, list[HookPoint]]] = []
    for spec in specs:
        hook = HookPoint.parse(spec.hook) if spec.hook else HookPoint.parse(cfg.hook)
        if groups and groups[-1][0].snapshot_name == spec.snapshot_name:
            groups[-1][1].append(hook)
        else:
            groups.append((spec, [hook]))
    return groups


def load_runners(cfg: SourcesConfig, specs: list[SnapshotSpec], device: torch.device, with_lm_head: bool = False
                 ) -> list[SnapshotRunner]:
    """Load the weights of the snapshots of the sources `specs` onto `device`, once per snapshot, each runner
    reading all of its snapshot's hooks (each activation worker calls this once); `with_lm_head`: the causal LMs,
    whose runners can also run to logits (the spliced-in evaluation)."""
    return [
        SnapshotRunner(load_snapshot_model(spec, cfg.dtype, cfg.trust_remote_code, with_lm_head).to(device), hooks,
                       spec.snapshot_name)
        for spec, hooks in snapshot_groups(cfg, specs)
    ]


def source_runners(runners: list[SnapshotRunner]) -> list[tuple[SnapshotRunner, int]]:
    """(runner, index of the hook) per source, in source order."""
    return [(runner, index) for runner in runners for index in range(len(runner.hooks))]
