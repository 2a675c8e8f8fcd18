"""The causal-decoder check: which HF configs describe a decoder-only causal language model the tool can read.

Read from a snapshot's config alone, before any weights load (crosscoder.sources.models.describe_sources).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crosscoder.errors import ConfigError

if TYPE_CHECKING:
    from crosscoder.sources.spec import SnapshotSpec


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
            f"snapshot {spec.name!r} ({describe_snapshot(spec)}, {shown}) is {reason}: the crosscoder reads the "
            "residual stream of a decoder-only causal LM (token t sees only tokens <= t); use causal-LM snapshots"
        )


def describe_snapshot(spec: SnapshotSpec) -> str:
    return f"{spec.path!r}" + (f" at revision {spec.revision!r}" if spec.revision else "")
