"""The activation families on their own: JumpReLU's gate, its straight-through threshold gradient, its penalty
and pre-activation loss against hand-computed values (ReLU, TopK, BatchTopK are covered through the model in
test_model)."""

from __future__ import annotations

import math

import pytest
import torch

from crosscoder.activations import JumpReLU
from crosscoder.checkpoint import DictionaryMeta, export_dictionary, load_dictionary
from crosscoder.config import ConfigError, RunConfig
from crosscoder.model import Crosscoder, estimate_input_scale


def jump(threshold: float = 0.1, bandwidth: float = 0.1, **kwargs: float) -> JumpReLU:
    """float64 with theta exactly `threshold` (the float32 log of 0.1 would be off by 1e-8)."""
    activation = JumpReLU(k=1, dict_size=2, bandwidth=bandwidth, initial_threshold=threshold, **kwargs).double()
    activation.log_threshold.data.fill_(math.log(threshold))
    return activation


def test_jumprelu_gate_and_its_straight_through_gradients_by_hand() -> None:
    """theta = 0.1, eps = 0.1: the kernel is 1 where |pre - theta| < 0.05. pre 0.08 is below the threshold but
    in the window; 0.12 above and in it; 0.3 and 0.5 outside. Upstream gradient g = [[1, 2], [3, 4]]:
    d pre = g * gate; d theta_0 = -(theta / eps) (g[0,0] + g[1,0]) = -(1)(1 + 3) = -4, d theta_1 = 0; the
    log-threshold gets theta * d theta = -0.4 (the theta-space pseudo-derivative chained through exp)."""
    activation = jump()
    pre = torch.tensor([[0.08, 0.3], [0.12, 0.5]], dtype=torch.float64, requires_grad=True)
    codes = activation(pre, torch.ones(2, dtype=torch.float64))
    assert torch.equal(codes.detach(), torch.tensor([[0.0, 0.3], [0.12, 0.5]], dtype=torch.float64))
    codes.backward(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    assert torch.equal(pre.grad, torch.tensor([[0.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    expected = torch.tensor([-4.0 * 0.1, 0.0], dtype=torch.float64)
    assert torch.allclose(activation.log_threshold.grad, expected, rtol=1e-12, atol=1e-15)


def test_jumprelu_pre_gradient_is_exact_away_from_the_threshold() -> None:
    """Away from the jump the gate is locally constant, so d f / d pre is the true derivative (gradcheck)."""
    activation = jump()
    pre = torch.tensor([[0.5, -0.2, 0.01], [0.9, 0.3, -1.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.ones(3, dtype=torch.float64)
    activation.log_threshold.requires_grad_(False)
    activation.log_threshold.data = torch.full((3,), math.log(0.1), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: activation(p, weight), (pre,), eps=1e-6)


def test_jumprelu_penalty_and_pre_activation_loss_by_hand() -> None:
    """Penalty sum_i tanh(c f_i w_i), batch mean; pre-activation loss sum_i ReLU(theta_i - pre_i) w_i."""
    activation = jump(threshold=0.2, tanh_scale=4.0)
    codes = torch.tensor([[0.0, 0.5], [0.3, 0.0]], dtype=torch.float64)
    weight = torch.tensor([2.0, 0.5], dtype=torch.float64)
    penalty = ((math.tanh(4 * 0.5 * 0.5)) + math.tanh(4 * 0.3 * 2.0)) / 2
    assert activation.penalty(codes, weight).item() == pytest.approx(penalty, rel=1e-12)
    pre = torch.tensor([[0.1, 0.5], [-0.3, 0.15]], dtype=torch.float64)
    preact = ((0.2 - 0.1) * 2.0 + (0.2 + 0.3) * 2.0 + (0.2 - 0.15) * 0.5) / 2
    assert activation.preactivation_loss(pre, weight).item() == pytest.approx(preact, rel=1e-12)


def test_jumprelu_crosscoder_loss_is_its_three_terms() -> None:
    torch.manual_seed(0)
    model = Crosscoder(3, 8, 16, "jumprelu", activation_options={"preact_coeff": 0.01, "initial_threshold": 0.05})
    x = torch.randn(32, 3, 8)
    out = model(x, l1_coeff=0.5)
    pre = model.encode_pre(x)
    weight = model.decoder_norms().sum(dim=1)
    codes = pre * (pre > 0.05)
    recon = model.decode_normalized(codes)
    mse = (x * model.input_scale[None, :, None] - recon).pow(2).sum(dim=(1, 2)).mean()
    penalty = torch.tanh(4.0 * codes * weight).sum(dim=1).mean()
    preact = ((0.05 - pre).relu() * weight).sum(dim=1).mean()
    assert torch.allclose(out.codes, codes)
    assert torch.allclose(out.loss, mse + 0.5 * penalty + 0.01 * preact, rtol=1e-5)
    assert torch.allclose(out.aux_loss, preact, rtol=1e-5)
    out.loss.backward()
    assert model.activation.log_threshold.grad is not None and model.activation.log_threshold.grad.abs().sum() > 0


def test_exported_jumprelu_dictionary_reproduces_training_time_codes(tmp_path) -> None:  # noqa: ANN001
    """The thresholds travel in the export; folding the input scale into the encoder leaves the pre-activations,
    so the same thresholds gate the raw activations of the loaded dictionary."""
    torch.manual_seed(1)
    model = Crosscoder(2, 8, 16, "jumprelu", activation_options={"initial_threshold": 0.2})
    x = torch.randn(64, 2, 8) * torch.tensor([5.0, 0.1])[None, :, None]
    model.set_input_scale(estimate_input_scale([x]))
    with torch.no_grad():
        model.activation.log_threshold.add_(torch.linspace(-1, 1, 16))
    expected = model.encode(x)
    meta = DictionaryMeta(sources=[{"name": "a"}, {"name": "b"}], hook="h", d_model=8, dict_size=16,
                          activation="jumprelu", k=16, aux_k=0, tokens_seen=0, train_step=0, input_scale=[],
                          training={})
    loaded, _ = load_dictionary(export_dictionary(model.state_dict(), meta, tmp_path / "dictionary"))
    assert torch.allclose(loaded.activation.threshold(), model.activation.threshold())
    assert torch.allclose(loaded.encode(x), expected, atol=1e-5)
    assert (expected > 0).any() and (expected == 0).any()


def test_jumprelu_settings_are_validated() -> None:
    cfg = RunConfig(output_dir="/tmp/unused")
    cfg.sources.kind, cfg.crosscoder.activation = "toy", "jumprelu"
    cfg.crosscoder.jumprelu.bandwidth = 0.0
    with pytest.raises(ConfigError, match=r"crosscoder\.jumprelu\.bandwidth=0\.0 must be > 0"):
        cfg.validate()
    cfg.crosscoder.jumprelu.bandwidth = 0.1
    cfg.sources.steps, cfg.parallel.snapshot_parallel = [0, 1], 2
    with pytest.raises(ConfigError, match="jumprelu cannot be split by snapshot"):
        cfg.validate()
    with pytest.raises(ValueError, match="cannot be split by snapshot"):
        Crosscoder(2, 4, 8, "jumprelu", snapshot_share=range(0, 1))
