"""The crosscoder maths: shapes, losses, gradients, the decoder-norm penalty, normalisation fold-out."""

from __future__ import annotations

import pytest
import torch

from crosscoder.dictionary.crosscoder import Crosscoder, estimate_input_scale


def make(activation: str = "relu", n_sources: int = 3, d_model: int = 8, dict_size: int = 32, **kwargs) -> Crosscoder:
    torch.manual_seed(0)
    return Crosscoder(n_sources, d_model, dict_size, activation, **kwargs)


def test_init_decoder_norm_and_encoder_is_decoder_transpose() -> None:
    model = make(init_decoder_norm=0.07)
    assert torch.allclose(model.W_dec.norm(dim=-1), torch.full((32, 3), 0.07), atol=1e-6)
    assert torch.equal(model.W_enc, model.W_dec.permute(1, 2, 0))
    assert model.W_enc.is_contiguous()


def test_forward_matches_formulas_by_hand() -> None:
    model = make()
    with torch.no_grad():
        model.b_enc.normal_()
        model.b_dec.normal_()
    x = torch.randn(5, 3, 8)
    out = model(x, l1_coeff=0.5)
    pre = sum(x[:, s] @ model.W_enc[s] for s in range(3)) + model.b_enc
    codes = pre.relu()
    recon = torch.stack([codes @ model.W_dec[:, s] + model.b_dec[s] for s in range(3)], dim=1)
    mse = ((x - recon) ** 2).sum(dim=(1, 2)).mean()
    penalty = (codes * model.W_dec.norm(dim=-1).sum(dim=1)).sum(dim=1).mean()
    assert torch.allclose(out.codes, codes, atol=1e-5)
    assert torch.allclose(out.mse_loss, mse, rtol=1e-5)
    assert torch.allclose(out.sparsity_loss, penalty, rtol=1e-5)
    assert torch.allclose(out.loss, mse + 0.5 * penalty, rtol=1e-5)


def test_gradients_match_finite_differences() -> None:
    model = make(n_sources=2, d_model=3, dict_size=4).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    params = tuple(model.parameters())

    def loss_of(*values: torch.Tensor) -> torch.Tensor:
        names = [name for name, _ in model.named_parameters()]
        return torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x, 0.3)).loss

    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-5)


def test_decoder_norm_penalty_turns_a_latent_off_in_one_source() -> None:
    """The penalty is sum_s ||W_dec[i,s]||: shrinking one source's decoder row lowers it (the crosscoder trick)."""
    model = make()
    x = torch.randn(16, 3, 8)
    before = model(x, l1_coeff=1.0).sparsity_loss
    with torch.no_grad():
        model.W_dec[:, 1] = 0
    after = model(x, l1_coeff=1.0).sparsity_loss
    codes = model.encode(x)
    expected = (codes * model.W_dec.norm(dim=-1).sum(dim=1)).sum(dim=1).mean()
    assert after < before
    assert torch.allclose(after, expected)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_topk_selects_on_code_times_decoder_norm(activation: str) -> None:
    model = make(activation, dict_size=6, k=1)
    with torch.no_grad():
        model.W_enc.zero_()
        model.b_enc.copy_(torch.tensor([1.0, 2.0, 0.5, 0.0, 0.0, 0.0]))
        model.W_dec.mul_(0).add_(1.0)
        model.W_dec[0] *= 10  # latent 0: smaller code but ten times the decoder norm -> wins
    x = torch.zeros(4, 3, 8)
    codes = model(x).codes
    assert torch.equal((codes > 0).sum(dim=1), torch.ones(4, dtype=torch.long))
    assert torch.all(codes[:, 0] == 1.0)


def test_topk_keeps_exactly_k_per_token_and_batchtopk_k_times_batch() -> None:
    x = torch.randn(64, 3, 8)
    topk = make("topk", dict_size=32, k=5)
    assert torch.all((topk(x).codes > 0).sum(dim=1) <= 5)
    assert (topk(x).codes > 0).sum(dim=1).float().mean() > 4.5
    batchtopk = make("batchtopk", dict_size=32, k=5)
    codes = batchtopk(x).codes
    assert (codes > 0).sum() == 5 * 64
    assert (codes > 0).sum(dim=1).float().std() > 0  # varies per token, unlike TopK


def test_batchtopk_uses_threshold_in_eval() -> None:
    model = make("batchtopk", dict_size=32, k=4)
    x = torch.randn(256, 3, 8)
    for _ in range(3):
        model(x)
    assert model.activation.threshold > 0
    model.eval()
    single = model.encode(x[:1])
    batch = model.encode(x)[:1]
    assert torch.allclose(single, batch, atol=1e-6)  # no dependence on the rest of the batch
    assert 1 <= (model.encode(x) > 0).sum(dim=1).float().mean() <= 12


def test_aux_loss_only_with_dead_latents_and_gives_them_gradient() -> None:
    model = make("topk", dict_size=32, k=2, aux_k=4)
    x = torch.randn(32, 3, 8)
    assert model(x, dead_mask=torch.zeros(32, dtype=torch.bool)).aux_loss == 0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[10:20] = True
    out = model(x, dead_mask=dead)
    assert out.aux_loss > 0
    model.W_enc.grad = None
    (model.aux_coeff * out.aux_loss).backward()
    grad_per_latent = model.W_enc.grad.abs().sum(dim=(0, 1))
    assert grad_per_latent[10:20].sum() > 0
    assert grad_per_latent[~dead].sum() == 0  # only dead latents are pushed by AuxK


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_fold_normalization_is_exact(activation: str) -> None:
    model = make(activation, k=4)
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(std=0.1)
    scales = torch.tensor([1.0, 30.0, 0.01])
    x = torch.randn(64, 3, 8) * scales[None, :, None]
    model.set_input_scale(estimate_input_scale([x]))
    model.eval()
    before = model(x, l1_coeff=1.0)
    recon = model.decode(before.codes)
    norms = model.decoder_norms()
    model.fold_normalization()
    model.fold_normalization()  # idempotent
    assert model.is_folded
    after = model(x, l1_coeff=1.0)
    assert torch.allclose(after.codes, before.codes, atol=1e-5)
    assert torch.allclose(model.decode(after.codes), recon, rtol=1e-4, atol=1e-6)
    assert torch.allclose(after.loss, before.loss, rtol=1e-5)
    assert torch.allclose(model.decoder_norms(), norms, rtol=1e-5)
    # folded weights act on raw activations without any scale
    raw_pre = torch.einsum("bsd,sdf->bf", x, model.W_enc) + model.b_enc
    assert torch.allclose(raw_pre, model.encode_pre(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="folded"):
        model.set_input_scale(torch.ones(3))


def test_input_scale_normalises_mean_squared_norm_to_d() -> None:
    x = torch.randn(1000, 2, 16) * torch.tensor([3.0, 0.2])[None, :, None]
    scale = estimate_input_scale([x[:500], x[500:]])
    normalised = x * scale[None, :, None]
    assert torch.allclose(normalised.pow(2).sum(dim=-1).mean(dim=0), torch.full((2,), 16.0), rtol=1e-4)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="dict_size=0"):
        Crosscoder(2, 4, 0)
    with pytest.raises(ValueError, match="k=9"):
        Crosscoder(2, 4, 8, "topk", k=9)
    with pytest.raises(ValueError, match="'gelu'"):
        Crosscoder(2, 4, 8, "gelu")
    with pytest.raises(ValueError, match=r"\[4, 2, 5\]"):
        make(n_sources=2, d_model=4)(torch.zeros(4, 2, 5))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_aux", [False, True])
def test_the_sparse_step_has_the_dense_loss_and_every_gradient(activation: str, with_aux: bool) -> None:
    """float64, the same weights and batch: the sparse path (active latents only) and the dense one agree on the
    loss, every loss part, the codes and the gradient of every parameter. Tolerance 1e-12: float64 summation
    order differs (a sparse sum over k terms vs a dense one over F, mostly zeros); a wrong index or a missing
    term would be off by O(1)."""
    torch.manual_seed(3)
    x = torch.randn(64, 3, 8, dtype=torch.float64) * 2
    dead = torch.zeros(48, dtype=torch.bool)
    dead[5::4] = True
    outputs, grads = [], []
    for sparse in (True, False):
        # aux_k=8 of 12 dead latents: some tokens have fewer positive dead pre-activations than that
        model = make(activation, dict_size=48, k=5, aux_k=8, sparse_topk=sparse).double()
        model.set_input_scale(torch.tensor([0.7, 1.3, 2.0], dtype=torch.float64))
        with torch.no_grad():  # a non-zero decoder bias and encoder bias, so their gradients are checked too
            model.b_dec.normal_()
            model.b_enc.normal_(0, 0.1)
        output = model(x, 0.0, dead if with_aux else None)
        output.loss.backward()
        outputs.append(output)
        grads.append({name: param.grad.clone() for name, param in model.named_parameters()})
    sparse_out, dense_out = outputs
    assert (sparse_out.aux_loss > 0) == with_aux
    for part in ("loss", "mse_loss", "aux_loss", "codes", "normalized_reconstruction"):
        torch.testing.assert_close(getattr(sparse_out, part), getattr(dense_out, part), rtol=1e-12, atol=1e-12,
                                   msg=part)
    for name, grad in grads[1].items():
        assert grad.abs().max() > 0 or name == "b_enc", name  # the dense path trains every parameter
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_the_sparse_step_is_used_in_training_only() -> None:
    """Eval (and analysis) reads codes through the dense path: BatchTopK's eval threshold, no graph needed."""
    def graph_names(tensor: torch.Tensor) -> set[str]:
        seen, frontier = {}, [tensor.grad_fn]
        while frontier:
            node = frontier.pop()
            if node is not None and id(node) not in seen:
                seen[id(node)] = type(node).__name__
                frontier.extend(parent for parent, _ in node.next_functions)
        return set(seen.values())

    model = make("batchtopk", dict_size=48, k=5)
    x = torch.randn(64, 3, 8)
    assert "_DecodeActiveBackward" in graph_names(model(x).loss)
    model.eval()
    assert "_DecodeActiveBackward" not in graph_names(model(x).loss)
