"""Embedded default: a tiny GPT-NeoX trained locally, with snapshots over training."""

from crosscoder.toy.corpus import generate_corpus
from crosscoder.toy.tiny_lm import ToyLMConfig, ToySnapshot, ensure_toy_snapshots

__all__ = ["ToyLMConfig", "ToySnapshot", "ensure_toy_snapshots", "generate_corpus"]
