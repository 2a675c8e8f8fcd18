"""Exported dictionaries: safetensors weights (normalisation folded out) + JSON metadata + decoder norms.

A dictionary folder is written under a temporary name and renamed into place, so a folder with the final
name is always complete. `load_dictionary` needs nothing from the trainer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from crosscoder.constants import CONFIG_FILE, DECODER_NORMS_FILE, FORMAT_VERSION, WEIGHTS_FILE
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.errors import DictionaryError
from crosscoder.storage import building_dir, save_safetensors


@dataclass
class DictionaryMeta:
    """What a researcher needs to use an exported dictionary and to read its decoder norms."""

    sources: list[dict[str, Any]]
    """One entry per snapshot: name, path, revision, step (training step of the snapshot)."""
    hook: str
    d_model: int
    dict_size: int
    activation: str
    k: int
    aux_k: int
    tokens_seen: int
    train_step: int
    input_scale: list[float]
    """Per-snapshot c_s with x_s * c_s normalised; already folded into the saved weights."""
    normalization_folded: bool = True
    decoder_norms_space: str = "normalised activations (each snapshot scaled to E||x_s||^2 = d)"
    decoder_norm_mean: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    """The run's configuration, for provenance."""
    format_version: int = FORMAT_VERSION
    source_axis: str = "step"
    """What the sources are (sources.models.source_axis): `step` (snapshots of a training run), `layer` (hooks
    of one snapshot at distinct blocks), `hook` or `source` (snapshots x hooks)."""

    @property
    def source_names(self) -> list[str]:
        return [source["name"] for source in self.sources]

    @property
    def source_positions(self) -> list[int | None]:
        """Where each source lies on its axis: the training step, or for layers the block index."""
        key = "layer" if self.source_axis == "layer" else "step"
        return [source.get(key) for source in self.sources]


def build_model(meta: DictionaryMeta) -> Crosscoder:
    return Crosscoder(
        n_sources=len(meta.sources), d_model=meta.d_model, dict_size=meta.dict_size,
        activation=meta.activation, k=meta.k, aux_k=meta.aux_k,
    )


def export_dictionary(
    state_dict: dict[str, torch.Tensor], meta: DictionaryMeta, out_dir: Path, extra_files: dict[str, str] | None = None,
    firing_frequency: torch.Tensor | None = None,
) -> Path:
    """Write a complete dictionary folder at `out_dir` (replacing an older one) from a full state dict.

    `extra_files` (name -> text) land in the same folder in the same atomic rename (e.g. stream positions).
    `firing_frequency` [F] (the share of tokens each latent fired on) is stored beside the decoder norms.
    A state with a NaN or infinite value raises DictionaryError before anything is written, so an older export
    at `out_dir` stays as it was.
    """
    check_finite(state_dict, "the state to export")
    model = build_model(meta)
    model.load_state_dict({name: tensor.detach().float().cpu() for name, tensor in state_dict.items()})
    decoder_norms = model.decoder_norms().detach().contiguous()
    model.fold_normalization()
    meta.input_scale = model.input_scale.tolist()
    meta.normalization_folded = True
    means = decoder_norms.mean(dim=0)
    meta.decoder_norm_mean = {name: means[i].item() for i, name in enumerate(meta.source_names)}

    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    # Folding divides by the input scale: a finite state can still overflow here.
    check_finite({**tensors, "decoder_norms": decoder_norms}, "the folded dictionary")

    out_dir = Path(out_dir)
    with building_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_FILE)
        statistics = {"decoder_norms": decoder_norms}
        if firing_frequency is not None:
            statistics["firing_frequency"] = firing_frequency.detach().float().cpu().contiguous()
        save_safetensors(statistics, tmp / DECODER_NORMS_FILE, metadata={"sources": json.dumps(meta.source_names)})
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(meta), indent=2))  # inside tmp: already atomic
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise DictionaryError naming the first floating-point tensor with a NaN or infinite value."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                raise DictionaryError(
                    f"{what} has {bad} non-finite value(s) (NaN or inf) in {name} {list(tensor.shape)}: the "
                    "training diverged or the state is corrupt; nothing was exported"
                )


def read_meta(path: str | Path) -> DictionaryMeta:
    """The metadata (config.json) of an exported dictionary; DictionaryError naming the file when it is unusable."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not an exported dictionary: {CONFIG_FILE} is missing")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DictionaryError(f"{config_path} is truncated or not valid JSON ({error}); re-export it") from error
    if not isinstance(raw, dict):
        raise DictionaryError(f"{config_path} holds a JSON {type(raw).__name__}, not the dictionary's metadata; "
                              "re-export it")
    if raw.get("format_version") != FORMAT_VERSION:
        raise DictionaryError(f"{config_path}: format_version={raw.get('format_version')!r}, "
                              f"expected {FORMAT_VERSION}")
    try:
        return DictionaryMeta(**raw)
    except TypeError as error:  # a missing or unknown field
        raise DictionaryError(f"{config_path} does not fit the dictionary metadata ({error}); re-export it") from error


def read_tensors(file: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (all, or `names`); DictionaryError naming the file when it is truncated,
    not safetensors, or lacks a tensor."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file.parent} is not an exported dictionary: {file.name} is missing")
    try:
        if names is None:
            return load_file(str(file))
        with safe_open(str(file), framework="pt") as handle:
            available = set(handle.keys())  # (the handle itself supports no `in`)
            missing = [name for name in names if name not in available]
            if missing:
                raise DictionaryError(f"{file} has no tensor {', '.join(missing)}; re-export it")
            return {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as error:
        raise DictionaryError(f"{file} is truncated or not a safetensors file ({error}); re-export it") from error


def load_dictionary(path: str | Path, device: str | torch.device = "cpu") -> tuple[Crosscoder, DictionaryMeta]:
    """The exported crosscoder (eval mode, folded: it takes raw activations) and its metadata.

    FileNotFoundError when a file is missing; DictionaryError naming the file when one is unusable."""
    path = Path(path)
    meta = read_meta(path)
    model = build_model(meta)
    weights = path / WEIGHTS_FILE
    try:
        model.load_state_dict(read_tensors(weights))
    except RuntimeError as error:  # missing, unexpected or wrongly shaped tensors
        cause = " ".join(str(error).split())  # torch's message spans lines; the error is one
        raise DictionaryError(f"{weights} does not match {path / CONFIG_FILE} ({cause}); re-export it") from error
    return model.to(device).eval(), meta


def load_decoder_norms(path: str | Path) -> torch.Tensor:
    """[F, S] per-latent, per-snapshot decoder norms of an exported dictionary (DictionaryError when unusable)."""
    return read_tensors(Path(path) / DECODER_NORMS_FILE, ["decoder_norms"])["decoder_norms"]


def load_firing_frequency(path: str | Path) -> torch.Tensor | None:
    """[F] share of training tokens each latent fired on (sampled at log steps), or None for a dictionary
    exported before any log step or by an older version."""
    return read_tensors(Path(path) / DECODER_NORMS_FILE).get("firing_frequency")  # a small file: read it whole
