"""Each dictionary family's recipe: the settings it trains well with, filled into the keys the user left unset.

A recipe key is a setting whose schema default is None, read "the family's recipe". `fill_recipe` gives each such
key the chosen family's value, else the fallback every family shares; whatever the user set (on the command line,
in a group file such as trainer=gpu, or in code) is kept. The entry point prints what was filled, so a run's
settings are never a surprise, and the run's saved config holds the filled values (a resume keeps them).

Every value was checked on the planted source (128 features with known histories over 8 snapshots, d=64; 390
steps of 512 tokens, dict_size 512), through the real trainer, over several trainer and planted seeds:
tests/unit/analysis/test_planted_recovery.py drives each family through `crosscoder-train`, and
bench/planted_recipes.py reproduces the search. docs/families.md gives the figures and what else was tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShareOfSteps:
    """A number of steps given as a share of the run's optimiser steps (trainer.total_tokens / batch_size), so
    a warm-up keeps its proportion at any budget."""

    share: float

    def steps(self, total_steps: int) -> int:
        return max(1, round(self.share * total_steps))

    def __str__(self) -> str:
        return f"{self.share:.0%} of the steps"


RECIPE_FALLBACK: dict[str, Any] = {
    "trainer.lr": 1e-3,
    "crosscoder.l1_coeff": 0.0,
    "crosscoder.l1_warmup_steps": ShareOfSteps(0.05),
    "crosscoder.init": "matched_filter",
    "crosscoder.jumprelu.bandwidth": 0.5,
    "crosscoder.jumprelu.initial_threshold": 1.0,
    "crosscoder.jumprelu.preact_coeff": 0.0,
}
"""What a recipe key is where the family's recipe does not name it (a key that does not apply to the family)."""

FAMILY_RECIPES: dict[str, dict[str, Any]] = {
    # lambda 0.5: 0.7 recovers 97%, 1.0 89-90%, 2.0 71-75% (the L1 shrinks weak snapshots' norms: emergence late).
    "relu": {"trainer.lr": 2e-3, "crosscoder.l1_coeff": 0.5},
    # TopK and BatchTopK are learning-rate-bound at this budget: topk 2e-3 recovers 88-95%, batchtopk 4e-3 73%.
    "topk": {"trainer.lr": 4e-3},
    "batchtopk": {"trainer.lr": 1e-2},
    # A threshold starting at 0.1 recovers 38-66% (Anthropic's bandwidth 2 and 0.1); lr 2e-3 93%.
    "jumprelu": {"trainer.lr": 4e-3, "crosscoder.l1_coeff": 5.0, "crosscoder.init": "anthropic_2025",
                 "crosscoder.jumprelu.bandwidth": 0.5, "crosscoder.jumprelu.initial_threshold": 1.0,
                 "crosscoder.jumprelu.preact_coeff": 3e-6},
    # Matched filters leave the gate input pre * 0.1 below any threshold; theta0 1.0 recovers 82%, lm-saes's
    # own start (theta0 0.1, window 2-4) 77-78%; lr 4e-3 93-98%.
    "snapshot_jumprelu": {"trainer.lr": 6e-3, "crosscoder.l1_coeff": 3.0, "crosscoder.init": "anthropic_2025",
                          "crosscoder.jumprelu.bandwidth": 0.3, "crosscoder.jumprelu.initial_threshold": 0.5,
                          "crosscoder.jumprelu.preact_coeff": 0.0},
}
"""Family name -> the recipe keys it sets (the rest take RECIPE_FALLBACK)."""

RECIPE_KEYS: tuple[str, ...] = tuple(RECIPE_FALLBACK)


def recipe_of(family: str) -> dict[str, Any]:
    """Every recipe key's value for `family`: its own recipe over the fallback."""
    return {**RECIPE_FALLBACK, **FAMILY_RECIPES.get(family, {})}


def _parent_and_name(cfg: object, key: str) -> tuple[object, str]:
    *parents, name = key.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    return cfg, name


def get_setting(cfg: object, key: str) -> Any:
    """The value of dotted `key` in a config tree of dataclasses."""
    parent, name = _parent_and_name(cfg, key)
    return getattr(parent, name)


def set_setting(cfg: object, key: str, value: Any) -> None:
    parent, name = _parent_and_name(cfg, key)
    setattr(parent, name, value)


def fill_recipe(cfg: object, family: str, total_steps: int) -> dict[str, Any]:
    """Give every recipe key of `cfg` that is None the value `family`'s recipe says (a share of steps resolved
    against `total_steps`); return the keys filled, with the recipe's own value (a ShareOfSteps stays one)."""
    filled: dict[str, Any] = {}
    for key, value in recipe_of(family).items():
        if get_setting(cfg, key) is None:
            set_setting(cfg, key, value.steps(total_steps) if isinstance(value, ShareOfSteps) else value)
            filled[key] = value
    return filled


def describe_recipe(cfg: object, family: str, filled: dict[str, Any]) -> str:
    """One line: the family's recipe as this run applies it, and the recipe values the user's settings replaced
    (`recipe for jumprelu: trainer.lr=0.004 crosscoder.l1_coeff=5.0 ...; kept your trainer.lr=5e-05`)."""
    own = FAMILY_RECIPES.get(family, {})
    applied, kept = [], []
    for key in (*own, *(key for key in RECIPE_KEYS if key not in own)):
        value = get_setting(cfg, key)
        if key in filled:
            # A warm-up share is the L1's: shown for the families with a sparsity coefficient.
            if key in own or (isinstance(filled[key], ShareOfSteps) and "crosscoder.l1_coeff" in own):
                share = f" ({filled[key]})" if isinstance(filled[key], ShareOfSteps) else ""
                applied.append(f"{key}={value}{share}")
        elif key in own:
            kept.append(f"{key}={value} (the recipe's {own[key]})")
    line = f"recipe for {family}: " + (" ".join(applied) if applied else "nothing left to fill")
    return line + (f"; kept your {', '.join(kept)}" if kept else "")
