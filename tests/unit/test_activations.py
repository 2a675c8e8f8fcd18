"""The activation families on their own: JumpReLU's gate, its straight-through threshold gradient, its penalty
and pre-activation loss against hand-computed values (ReLU, TopK, BatchTopK are covered through the model in
test_model)."""

from __future__ import annotations

import math

import pytest
import torch

from crosscoder.config import RunConfig
from crosscoder.dictionary.activations import JumpReLU, SnapshotJumpReLU
from crosscoder.dictionary.crosscoder import Crosscoder, estimate_input_scale
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary, load_dictionary
from crosscoder.errors import ConfigError
from crosscoder.training.metrics import fired_latents


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


def snapshot_jump(threshold: float = 0.1, bandwidth: float = 0.1, **kwargs: float) -> SnapshotJumpReLU:
    activation = SnapshotJumpReLU(k=1, dict_size=2, bandwidth=bandwidth, initial_threshold=threshold,
                                  **kwargs).double()
    activation.log_threshold.data.fill_(math.log(threshold))
    return activation


def test_snapshot_gate_codes_and_threshold_gradient_by_hand() -> None:
    """theta = 0.1, eps = 0.1. One token, pre = [0.2, 0.5]; norms n[latent, snapshot] = [[1, 0.45], [0.1, 2]].
    Gate inputs pre_i n_is: latent 0 -> 0.2 (on), 0.09 (off, in the window |u - theta| < 0.05); latent 1 -> 0.05
    (off, outside it), 1.0 (on). Where on, the code is pre_i: codes[s, i] = [[0.2, 0], [0, 0.5]]. Upstream g = 1
    on the codes is g / n on the gate's output (f = gate / n): d theta_0 = -(theta / eps) / 0.45 (the one in-window
    pair) = -2.22; log theta gets theta * that = -0.222."""
    activation = snapshot_jump()
    pre = torch.tensor([[0.2, 0.5]], dtype=torch.float64, requires_grad=True)
    norms = torch.tensor([[1.0, 0.45], [0.1, 2.0]], dtype=torch.float64, requires_grad=True)
    codes = activation(pre, norms)
    assert codes.shape == (1, 2, 2)
    assert torch.allclose(codes.detach(), torch.tensor([[[0.2, 0.0], [0.0, 0.5]]], dtype=torch.float64))
    codes.sum().backward()
    assert torch.allclose(pre.grad, torch.tensor([[1.0, 1.0]], dtype=torch.float64))  # one open gate each
    assert norms.grad is None  # f = pre where open: no gradient reaches the norms through the codes
    assert torch.allclose(activation.log_threshold.grad, torch.tensor([-0.1 / 0.45, 0.0], dtype=torch.float64))


def test_snapshot_gate_tanh_quad_penalty_by_hand() -> None:
    """p_i = mean over batch and snapshots of tanh(c f[s, i] n_is); penalty sum_i p_i (1 + p_i / scale)."""
    activation = snapshot_jump(tanh_scale=2.0, frequency_scale=0.5)
    codes = torch.tensor([[[0.3, 0.0], [0.0, 0.0]], [[0.1, 0.0], [0.2, 1.0]]], dtype=torch.float64)  # [B, S, F]
    norms = torch.tensor([[1.0, 2.0], [0.5, 1.0]], dtype=torch.float64)  # [F, S]
    p0 = (math.tanh(2 * 0.3 * 1.0) + math.tanh(2 * 0.1 * 1.0) + math.tanh(2 * 0.2 * 2.0)) / 4
    p1 = math.tanh(2 * 1.0 * 1.0) / 4
    expected = p0 * (1 + p0 / 0.5) + p1 * (1 + p1 / 0.5)
    assert activation.penalty(codes, norms).item() == pytest.approx(expected, rel=1e-12)


def test_snapshot_gate_crosscoder_decodes_each_snapshot_with_its_own_codes() -> None:
    """A latent with a tiny decoder in snapshot 1 is on in snapshot 0 and off in 1; the reconstruction of each
    snapshot uses that snapshot's codes; the loss is MSE + l1 * tanh-quad (+ the pre-activation loss)."""
    torch.manual_seed(0)
    model = Crosscoder(2, 8, 16, "snapshot_jumprelu",
                       activation_options={"initial_threshold": 0.005, "preact_coeff": 0.01})
    with torch.no_grad():
        model.W_dec[3, 1] *= 1e-4
    x = torch.randn(64, 2, 8)
    out = model(x, l1_coeff=0.5)
    assert out.codes.shape == (64, 2, 16)
    assert (out.codes[:, 0, 3] > 0).any() and not (out.codes[:, 1, 3] > 0).any()
    recon = torch.stack([out.codes[:, s] @ model.W_dec[:, s] + model.b_dec[s] for s in range(2)], dim=1)
    assert torch.allclose(out.normalized_reconstruction, recon, atol=1e-6)
    norms = model.decoder_norms()
    pre = model.encode_pre(x)
    preact = ((0.005 - pre[:, None, :] * norms.t()[None]).relu() * norms.t()[None]).sum(dim=(1, 2)).mean()
    mse = (x - recon).pow(2).sum(dim=(1, 2)).mean()
    expected = mse + 0.5 * model.activation.penalty(out.codes, norms) + 0.01 * preact
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    out.loss.backward()
    assert model.activation.log_threshold.grad.abs().sum() > 0
    assert fired_latents(out.codes).shape == (16,)


def test_exported_snapshot_gate_reproduces_codes_with_per_snapshot_scales(tmp_path) -> None:  # noqa: ANN001
    """Input scales that differ 50x between snapshots fold into W_enc and W_dec; the gate reads the normalised
    decoder norms, which folding leaves, so the loaded dictionary gives the training-time per-snapshot codes."""
    torch.manual_seed(2)
    model = Crosscoder(2, 8, 16, "snapshot_jumprelu", activation_options={"initial_threshold": 0.02})
    x = torch.randn(64, 2, 8) * torch.tensor([5.0, 0.1])[None, :, None]
    model.set_input_scale(estimate_input_scale([x]))
    with torch.no_grad():
        model.W_dec[:, 1] *= torch.linspace(0.01, 2, 16)[:, None]
    expected = model.encode(x)
    meta = DictionaryMeta(sources=[{"name": "a"}, {"name": "b"}], hook="h", d_model=8, dict_size=16,
                          activation="snapshot_jumprelu", k=16, aux_k=0, tokens_seen=0, train_step=0, input_scale=[],
                          training={})
    loaded, _ = load_dictionary(export_dictionary(model.state_dict(), meta, tmp_path / "dictionary"))
    codes = loaded.encode(x)
    assert torch.allclose(codes, expected, atol=1e-5)
    assert torch.allclose(loaded.decode(codes), model.decode(expected), atol=1e-4)
    gate_differs = ((expected[:, 0] > 0) != (expected[:, 1] > 0)).any()
    assert gate_differs and (expected > 0).any()


@pytest.mark.parametrize("family", ["relu", "jumprelu", "snapshot_jumprelu"])
def test_anthropic_initialisation_and_its_encoder_bias_firing_fraction(family: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """W_dec ~ U(+-1/sqrt(n)) with n = S d, W_enc = (n / F) W_dec^T, and b_enc puts each latent's gate open on the
    set share of the data's tokens (exactly, on the batches it was set from)."""
    torch.manual_seed(3)
    model = Crosscoder(2, 8, 64, family, init="anthropic_2025", activation_options={"initial_threshold": 0.1}
                       if family != "relu" else None)
    bound = 1 / math.sqrt(16)
    assert model.W_dec.abs().max() <= bound and model.W_dec.abs().max() > 0.9 * bound
    assert torch.allclose(model.W_enc, model.W_dec.permute(1, 2, 0) * 16 / 64)
    x = torch.randn(1000, 2, 8)
    model.initialize_encoder_bias([x[:500], x[500:]], firing_fraction=0.05)
    whole = model.b_enc.detach().clone()
    # 7 latents at a time: the same bias
    monkeypatch.setattr("crosscoder.dictionary.crosscoder.INIT_CHUNK_ELEMENTS", 7000)
    model.initialize_encoder_bias([x[:500], x[500:]], firing_fraction=0.05)
    assert torch.allclose(model.b_enc, whole, atol=1e-6)
    codes = model.encode(x)
    fired = (codes > 0).any(dim=1) if codes.dim() == 3 else codes > 0
    assert fired.float().mean(dim=0).sub(0.05).abs().max() <= 0.002


def test_snapshot_gate_and_init_settings_are_validated() -> None:
    cfg = RunConfig(output_dir="/tmp/unused")
    cfg.sources.kind, cfg.crosscoder.activation = "toy", "snapshot_jumprelu"
    cfg.crosscoder.jumprelu.frequency_scale = 0.0
    with pytest.raises(ConfigError, match=r"crosscoder\.jumprelu\.frequency_scale=0\.0 must be > 0"):
        cfg.validate()
    cfg.crosscoder.jumprelu.frequency_scale = 0.01
    cfg.crosscoder.init = "xavier"
    with pytest.raises(ConfigError, match=r"crosscoder\.init='xavier' is not one of"):
        cfg.validate()
    cfg.crosscoder.init, cfg.crosscoder.init_firing_fraction = "anthropic_2025", 1.0
    with pytest.raises(ConfigError, match=r"init_firing_fraction=1\.0 must be in \[0, 1\)"):
        cfg.validate()
    cfg.crosscoder.init_firing_fraction = 0.0
    assert cfg.crosscoder.firing_fraction() == 0.1  # 10000 / 1024, capped
    cfg.crosscoder.dict_size = 1 << 20
    assert cfg.crosscoder.firing_fraction() == pytest.approx(10_000 / (1 << 20))
    assert "frequency_scale" in cfg.crosscoder.activation_options()
    cfg.crosscoder.activation = "jumprelu"
    assert "frequency_scale" not in cfg.crosscoder.activation_options()


def test_snapshot_gate_pre_gradient_is_exact_away_from_the_threshold() -> None:
    """Away from the jump each snapshot's gate is locally constant: d codes / d pre is the true derivative."""
    activation = snapshot_jump(threshold=0.1)
    activation.log_threshold.requires_grad_(False)
    pre = torch.tensor([[0.5, -0.2], [0.9, 0.3], [0.02, 1.5]], dtype=torch.float64, requires_grad=True)
    norms = torch.tensor([[1.0, 0.5], [2.0, 0.01]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: activation(p, norms), (pre,), eps=1e-6)
