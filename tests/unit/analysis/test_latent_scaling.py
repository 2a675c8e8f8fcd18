"""Latent scaling: the beta fits against hand-computed values, streaming equal to one pass, a hand-built
crosscoder with a shrunk decoder flagged (and a truly absent feature and a full-norm one not), and the CLI
writing the columns, the flag, the plot and the counts for a dictionary of planted features."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from crosscoder.analysis.diagnostics.scaling import (
    NU_PRESENT,
    SCALING_COLUMNS,
    SHRINKAGE_MARGIN,
    LatentScalingAccumulator,
    latent_scaling,
    normalized_decoder,
)
from crosscoder.cli.analyze import main
from crosscoder.dictionary.crosscoder import Crosscoder
from tests.helpers import _planted_dictionary

NAMES = ["early", "late"]


def test_beta_matches_the_hand_computed_least_squares_scale() -> None:
    """One latent, 2 snapshots, d=2, 4 tokens (one silent). Reference snapshot 1 (the larger decoder), direction
    e0: beta_s = sum_n f_n <d_ref, y_ns> / (||d_ref||^2 sum_n f_n^2) for y = x (activation) and
    y = r + f d_own (error); nu = beta_s / beta_ref; nu_own along the snapshot's own direction."""
    decoder = torch.tensor([[[0.0, 0.1], [2.0, 0.0]]])  # [F=1, S=2, d=2]: snapshot 0 points along e1
    f = torch.tensor([[1.0], [2.0], [0.5], [0.0]])
    x = torch.tensor([[[1.0, 0.2], [2.0, 1.0]], [[3.0, -1.0], [4.0, 0.0]], [[0.0, 2.0], [1.0, 1.0]],
                      [[9.0, 9.0], [9.0, 9.0]]])
    r = torch.tensor([[[0.5, 0.0], [0.1, 0.3]], [[1.0, 1.0], [-0.2, 0.0]], [[-1.0, 0.4], [0.3, 0.0]],
                      [[7.0, 7.0], [7.0, 7.0]]])
    acc = LatentScalingAccumulator(decoder)
    acc.add_normalized(f, x, r)
    result = acc.result(NAMES, min_active_tokens=1)

    fs, sq = [1.0, 2.0, 0.5], 1 + 4 + 0.25
    d_ref = (2.0, 0.0)
    d_own = [(0.0, 0.1), (2.0, 0.0)]

    def dot(u: tuple[float, float], v: list[float]) -> float:
        return u[0] * v[0] + u[1] * v[1]

    def beta(target: torch.Tensor, s: int, own: bool, direction: tuple[float, float]) -> float:
        total = 0.0
        for n, fn in enumerate(fs):
            y = target[n, s].tolist()
            if own:
                y = [y[0] + fn * d_own[s][0], y[1] + fn * d_own[s][1]]
            total += fn * dot(direction, y)
        return total / (dot(direction, list(direction)) * sq)

    act = [beta(x, s, False, d_ref) for s in range(2)]
    err = [beta(r, s, True, d_ref) for s in range(2)]
    assert result.reference.tolist() == [1]
    assert result.beta_activation[0].tolist() == pytest.approx(act, rel=1e-6)
    assert result.beta_error[0].tolist() == pytest.approx(err, rel=1e-6)
    assert result.nu_error[0].tolist() == pytest.approx([err[0] / err[1], 1.0], rel=1e-6)
    assert result.nu_activation[0].tolist() == pytest.approx([act[0] / act[1], 1.0], rel=1e-6)
    # Own direction at snapshot 0 is e1 (norm 0.1): the same fit per unit direction, relative to the reference's
    # magnitude per unit code (beta_ref * ||d_ref||).
    own0 = beta(r, 0, True, d_own[0]) * 0.1
    assert result.nu_own[0, 0].item() == pytest.approx(own0 / (err[1] * 2.0), rel=1e-6)
    assert result.active_tokens[0].tolist() == [3, 3]
    assert result.norm_ratio[0].tolist() == pytest.approx([0.05, 1.0])
    nu0 = err[0] / err[1]
    assert result.flagged[0].tolist() == [nu0 >= NU_PRESENT and nu0 >= 0.05 + SHRINKAGE_MARGIN, False]


def test_streaming_over_batches_equals_one_pass_and_shared_codes_equal_per_snapshot_ones() -> None:
    torch.manual_seed(0)
    model = Crosscoder(3, 8, 16, "relu")
    model.set_input_scale(torch.tensor([2.0, 1.0, 0.5]))
    x = torch.randn(300, 3, 8)
    names = ["a", "b", "c"]
    unfolded = latent_scaling(model, [x], names)
    model.fold_normalization()  # as exported: the fits live in normalised space either way
    whole = latent_scaling(model, [x], names)
    assert torch.allclose(unfolded.beta_error, whole.beta_error, rtol=1e-4, atol=1e-5, equal_nan=True)
    streamed = latent_scaling(model, x.split(37), names)
    for field in ("beta_error", "beta_activation", "nu_error", "nu_activation", "nu_own"):
        assert torch.allclose(getattr(whole, field), getattr(streamed, field), rtol=1e-4, atol=1e-5, equal_nan=True)
    assert torch.equal(whole.active_tokens, streamed.active_tokens) and whole.n_tokens == streamed.n_tokens == 300

    # A [B, F] code is the same in every snapshot: expanding it to [B, S, F] changes nothing.
    scale = model.input_scale[None, :, None]
    codes = model.encode(x)
    residual = (x - model.decode(codes)) * scale
    shared, per_snapshot = (LatentScalingAccumulator(normalized_decoder(model)) for _ in range(2))
    shared.add_normalized(codes, x * scale, residual)
    per_snapshot.add_normalized(codes[:, None].expand(-1, 3, -1).clone(), x * scale, residual)
    for name in ("sq", "active", "ref_x", "ref_r", "own_r"):
        assert torch.allclose(getattr(shared, name), getattr(per_snapshot, name))


ROTATED_COS = 0.3
"""Cosine between feature E's snapshot-0 and snapshot-1 directions."""


def _hand_built() -> tuple[Crosscoder, torch.Tensor]:
    """A ReLU crosscoder over 2 snapshots (d=8) and activations from 5 features:
    A (e0) in both snapshots, read by latent 0 from snapshot 1, whose snapshot-0 decoder is shrunk to 1%;
    B (e1) in snapshot 1 only, latent 1 (snapshot-0 decoder a tiny vector elsewhere); C (e2) in both, latent 2,
    full norm; D (e3) in both, split over latent 3 (snapshot 1's decoder) and latent 4 (snapshot 0's): the
    snapshot-0 share of D is reconstructed by another latent; E in both, turned between the snapshots (e6 at
    snapshot 1, cosine ROTATED_COS to it at snapshot 0), latent 5, its snapshot-0 decoder shrunk to 5% but
    pointing the right way."""
    e = torch.eye(8)
    turned = ROTATED_COS * e[6] + (1 - ROTATED_COS**2) ** 0.5 * e[7]
    model = Crosscoder(2, 8, 6, "relu")
    with torch.no_grad():
        model.W_enc.zero_()
        model.W_dec.zero_()
        model.W_enc[1, :, 0], model.W_dec[0, 0], model.W_dec[0, 1] = e[0], 0.01 * e[0], e[0]
        model.W_enc[1, :, 1], model.W_dec[1, 0], model.W_dec[1, 1] = e[1], 0.01 * e[5], e[1]
        model.W_enc[:, :, 2], model.W_dec[2] = e[2] / 2, e[2].expand(2, 8)
        model.W_enc[1, :, 3], model.W_dec[3, 1] = e[3], e[3]
        model.W_enc[0, :, 4], model.W_dec[4, 0] = e[3], e[3]
        model.W_enc[1, :, 5], model.W_dec[5, 0], model.W_dec[5, 1] = e[6], 0.05 * turned, e[6]
    gen = torch.Generator().manual_seed(0)
    n = 4000
    coeff = (0.5 + torch.rand(n, 5, generator=gen)) * (torch.rand(n, 5, generator=gen) < 0.3)
    x = 0.01 * torch.randn(n, 2, 8, generator=gen)
    directions = [(e[0], e[0]), (None, e[1]), (e[2], e[2]), (e[3], e[3]), (turned, e[6])]
    for j, per_snapshot in enumerate(directions):
        for s, direction in enumerate(per_snapshot):
            if direction is not None:
                x[:, s] += coeff[:, j:j + 1] * direction
    return model, x


def test_a_shrunk_decoder_is_flagged_a_truly_absent_feature_and_a_full_norm_one_are_not() -> None:
    model, x = _hand_built()
    result = latent_scaling(model, x.split(1000), NAMES)
    assert result.norm_ratio[:, 0].tolist() == pytest.approx([0.01, 0.01, 1.0, 0.0, 1.0, 0.05])
    assert result.flagged.tolist() == [[True, False]] + [[False, False]] * 5
    assert result.artefact.tolist() == [True, False, False, False, False, False]
    assert result.flagged_snapshots(0) == ["early"]
    assert result.nu_error[0, 0].item() == pytest.approx(1.0, abs=0.05)  # A is all there in snapshot 0
    assert abs(result.nu_error[1, 0].item()) < 0.05  # B is not
    # D: the other latent reconstructs it, so the error target finds nothing; the activation target does.
    assert abs(result.nu_error[3, 0].item()) < 0.05 and result.nu_activation[3, 0].item() == pytest.approx(1, abs=0.05)
    # E turned: along the reference direction only its cosine shows (not flagged: the flag errs towards absent);
    # along the latent's own snapshot-0 direction it is all there.
    assert result.nu_error[5, 0].item() == pytest.approx(ROTATED_COS, abs=0.05)
    assert result.nu_own[5, 0].item() == pytest.approx(1.0, abs=0.05)
    summary = result.summary()
    assert summary["latents_flagged"] == 1 and summary["share_flagged"] == pytest.approx(1 / 6)
    assert summary["flagged_per_snapshot"] == [1, 0]
    # A dead latent is never flagged.
    dead = torch.tensor([True, False, False, False, False, False])
    assert not latent_scaling(model, [x], NAMES, dead=dead).artefact.any()


def test_cli_writes_scaling_columns_flag_plot_and_counts_for_a_planted_dictionary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dictionary, shrunk, emerging = _planted_dictionary(tmp_path / "dictionary")
    main([str(dictionary), "--scaling-tokens", "8000"])
    assert "latent scaling: 1 of 8 live latents flagged" in capsys.readouterr().out
    out = dictionary / "analysis"
    rows = list(csv.DictReader((out / "features.csv").open()))
    names = [f"snapshot{s}" for s in range(3)]
    for column in ("scaling_reference", "shrinkage_artefact", "shrinkage_snapshots",
                   *[f"{c}@{name}" for c in SCALING_COLUMNS for name in names]):
        assert column in rows[0], column
    assert [row["feature"] for row in rows if row["shrinkage_artefact"] == "True"] == [str(shrunk)]
    assert rows[shrunk]["shrinkage_snapshots"] == "snapshot0" and float(rows[shrunk]["nu@snapshot0"]) > 0.5
    assert float(rows[shrunk]["n@snapshot0"]) < 0.5
    assert float(rows[emerging]["n@snapshot0"]) < 0.5 and abs(float(rows[emerging]["nu@snapshot0"])) < 0.5
    summary = json.loads((out / "summary.json").read_text())["latent_scaling"]
    assert summary["latents_flagged"] == 1 and summary["tokens"] == 8000 and summary["nu_present"] == 0.5
    assert (out / "scaling.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "Latent scaling" in page and "shrinkage artefact at" in page

    main([str(dictionary), "--scaling-tokens", "0", "--out", str(tmp_path / "without")])
    assert "shrinkage_artefact" not in (tmp_path / "without" / "features.csv").read_text().splitlines()[0]
    assert not (tmp_path / "without" / "scaling.png").exists()


def test_a_per_snapshot_gate_is_fitted_only_where_its_gate_opens() -> None:
    """A snapshot_jumprelu latent whose snapshot-1 decoder is tiny has its gate closed there: no fit (NaN) and no
    flag at snapshot 1, while snapshot 0 (its reference) gets nu = 1; streaming equals one pass on [B, S, F]."""
    torch.manual_seed(4)
    model = Crosscoder(2, 8, 16, "snapshot_jumprelu", activation_options={"initial_threshold": 0.005})
    with torch.no_grad():
        model.W_dec[5, 1] *= 1e-4
    x = torch.randn(400, 2, 8)
    codes = model.encode(x)
    assert codes.shape == (400, 2, 16) and (codes[:, 0, 5] > 0).sum() >= 10 and not (codes[:, 1, 5] > 0).any()
    whole = latent_scaling(model, [x], ["a", "b"])
    streamed = latent_scaling(model, x.split(64), ["a", "b"])
    assert torch.allclose(whole.nu_error, streamed.nu_error, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert whole.nu_error[5, 0].item() == pytest.approx(1.0)
    assert math.isnan(whole.nu_error[5, 1].item()) and not whole.flagged[5].any()
