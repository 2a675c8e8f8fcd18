"""The family registry is the one list of dictionary families: the config's choices, the Hydra groups and the
model all agree with it, and a second family of one name is refused."""

from pathlib import Path
from typing import get_args

import pytest

from crosscoder.config.dictionary import ACTIVATION_NAMES, Family
from crosscoder.dictionary.activations import Activation, ReLU
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.families import FAMILIES, FamilySpec, family, register

CONF = Path(__file__).resolve().parents[3] / "conf" / "crosscoder"


def test_config_choices_equal_the_registry() -> None:
    assert list(get_args(Family)) == list(ACTIVATION_NAMES) == list(FAMILIES)


def test_every_family_has_its_hydra_group_and_builds() -> None:
    assert sorted(path.stem for path in CONF.glob("*.yaml")) == sorted(FAMILIES)
    for name, spec in FAMILIES.items():
        assert issubclass(spec.activation, Activation) and spec.summary
        model = Crosscoder(2, 4, 8, name, k=2)
        assert isinstance(model.activation, spec.activation)


def test_a_family_registered_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register(FamilySpec("relu", ReLU, "again"))
    with pytest.raises(ValueError, match="not one of"):
        family("gelu")
