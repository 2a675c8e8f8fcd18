"""The parallelism plan: which ZeRO stage runs and what DeepSpeed is told."""

from __future__ import annotations

import pytest

from crosscoder.config import RunConfig
from crosscoder.errors import ConfigError
from crosscoder.parallel.engine import deepspeed_config, resolve_zero_stage


def test_zero_stage_from_hydra_then_launcher_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default shards over several data-parallel ranks; over one there is nothing to shard: ZeRO-0."""
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    assert resolve_zero_stage(None, data_parallel=2) == 2
    assert resolve_zero_stage(None, data_parallel=1) == 0
    assert resolve_zero_stage(1, data_parallel=1) == 1
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert resolve_zero_stage(None, data_parallel=1) == 3
    assert resolve_zero_stage(3, data_parallel=2) == 3


def test_conflicting_zero_stages_name_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match=r"zero_stage=1.*zero_stage=3"):
        resolve_zero_stage(1, data_parallel=2)


def test_deepspeed_config_reflects_the_run() -> None:
    cfg = RunConfig(output_dir="/tmp/unused")
    cfg.trainer.precision, cfg.trainer.grad_clip = "bf16", 0.5
    cfg.deepspeed.offload_optimizer = "cpu"
    cfg.deepspeed.extra = {"wall_clock_breakdown": True}
    config = deepspeed_config(cfg, micro_batch_size=512, zero_stage=2)
    assert config["train_micro_batch_size_per_gpu"] == 512
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["gradient_clipping"] == 0.5
    assert config["wall_clock_breakdown"] is True
    assert "optimizer" not in config  # a torch optimizer: no fused-Adam JIT build
    cfg.trainer.grad_clip = 0
    zero3 = deepspeed_config(cfg, 8, 3)
    assert "gradient_clipping" not in zero3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_extra_deepspeed_settings_are_laid_over_ours_key_by_key() -> None:
    """`deepspeed.extra` tunes one ZeRO knob (e.g. the gradient bucket) without dropping the stage or offload."""
    cfg = RunConfig(output_dir="/tmp/unused")
    cfg.deepspeed.offload_optimizer = "cpu"
    cfg.deepspeed.extra = {"zero_optimization": {"reduce_bucket_size": 50_000_000}, "steps_per_print": 10}
    config = deepspeed_config(cfg, micro_batch_size=8, zero_stage=2)
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                           "reduce_bucket_size": 50_000_000}
    assert config["steps_per_print"] == 10
