"""The family registry is the one list of dictionary families: the config's choices, the Hydra groups and the
model all agree with it, and a second family of one name is refused."""

from pathlib import Path
from typing import get_args

import pytest
from omegaconf import OmegaConf

from crosscoder.config import RunConfig
from crosscoder.config.dictionary import ACTIVATION_NAMES, Family
from crosscoder.config.recipes import FAMILY_RECIPES, RECIPE_KEYS, get_setting, recipe_of
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


def test_every_family_has_a_recipe_over_the_recipe_keys_and_no_group_file_sets_them() -> None:
    """The recipes name only recipe keys (whose schema default is None, "the recipe's"), every family has one,
    and neither the family groups nor trainer/default.yaml set a recipe key (that would count as the user's)."""
    assert set(FAMILY_RECIPES) == set(FAMILIES)
    fresh = RunConfig()
    for key in RECIPE_KEYS:
        assert get_setting(fresh, key) is None, key
    for name, spec in FAMILIES.items():
        assert set(FAMILY_RECIPES[name]) <= set(RECIPE_KEYS)
        assert spec.recipe == recipe_of(name) and set(spec.recipe) == set(RECIPE_KEYS)
    for path in [*CONF.glob("*.yaml"), CONF.parent / "trainer" / "default.yaml"]:
        flat = _flatten(OmegaConf.to_container(OmegaConf.load(path)), f"{path.parent.name}.")
        assert not set(flat) & set(RECIPE_KEYS), path


def _flatten(tree: dict, prefix: str) -> dict:
    flat: dict = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


@pytest.mark.parametrize("name", list(FAMILY_RECIPES))
def test_a_family_chosen_by_name_brings_its_recipe_and_what_the_user_sets_stays(name: str) -> None:
    cfg = RunConfig(output_dir="unused")
    cfg.sources.kind, cfg.crosscoder.activation = "toy", name
    cfg.trainer.total_tokens, cfg.trainer.batch_size = 400_000, 1000  # 400 steps
    cfg.validate()
    recipe = FAMILY_RECIPES[name]
    for key, value in recipe.items():
        assert get_setting(cfg, key) == value, key
    assert cfg.crosscoder.l1_warmup_steps == 20  # 5% of 400 steps
    line = cfg.describe_recipe()
    assert line.startswith(f"recipe for {name}: trainer.lr={recipe['trainer.lr']}") and "kept" not in line

    mine = RunConfig(output_dir="unused")
    mine.sources.kind, mine.crosscoder.activation, mine.trainer.lr = "toy", name, 5e-5
    mine.validate()
    assert mine.trainer.lr == 5e-5
    assert f"kept your trainer.lr=5e-05 (the recipe's {recipe['trainer.lr']})" in mine.describe_recipe()
    assert mine.validate().apply_recipe() == {}  # filled once: a second validate changes nothing


def test_relu_lambda_has_one_value() -> None:
    """The ReLU group and the schema once disagreed (0.5 and 2.0): the recipe is now the one place."""
    cfg = RunConfig(output_dir="unused")
    cfg.sources.kind = "toy"
    assert cfg.validate().crosscoder.l1_coeff == FAMILY_RECIPES["relu"]["crosscoder.l1_coeff"] == 0.5
