"""Recovery of planted features by a dictionary trained on `sources.kind=planted`: the ground truth is drawn
again from the planted config saved in the dictionary's metadata, so nothing but the dictionary is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from crosscoder.analysis.features.matching import Recovery, recovery
from crosscoder.config import PlantedSourceConfig
from crosscoder.constants import WEIGHTS_FILE
from crosscoder.data.kinds import SOURCE_KIND_REGISTRY
from crosscoder.dictionary.io import load_decoder_norms, read_meta


def planted_config(training: dict[str, Any]) -> PlantedSourceConfig | None:
    """The planted problem a run trained on, or None when its sources were real snapshots."""
    sources = training.get("sources") or {}
    kind = SOURCE_KIND_REGISTRY.get(sources.get("kind", "hf"))
    if kind is None or not kind.has_ground_truth:
        return None
    merged = OmegaConf.merge(OmegaConf.structured(PlantedSourceConfig), sources.get("planted") or {})
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def planted_recovery(dictionary_dir: str | Path) -> Recovery | None:
    """Match the dictionary to the planted features (None for a dictionary of real snapshots).

    Exported weights have the input normalisation folded out (W_dec[:, s] / c_s); the truth lives in the
    normalised space, so the decoder is scaled back by c_s before matching, and emergence uses the saved
    normalised-space decoder norms, as the report does."""
    from crosscoder.data.planted import planted_truth

    path = Path(dictionary_dir)
    meta = read_meta(path)
    cfg = planted_config(meta.training)
    if cfg is None or len(meta.sources) == 1 < cfg.n_snapshots:  # one snapshot's SAE (method.snapshot, a stack's
        return None  # dictionary): no emergence to score; the stack is scored whole (stack_report)
    truth = planted_truth(cfg)
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as weights:
        decoder = weights.get_tensor("W_dec")
    if decoder.shape[1:] != truth.decoder.shape[1:]:
        raise ValueError(f"{path}: W_dec {list(decoder.shape)} does not fit the planted problem in its metadata "
                         f"({cfg.n_snapshots} snapshots, d={cfg.d_model})")
    normalized = decoder * torch.tensor(meta.input_scale)[None, :, None]
    return recovery(normalized, truth.decoder, truth.emergence, learned_norms=load_decoder_norms(path))
