"""The source-kind registry: one class per `sources.kind`, the config's half and the data half naming the same
kinds, and no branch on a kind's name anywhere else in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from crosscoder.config import KIND_RULES, MODEL_KINDS, SOURCE_KINDS, SourcesConfig
from crosscoder.data.kinds import SOURCE_KIND_REGISTRY, ModelKind, count_sources, source_kind
from crosscoder.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[3] / "crosscoder"
REGISTRY_HOMES = {PACKAGE / "data" / "kinds.py", PACKAGE / "config" / "sources.py"}
# "toy" is also a data.kind; these names are source kinds only.
KIND_NAMES = {"hf", "planted", "files"}


def test_both_halves_name_exactly_the_configs_choices() -> None:
    assert set(SOURCE_KIND_REGISTRY) == set(SOURCE_KINDS) == set(KIND_RULES)
    assert all(name == kind.name for name, kind in SOURCE_KIND_REGISTRY.items())
    assert {name for name, kind in SOURCE_KIND_REGISTRY.items() if isinstance(kind, ModelKind)} == set(MODEL_KINDS)


def test_an_unknown_kind_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"sources.kind='bogus' is not one of hf, toy, planted, files"):
        source_kind("bogus")


def test_counts_come_from_the_kind() -> None:
    planted = SourcesConfig(kind="planted")
    planted.planted.n_snapshots = 5
    assert count_sources(planted) == 5
    hf = SourcesConfig(model="org/model", revisions=["step1", "step2"], hooks=["blocks.0.hook_resid_pre",
                                                                               "blocks.1.hook_resid_pre"])
    assert count_sources(hf) == 4


def _kind_branches(source: str) -> list[int]:
    """Lines comparing something with a source kind's name (==, !=, in, not in)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(value, ast.Constant) and value.value in KIND_NAMES for value in values):
                lines.append(node.lineno)
    return lines


def test_no_module_outside_the_registry_branches_on_a_kind_name() -> None:
    found = {str(path.relative_to(PACKAGE)): lines for path in sorted(PACKAGE.rglob("*.py"))
             if path not in REGISTRY_HOMES and (lines := _kind_branches(path.read_text()))}
    assert found == {}


def test_the_branch_finder_finds_a_planted_branch() -> None:
    """Control: the scan above must see the branches it forbids."""
    assert _kind_branches('if cfg.sources.kind == "planted":\n    pass\nok = kind in ("hf", "toy")\n') == [1, 3]
    assert _kind_branches('if data.kind == "toy":\n    pass\n') == []
