"""Fixtures of the launch tier only."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def activation_cache(tiny_snapshots: list, toy_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of the tiny toy run, written by `crosscoder-cache`, for every end-to-end test to share."""
    from tests.helpers import build_activation_cache

    return build_activation_cache(toy_cache, tmp_path_factory.mktemp("cache-build"))
