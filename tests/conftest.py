"""Shared fixtures: tiny GPT-NeoX snapshots trained here in seconds, and an offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crosscoder.config import RunConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# What a training run (or a launcher) puts in os.environ about its process group and W&B staging.
# WANDB_SERVICE: the address of the W&B service an in-process run started; a launched job inheriting it would
# share that service (and a killed run's id would stay "in use" there).
PROCESS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_DATA_DIR",
               "CROSSCODER_OWNS_WANDB_DATA_DIR", "WANDB_SERVICE")
TINY_TOY = dict(hidden_size=32, num_layers=2, train_steps=12, snapshot_steps=(0, 4, 12))


def tiny_toy_config(toy_cache: Path, output_dir: str | Path = "unused", model_batch_size: int = 8,
                    toy_documents: int = 200) -> RunConfig:
    """A run config reading the tiny toy snapshots (16-token sequences); callers set the rest."""
    cfg = RunConfig(output_dir=str(output_dir))
    cfg.sources.kind, cfg.sources.hook = "toy", "blocks.1.hook_resid_pre"
    cfg.sources.toy.cache_dir = str(toy_cache)
    for key, value in TINY_TOY.items():
        setattr(cfg.sources.toy, key, list(value) if isinstance(value, tuple) else value)
    cfg.data.seq_len, cfg.data.model_batch_size, cfg.data.toy_documents = 16, model_batch_size, toy_documents
    cfg.trainer.eval_tokens = 0  # the spliced-in evaluation at each export: on only where a test checks it
    return cfg


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build DeepSpeed's CPU communication op once (~35 s on first use, then cached in TORCH_EXTENSIONS_DIR),
    so no test, and no pair of launched ranks, pays for it inside its own time limit."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()


@pytest.fixture
def clean_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """train() describes a one-rank process group in os.environ; undo it so later subprocesses start clean."""
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

    return ensure_toy_snapshots(toy_cache, ToyLMConfig(**TINY_TOY), log=lambda _: None)


@pytest.fixture(scope="session")
def activation_cache(tiny_snapshots: list, toy_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of the tiny toy run, written by `crosscoder-cache`, for every end-to-end test to share."""
    from tests.launching import build_activation_cache

    return build_activation_cache(toy_cache, tmp_path_factory.mktemp("cache-build"))
