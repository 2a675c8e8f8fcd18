"""Embedded sources that need no download: a tiny GPT-NeoX trained locally with snapshots over training
(`tiny_lm`, `corpus`), and synthetic activations from a planted dictionary whose history is known (`planted`).

Imported lazily: the planted generator should not pay for importing transformers.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"ToyLMConfig": "tiny_lm", "ToySnapshot": "tiny_lm", "ensure_toy_snapshots": "tiny_lm",
            "generate_corpus": "corpus"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:  # noqa: ANN401 (whatever the submodule defines)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'crosscoder.toy' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"crosscoder.toy.{_EXPORTS[name]}"), name)
