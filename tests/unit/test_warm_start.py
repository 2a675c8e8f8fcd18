"""Warm start (crosscoder.init_from): an exported dictionary's weights start a run, unfolded into normalised
space with the dictionary's own input scales; a dictionary that cannot start the run is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crosscoder.cli.train import train
from crosscoder.config import RunConfig
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary, load_dictionary
from crosscoder.errors import ConfigError
from crosscoder.training.warm_start import check_warm_start, normalized_weights, warm_start
from tests.helpers import tiny_run_config


def _exported(tmp_path: Path, activation: str = "jumprelu") -> tuple[Crosscoder, Path]:
    torch.manual_seed(0)
    model = Crosscoder(2, 8, 16, activation)
    model.set_input_scale(torch.tensor([4.0, 0.25]))
    with torch.no_grad():
        model.b_dec.normal_()
        model.activation.log_threshold.add_(torch.linspace(-1, 1, 16))
    meta = DictionaryMeta(sources=[{"name": "a"}, {"name": "b"}], hook="h", d_model=8, dict_size=16,
                          activation=activation, k=16, aux_k=0, tokens_seen=0, train_step=0, input_scale=[],
                          training={})
    return model, export_dictionary(model.state_dict(), meta, tmp_path / "dictionary")


def test_the_folded_export_comes_back_in_normalised_space(tmp_path: Path) -> None:
    """Unfolding undoes the export's folding exactly, and a fresh model given those weights and the same input
    scale encodes and reconstructs as the original."""
    model, folder = _exported(tmp_path)
    weights = normalized_weights(folder)
    for name in ("W_enc", "W_dec", "b_dec", "b_enc", "activation.log_threshold"):
        assert torch.allclose(weights[name], model.state_dict()[name], rtol=1e-6, atol=1e-7), name
    fresh = Crosscoder(2, 8, 16, "jumprelu")
    fresh.set_input_scale(model.input_scale.clone())
    warm_start(fresh, folder)
    x = torch.randn(32, 2, 8) * torch.tensor([0.25, 4.0])[None, :, None]
    assert torch.allclose(fresh.encode(x), model.encode(x), atol=1e-6)
    assert torch.allclose(fresh(x).normalized_reconstruction, model(x).normalized_reconstruction, atol=1e-5)
    assert not fresh.is_folded


def test_a_dictionary_that_cannot_start_the_run_is_refused_by_name(tmp_path: Path) -> None:
    _, folder = _exported(tmp_path)
    cfg = RunConfig(output_dir=str(tmp_path / "run"))
    cfg.crosscoder.activation, cfg.crosscoder.dict_size, cfg.crosscoder.init_from = "jumprelu", 16, str(folder)
    assert check_warm_start(cfg, n_sources=2, d_model=8) is not None
    refusal = r"init_from=.*its dict_size 16 \(this run: 32\), snapshots 2 \(this run: 3\)"
    with pytest.raises(ConfigError, match=refusal):
        cfg.crosscoder.dict_size = 32
        check_warm_start(cfg, n_sources=3, d_model=8)
    cfg.crosscoder.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"crosscoder\.init_from=.*nowhere"):
        check_warm_start(cfg, n_sources=2, d_model=8)


def test_a_run_warm_started_from_its_own_export_continues_from_it(tiny_snapshots: list, toy_cache: Path,
                                                                  tmp_path: Path,
                                                                  clean_process_env: None) -> None:  # noqa: F811
    """A second run starting from the first run's dictionary, at a learning rate too small to move it, exports
    (nearly) the same dictionary; the same run from scratch does not."""
    first = tiny_run_config(toy_cache, tmp_path / "first")
    first.data.workers.num_workers, first.trainer.total_tokens = 0, 128 * 10
    trained, _ = load_dictionary(train(first).dictionary_dir)
    second = tiny_run_config(toy_cache, tmp_path / "second")
    second.data.workers.num_workers, second.trainer.total_tokens = 0, 128 * 2
    second.trainer.lr, second.crosscoder.init_from = 1e-9, str(tmp_path / "first" / "dictionary")
    continued, _ = load_dictionary(train(second).dictionary_dir)
    assert torch.allclose(continued.W_dec, trained.W_dec, rtol=1e-3, atol=1e-5)
    assert torch.allclose(continued.b_enc, trained.b_enc, rtol=1e-3, atol=1e-5)
    second.crosscoder.init_from, second.output_dir = "", str(tmp_path / "scratch")
    scratch, _ = load_dictionary(train(second).dictionary_dir)
    assert not torch.allclose(scratch.W_dec, trained.W_dec, rtol=1e-3, atol=1e-5)
