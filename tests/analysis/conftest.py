"""An exported dictionary with known classes, written by `crosscoder.checkpoint.export_dictionary`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from crosscoder.checkpoint import DictionaryMeta, export_dictionary
from crosscoder.model import Crosscoder

N_SOURCES, D_MODEL = 4, 8
# Per-group normalised decoder norms over the 4 snapshots, and how many latents follow each.
GROUPS = [
    ("persistent", 0, [1.0, 1.0, 0.9, 1.0], 8),
    ("emerging", 1, [0.1, 0.6, 0.9, 1.0], 8),
    ("emerging", 2, [0.1, 0.2, 0.7, 1.0], 8),
    ("vanishing", 0, [1.0, 0.8, 0.3, 0.1], 6),
    ("transient", 1, [0.2, 1.0, 0.6, 0.2], 6),
    ("dead", -1, [0.0, 0.0, 0.0, 0.0], 4),
]
EXPECTED_CLASSES = {"persistent": 8, "emerging": 16, "vanishing": 6, "transient": 6, "dead": 4}
EXPECTED_EMERGENCE = [14, 14, 8, 0]  # persistent + vanishing at 0; emerging(1) + transient at 1; emerging(2) at 2
# Strongly non-uniform input scales: the folded W_dec norms differ from the normalised ones by these factors,
# so trajectories computed from raw W_dec norms would give different classes.
INPUT_SCALE = torch.tensor([4.0, 1.0, 1.0, 0.25])
SOURCES = [
    {"name": "step0", "path": "toy", "revision": "step0", "step": 0},
    {"name": "step64", "path": "toy", "revision": "step64", "step": 64},
    {"name": "step512", "path": "toy", "revision": "step512", "step": 512},
    {"name": "final", "path": "/models/final", "revision": None, "step": None},
]


def expected_norms() -> torch.Tensor:
    return torch.cat([torch.tensor(norms).expand(count, N_SOURCES) for _, _, norms, count in GROUPS])


def write_dictionary(path: Path, firing_frequency: torch.Tensor | None = None) -> Path:
    norms = expected_norms()
    dict_size = norms.shape[0]
    torch.manual_seed(0)
    model = Crosscoder(N_SOURCES, D_MODEL, dict_size, "topk", k=4)
    model.set_input_scale(INPUT_SCALE)
    with torch.no_grad():
        directions = torch.randn(dict_size, N_SOURCES, D_MODEL)
        model.W_dec.copy_(directions / directions.norm(dim=-1, keepdim=True) * norms[..., None])
    meta = DictionaryMeta(
        sources=[dict(s) for s in SOURCES], hook="blocks.1.hook_resid_pre", d_model=D_MODEL, dict_size=dict_size,
        activation="topk", k=4, aux_k=0, tokens_seen=1_000_000, train_step=500, input_scale=[1.0] * N_SOURCES,
        training={"trainer": {"lr": 1e-3}},
    )
    return export_dictionary(model.state_dict(), meta, path, firing_frequency=firing_frequency)


@pytest.fixture
def dictionary_dir(tmp_path: Path) -> Path:
    return write_dictionary(tmp_path / "dictionary")
