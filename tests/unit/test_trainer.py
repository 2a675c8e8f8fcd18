"""The training loop in-process (one rank, DeepSpeed ZeRO-0), and its schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crosscoder.cli.cache import build_cache
from crosscoder.cli.train import train
from crosscoder.constants import EVAL_FILE, RUN_SUMMARY_FILE, STREAM_POSITION_FILE
from crosscoder.dictionary.io import load_dictionary
from crosscoder.errors import ConfigError
from crosscoder.training.schedules import l1_coefficient, lr_multiplier
from tests.helpers import TINY_TOY, tiny_run_config


def test_lr_schedule_warms_up_holds_and_decays_to_zero() -> None:
    values = [lr_multiplier(step, 100, warmup_steps=10, decay_fraction=0.2) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0
    assert all(v == 1.0 for v in values[10:80])
    assert values[80] == 1.0 and values[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(values[80:], values[81:], strict=False))


def test_l1_warmup_is_linear_then_constant() -> None:
    assert l1_coefficient(0, 4.0, 4) == 1.0
    assert l1_coefficient(3, 4.0, 4) == 4.0
    assert l1_coefficient(50, 4.0, 4) == 4.0
    assert l1_coefficient(0, 4.0, 0) == 4.0


def test_training_learns_and_exports(tiny_snapshots: list, toy_cache: Path, tmp_path: Path,
                                     clean_process_env: None) -> None:
    """Fed by two activation worker processes (the default)."""
    cfg = tiny_run_config(toy_cache, tmp_path / "run")
    cfg.trainer.eval_tokens = 128  # the spliced-in LM loss at the export (crosscoder.evaluation.spliced)
    assert cfg.data.workers.num_workers == 2
    result = train(cfg)
    assert result.steps == 40 and result.tokens_seen == 40 * 128
    ev = result.final_metrics["explained_variance/mean"]
    assert ev > 0.3, f"40 steps on a 3-snapshot d=32 toy should explain a good part of the variance, got {ev}"
    assert 0 < result.final_metrics["l0"] < 128
    model, meta = load_dictionary(result.dictionary_dir)
    assert meta.tokens_seen == 40 * 128 and meta.hook == "blocks.1.hook_resid_pre"
    assert [s["step"] for s in meta.sources] == list(TINY_TOY["snapshot_steps"])
    assert len(meta.input_scale) == 3 and all(scale > 0 for scale in meta.input_scale)
    summary = json.loads((result.output_dir / RUN_SUMMARY_FILE).read_text())
    assert summary["explained_variance/mean"] == pytest.approx(ev)
    assert 0 <= summary["data_wait_fraction_total"] <= 1
    assert torch.isfinite(model.W_dec).all()
    (position,) = json.loads((result.dictionary_dir / STREAM_POSITION_FILE).read_text())
    assert position["kind"] == "online" and position["next_block"] > 40 * 128 // (8 * 15)
    # The export's spliced-in LM loss: in the dictionary folder, in the run summary, in the report.
    evaluated = json.loads((result.dictionary_dir / EVAL_FILE).read_text())
    assert evaluated["n_positions"] >= 128 and evaluated["held_out"]
    trained = evaluated["per_snapshot"]["step12"]
    assert trained["ce_spliced"] < trained["ce_zero"] and 0 < trained["ce_recovered"] <= 1.05, trained
    assert summary["eval/ce_recovered/step12"] == pytest.approx(trained["ce_recovered"])
    assert {f"eval/{key}/step4" for key in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl")} <= set(summary)
    assert "Spliced-in LM loss" in (result.dictionary_dir / "analysis" / "report.html").read_text()


def test_training_from_a_cache(tiny_snapshots: list, toy_cache: Path, tmp_path: Path,
                               clean_process_env: None) -> None:
    """`crosscoder-cache` then training on it: no model runs, same tokens; a too-small cache is refused."""
    cfg = tiny_run_config(toy_cache, tmp_path / "run")
    cfg.data.cache.dir, cfg.data.workers.num_workers = str(tmp_path / "acts"), 1
    build_cache(cfg, log=lambda _: None)
    cfg.data.workers.num_workers = 0
    result = train(cfg)
    assert result.final_metrics["explained_variance/mean"] > 0.3
    (position,) = json.loads((result.dictionary_dir / STREAM_POSITION_FILE).read_text())
    assert position["kind"] == "cache"

    cfg.output_dir = str(tmp_path / "too-long")
    cfg.trainer.total_tokens *= 2
    with pytest.raises(ConfigError, match=r"data.cache.dir=.*holds \d+ tokens for this rank"):
        train(cfg)


def test_bf16_training_exports_the_fp32_master_weights(tiny_snapshots: list, toy_cache: Path, tmp_path: Path,
                                                        clean_process_env: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 the module holds bf16 copies; the export must carry DeepSpeed's fp32 master weights."""
    import crosscoder.training.trainer as trainer_module

    exported: list[dict[str, torch.Tensor]] = []
    real_export = trainer_module.export_dictionary
    monkeypatch.setattr(trainer_module, "export_dictionary",
                        lambda state, meta, out, **kw: (exported.append(state), real_export(state, meta, out, **kw))[1])
    cfg = tiny_run_config(toy_cache, tmp_path / "run")
    cfg.trainer.precision, cfg.trainer.total_tokens, cfg.deepspeed.zero_stage = "bf16", 128 * 6, 2
    cfg.data.workers.num_workers = 0  # snapshots inline
    train(cfg)
    (state,) = exported
    decoder = state["W_dec"]
    assert decoder.dtype == torch.float32
    bf16_exact = (decoder.bfloat16().float() == decoder).float().mean().item()
    assert bf16_exact < 0.5, f"{bf16_exact:.0%} of decoder weights are bf16-rounded: the export lost the fp32 master"
