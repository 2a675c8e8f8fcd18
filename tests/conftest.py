"""Shared fixtures of both tiers: tiny GPT-NeoX snapshots trained here in seconds, an exported dictionary of known
classes, and an offline environment. The builders they use are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from crosscoder.toy import ToySnapshot

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist every worker is one of as many processes as cores: one torch thread each, rather than
    # each worker's threads contending for all the cores (measured: a tier ~1.6x faster than one process).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build DeepSpeed's CPU communication op once (~35 s on first use, then cached in TORCH_EXTENSIONS_DIR),
    so no test, and no pair of launched ranks, pays for it inside its own time limit."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()


@pytest.fixture
def clean_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """train() describes a one-rank process group in os.environ; undo it so later subprocesses start clean."""
    from tests.helpers import PROCESS_ENV

    for key in PROCESS_ENV:
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("toy-cache")


@pytest.fixture(scope="session")
def tiny_snapshots(toy_cache: Path) -> list:
    """Three snapshots (steps 0, 4, 12) of a 2-block, d=32 GPT-NeoX."""
    from crosscoder.toy import ToyLMConfig, ensure_toy_snapshots
    from tests.helpers import TINY_TOY

    return ensure_toy_snapshots(toy_cache, ToyLMConfig(**TINY_TOY), log=lambda _: None)


@pytest.fixture
def dictionary_dir(tmp_path: Path) -> Path:
    """An exported dictionary of known classes (tests.helpers.write_dictionary)."""
    from tests.helpers import write_dictionary

    return write_dictionary(tmp_path / "dictionary")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ToySnapshot]]:
    """The SMALL toy LM's snapshots, built once per test module (tests/unit/toy and tests/launch/toy)."""
    from crosscoder.toy import ensure_toy_snapshots
    from tests.helpers import SMALL

    root = tmp_path_factory.mktemp("toy")
    return root, ensure_toy_snapshots(root, SMALL, log=lambda _: None)
