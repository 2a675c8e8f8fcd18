"""The dictionary families, by name: one registry that the config's choices, the model and the docs read.

A family is its activation class (crosscoder.dictionary.activations), a line saying what it is, and its recipe:
the settings it needs to train well (learning rate, warm-ups, ...), filled into the keys the user leaves unset.
The recipe is configuration, so it lives with the config (crosscoder.config.recipes, which imports no torch and
fills it before anything is built); the registry reads it from there. A new family is one Activation class, one
`register` line and one recipe entry; tests check `crosscoder.config.dictionary.Family` (the `crosscoder.activation`
choices), the recipes and `conf/crosscoder/<name>.yaml` against this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crosscoder.config.recipes import recipe_of
from crosscoder.dictionary.activations import (
    Activation,
    BatchTopK,
    JumpReLU,
    ReLU,
    SnapshotJumpReLU,
    TopK,
)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    activation: type[Activation]
    summary: str

    @property
    def recipe(self) -> dict[str, Any]:
        """Dotted config keys and the values this family trains with, filled in unless the user sets them."""
        return recipe_of(self.name)


FAMILIES: dict[str, FamilySpec] = {}


def register(family: FamilySpec) -> FamilySpec:
    """Add a family; a second family of the same name is refused (two classes answering to one name)."""
    if family.name in FAMILIES:
        raise ValueError(f"dictionary family {family.name!r} is registered twice "
                         f"({FAMILIES[family.name].activation.__name__} and {family.activation.__name__})")
    FAMILIES[family.name] = family
    return family


def family(name: str) -> FamilySpec:
    """The family called `name`; ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"activation={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


register(FamilySpec("relu", ReLU, "ReLU codes, L1 penalty on codes times summed decoder norms"))
register(FamilySpec("topk", TopK, "the k largest codes per token (by code x decoder norm), AuxK for dead latents"))
register(FamilySpec("batchtopk", BatchTopK, "the k x batch largest codes over the batch, AuxK for dead latents"))
register(FamilySpec("jumprelu", JumpReLU, "a learned threshold per latent, one gate for every source, tanh penalty"))
register(FamilySpec("snapshot_jumprelu", SnapshotJumpReLU,
                    "a learned threshold per latent gating each source on its own, tanh-quad penalty"))
