"""Sources: one hook point in each of several snapshots of one model, read with forward hooks.

A snapshot is an HF checkpoint: a local directory, or a hub id plus a revision (`EleutherAI/pythia-160m` at
`step1000`). All snapshots must share one tokenizer and one width, so the same token ids mean the same text
and the crosscoder's per-source blocks line up. The forward pass stops at the last hooked block: no later
layers, no final norm, no logits (crosscoder.splicing runs on to the logits, for the spliced-in evaluation).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crosscoder.config import ConfigError, HookPoint, SourcesConfig
from crosscoder.fingerprint import check_same_snapshots as check_same_snapshots  # re-exported for callers
from crosscoder.fingerprint import snapshot_fingerprint

STEP_PATTERN = re.compile(r"step[_-]?(\d+)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SnapshotSpec:
    """Where one snapshot lives, which training step it is, and (once `describe_sources` has run) what it is:
    `fingerprint` is `crosscoder.fingerprint.snapshot_fingerprint`, compared whenever a cache or a training
    state made from these snapshots is read back."""

    name: str
    path: str
    revision: str | None = None
    step: int | None = None
    fingerprint: str | None = None


def _step_from_name(name: str) -> int | None:
    match = STEP_PATTERN.search(name)
    return int(match.group(1)) if match else None


def resolve_snapshots(cfg: SourcesConfig, log: Callable[[str], None] = print) -> list[SnapshotSpec]:
    """Turn the sources config into snapshot specs, building the embedded toy snapshots if asked and missing;
    refuse names that collide and known steps out of training order (both would give a silently wrong result)."""
    specs = _resolve(cfg, log)
    check_names_and_order(specs)
    return specs


def configured_snapshot_names(cfg: SourcesConfig) -> list[str]:
    """The snapshots' names as the config gives them, before anything is built or read (resolve_snapshots and
    planted_specs name them the same way): what a driver over the snapshots (SAE-Track's chain) walks."""
    if cfg.kind == "planted":
        return [f"snapshot{index}" for index in range(cfg.planted.n_snapshots)]
    if cfg.kind == "toy":
        return [f"step{step}" for step in cfg.toy.snapshot_steps]
    if cfg.paths:
        return [Path(raw).expanduser().name for raw in cfg.paths]
    return [revision or "main" for revision in (list(cfg.revisions) or [None])]


def check_names_and_order(specs: list[SnapshotSpec]) -> None:
    """Every snapshot names its metrics, W&B keys and feature-table columns, so names must be unique; the
    crosscoder's snapshot axis is read as time, so snapshots whose steps are all known must come in training order."""
    seen: dict[str, SnapshotSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(
                f"snapshots {_describe(seen[spec.name])} and {_describe(spec)} are both named {spec.name!r}: their "
                "metrics and decoder norms would overwrite each other; give the snapshot directories distinct names"
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


def _resolve(cfg: SourcesConfig, log: Callable[[str], None]) -> list[SnapshotSpec]:
    if cfg.kind == "toy":
        from crosscoder.toy import ToyLMConfig, ensure_toy_snapshots

        toy = ToyLMConfig(
            hidden_size=cfg.toy.hidden_size,
            num_layers=cfg.toy.num_layers,
            train_steps=cfg.toy.train_steps,
            snapshot_steps=tuple(cfg.toy.snapshot_steps),
        )
        built = ensure_toy_snapshots(Path(cfg.toy.cache_dir).expanduser(), toy, log=log)
        return [SnapshotSpec(name=f"step{s.step}", path=str(s.path), step=s.step) for s in built]
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
        raise ConfigError(f"cannot load the tokenizer of snapshot {_describe(spec)}: {error}") from error


def load_snapshot_model(spec: SnapshotSpec, dtype: str = "float32", trust_remote_code: bool = False,
                        with_lm_head: bool = False) -> nn.Module:
    """The base model (no LM head) of one snapshot, in eval mode with gradients off; `with_lm_head` loads the
    causal LM (same blocks, plus the final head) for forwards that run to logits (crosscoder.splicing)."""
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
        raise ConfigError(f"cannot load snapshot {_describe(spec)}: {error}") from error
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
                    f"snapshot {spec.name!r} ({_describe(spec)}) has non-finite weights: parameter {name!r} holds "
                    f"{int(bad.sum())} NaN/inf values of {parameter.numel()}; the checkpoint is corrupt or its "
                    "training diverged"
                )


def _describe(spec: SnapshotSpec) -> str:
    return f"{spec.path!r}" + (f" at revision {spec.revision!r}" if spec.revision else "")


def check_same_tokenizer(tokenizers: list, specs: list[SnapshotSpec]) -> None:
    """Raise unless every snapshot tokenizes identically (same vocabulary and special tokens)."""
    def signature(tok) -> tuple:  # noqa: ANN001
        return (tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

    reference = signature(tokenizers[0])
    for tok, spec in zip(tokenizers[1:], specs[1:], strict=True):
        if signature(tok) != reference:
            raise ConfigError(
                f"snapshot {_describe(spec)} has a different tokenizer from {_describe(specs[0])}; "
                "all snapshots must share one tokenizer so they read the same tokens"
            )


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (gpt_neox.layers, model.layers, transformer.h, ...)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (n_layers is None or len(module) == n_layers):
            return module
    raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}")


class _StopForward(Exception):
    """Raised by the hook once the activation is captured, so later blocks never run."""


class SnapshotRunner:
    """Runs one snapshot up to the hook point and returns the hooked activations [B, T, d]."""

    def __init__(self, model: nn.Module, hook: HookPoint, name: str = "") -> None:
        blocks = find_blocks(model)
        if hook.layer >= len(blocks):
            raise ConfigError(
                f"sources.hook=blocks.{hook.layer}.hook_resid_{hook.position}: snapshot {name!r} has only "
                f"{len(blocks)} blocks (0..{len(blocks) - 1})"
            )
        self.model, self.hook, self.name = model, hook, name
        self.block = blocks[hook.layer]
        self.d_model = int(model.config.hidden_size)
        self._captured: torch.Tensor | None = None

    def _capture_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self._captured = hidden
        raise _StopForward

    def _capture_post(self, module: nn.Module, args: tuple, output: object) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.hook.position == "pre":
            handle = self.block.register_forward_pre_hook(self._capture_pre, with_kwargs=True)
        else:
            handle = self.block.register_forward_hook(self._capture_post)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError(f"hook on snapshot {self.name!r} did not fire")
        return captured


@dataclass
class SourceInfo:
    """What the token stream, the crosscoder and the export need to know of the snapshots (no weights)."""

    specs: list[SnapshotSpec]
    tokenizer: object
    d_model: int
    hook: str


@dataclass
class LoadedSources(SourceInfo):
    """The snapshots themselves, ready to run: one runner per snapshot, in `specs` order."""

    runners: list[SnapshotRunner] = field(default_factory=list)


def load_model_config(spec: SnapshotSpec, trust_remote_code: bool = False):  # noqa: ANN201 (HF config type)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load snapshot {_describe(spec)}: {error}") from error


def _class_names(mapping: dict[str, Any], model_type: str | None = None) -> set[str]:
    """The class names of an HF auto mapping (of one model type, or of all); a value may be a tuple of names."""
    values = mapping.values() if model_type is None else [mapping.get(model_type, ())]
    return {name for value in values for name in ((value,) if isinstance(value, str) else value)}


def check_causal_decoder(model_config: Any, spec: SnapshotSpec) -> None:  # noqa: ANN401 (HF config type)
    """Refuse a snapshot that is not a decoder-only causal LM (from its config, before any weights load).

    The crosscoder reads one residual stream per token, and the token stream, the analysis and the spliced-in
    evaluation all assume token t saw only tokens <= t: an encoder-decoder (T5) or a bidirectional encoder (BERT)
    would train without complaint on activations that mean something else. Refused: `is_encoder_decoder`; a model
    type with a masked-LM head (bert, roberta, ...) or an encoder base model unless its config sets `is_decoder`
    (or XLM's `causal`); `architectures` none of which is a causal-LM class (nor a head of a causal model type: its
    base model, the one AutoModel loads and the hooks read, is the same causal decoder); without `architectures`, a
    model type that transformers has no causal LM for.
    """
    from transformers.models.auto import modeling_auto as auto

    causal_types = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model_type = getattr(model_config, "model_type", None) or ""
    architectures = [str(a) for a in getattr(model_config, "architectures", None) or []]
    shown = f"architecture {', '.join(architectures)}" if architectures else f"model_type {model_type!r}"
    reason = None
    # Types whose attention is bidirectional unless configured as a decoder (bert-generation's base is an encoder).
    bidirectional = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | {
        kind for kind in causal_types if any("Encoder" in name for name in _class_names(auto.MODEL_MAPPING_NAMES, kind))
    }
    if getattr(model_config, "is_encoder_decoder", False):
        reason = "an encoder-decoder model"
    elif model_type in bidirectional and not (getattr(model_config, "is_decoder", False)
                                              or getattr(model_config, "causal", False)):
        reason = "a bidirectional encoder (its config does not set is_decoder=True)"
    elif architectures:
        accepted = _class_names(causal_types)
        if model_type in causal_types:
            for heads in (auto.MODEL_MAPPING_NAMES, auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                          auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
                          auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES):
                accepted |= _class_names(heads, model_type)
        if not any(a in accepted or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            reason = "not a causal language model"
    elif model_type not in causal_types:
        reason = "not a causal language model type"
    if reason is not None:
        raise ConfigError(
            f"snapshot {spec.name!r} ({_describe(spec)}, {shown}) is {reason}: the crosscoder reads the residual "
            "stream of a decoder-only causal LM (token t sees only tokens <= t); use causal-LM snapshots"
        )


def planted_specs(cfg: SourcesConfig) -> list[SnapshotSpec]:
    """Synthetic snapshots (`sources.kind=planted`): the revision is a hash of the planted config, so a cache of
    them is never reused for another planted problem."""
    planted = json.dumps(asdict(cfg.planted), sort_keys=True)
    digest = hashlib.sha256(planted.encode()).hexdigest()[:16]
    return [SnapshotSpec(name=f"snapshot{index}", path="planted", revision=digest, step=index)
            for index in range(cfg.planted.n_snapshots)]


def describe_sources(cfg: SourcesConfig, log: Callable[[str], None] = print) -> SourceInfo:
    """Resolve the snapshots and check they are compatible, reading only tokenizers and configs (cheap): one
    tokenizer, one width, the hook within every model, every model a decoder-only causal LM; then fingerprint
    each (a few MB of each local snapshot's weight files; a hub snapshot's commit and config)."""
    if cfg.kind == "planted":  # no model, no tokenizer: activations come from crosscoder.toy.planted
        specs = [replace(spec, fingerprint=snapshot_fingerprint(spec)) for spec in planted_specs(cfg)]
        return SourceInfo(specs=specs, tokenizer=None, d_model=cfg.planted.d_model, hook="planted")
    hook = HookPoint.parse(cfg.hook)
    specs = resolve_snapshots(cfg, log=log)
    tokenizers = [load_tokenizer(spec, cfg.trust_remote_code) for spec in specs]
    check_same_tokenizer(tokenizers, specs)
    widths = []
    for spec in specs:
        model_config = load_model_config(spec, cfg.trust_remote_code)
        check_causal_decoder(model_config, spec)
        width = int(model_config.hidden_size)
        if widths and width != widths[0]:
            raise ConfigError(
                f"snapshot {_describe(spec)} has width {width}, but {_describe(specs[0])} has "
                f"{widths[0]}; all snapshots must share one width"
            )
        n_layers = getattr(model_config, "num_hidden_layers", None)
        if n_layers is not None and hook.layer >= n_layers:
            raise ConfigError(
                f"sources.hook={cfg.hook}: snapshot {spec.name!r} has only {n_layers} blocks (0..{n_layers - 1})"
            )
        widths.append(width)
    # Once per run, after the cheap checks: what each snapshot is, so a cache or a training state made from other
    # weights under the same names is refused (crosscoder.fingerprint).
    specs = [replace(spec, fingerprint=snapshot_fingerprint(spec)) for spec in specs]
    return SourceInfo(specs=specs, tokenizer=tokenizers[0], d_model=widths[0], hook=cfg.hook)


def load_runners(cfg: SourcesConfig, specs: list[SnapshotSpec], device: torch.device, with_lm_head: bool = False
                 ) -> list[SnapshotRunner]:
    """Load every snapshot's weights onto `device` (each activation worker calls this once); `with_lm_head`: the
    causal LMs, whose runners can also run to logits (the spliced-in evaluation)."""
    hook = HookPoint.parse(cfg.hook)
    return [
        SnapshotRunner(load_snapshot_model(spec, cfg.dtype, cfg.trust_remote_code, with_lm_head).to(device), hook,
                       spec.name)
        for spec in specs
    ]


def load_sources(
    cfg: SourcesConfig, device: torch.device, log: Callable[[str], None] = print
) -> LoadedSources:
    """Resolve, check and load all snapshots; raise a ConfigError naming the offending snapshot."""
    info = describe_sources(cfg, log=log)
    runners = load_runners(cfg, info.specs, device)
    log(f"loaded {len(info.specs)} snapshots ({', '.join(s.name for s in info.specs)}) at {cfg.hook}, "
        f"d={info.d_model}")
    return LoadedSources(specs=info.specs, tokenizer=info.tokenizer, d_model=info.d_model, hook=info.hook,
                         runners=runners)
