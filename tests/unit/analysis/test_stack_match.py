"""SAE Match over a stack of single-snapshot dictionaries (crosscoder-match) and the evolution analysis of a stack
(crosscoder-analyze): known permutations put back, what folding the input scale and the JumpReLU thresholds is
for, a control of unrelated dictionaries that must match badly, classes and emergence of a hand-built stack, and
one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from crosscoder.analysis.alignment.sae_match import MATCH_QUALITY_FILE, folded_decoder, match_stack, stack_decoders
from crosscoder.analysis.features.planted import planted_config
from crosscoder.analysis.report.dictionary import load_evolution
from crosscoder.analysis.report.stack import stack_planted_recovery
from crosscoder.cli import match as match_cli
from crosscoder.cli.analyze import main as analyze_main
from crosscoder.constants import WEIGHTS_FILE
from crosscoder.data.planted import planted_truth
from crosscoder.dictionary.io import DictionaryMeta, load_decoder_norms, load_firing_frequency, read_tensors
from crosscoder.dictionary.stack import read_stack
from tests.helpers import D_MODEL, DICT_SIZE, hand_built_decoders, write_stack


def drifting_decoders(n_snapshots: int, seed: int, noise: float = 0.03) -> list[torch.Tensor]:
    """Per snapshot [F, d]: the same latents (norms spread over [0.3, 3]), each snapshot a small step from the last."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(DICT_SIZE, D_MODEL, generator=gen)
    base = base / base.norm(dim=1, keepdim=True) * torch.empty(DICT_SIZE, 1).uniform_(0.3, 3.0, generator=gen)
    decoders = [base]
    for _ in range(n_snapshots - 1):
        decoders.append(decoders[-1] + noise * torch.randn(DICT_SIZE, D_MODEL, generator=gen))
    return decoders


def permutations(n_snapshots: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(DICT_SIZE, generator=gen) for _ in range(n_snapshots)]


def test_match_puts_known_permutations_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Snapshot s stores latent perm_s[j] at index j; aligned, latent i of every snapshot is snapshot 0's latent i,
    so the order found for s is perm_s^-1 composed with perm_0, in W_enc, b_enc, W_dec, norms and frequency."""
    decoders, perms = drifting_decoders(4, seed=1), permutations(4, seed=2)
    stored = [w[p] for w, p in zip(decoders, perms, strict=True)]
    stack = write_stack(tmp_path / "stack", stored, tag=[p.float() for p in perms])
    out = tmp_path / "aligned"
    match_cli.main([str(stack), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "snap0 -> snap1: 100.0% of matched pairs" in printed and f"aligned stack: {out}" in printed

    manifest, _ = read_stack(out)
    assert manifest.aligned == "sae_match" and manifest.names == ["snap0", "snap1", "snap2", "snap3"]
    quality = json.loads((out / MATCH_QUALITY_FILE).read_text())
    assert quality["cost"] == "mse" and len(quality["pairs"]) == 3
    assert manifest.details["sae_match"]["pairs"] == quality["pairs"]
    for s, perm in enumerate(perms):
        expected = torch.argsort(perm)[perms[0]]  # perm^-1 then snapshot 0's order
        assert quality["orders"][s] == expected.tolist()
        weights = read_tensors(out / f"snap{s}" / WEIGHTS_FILE)
        source = read_tensors(stack / f"snap{s}" / WEIGHTS_FILE)
        torch.testing.assert_close(weights["W_dec"], source["W_dec"][expected])
        torch.testing.assert_close(weights["W_enc"], source["W_enc"][..., expected])
        assert weights["b_enc"].tolist() == perms[0].float().tolist()  # every snapshot now tags like snapshot 0
        torch.testing.assert_close(load_decoder_norms(out / f"snap{s}"),
                                   load_decoder_norms(stack / f"snap{s}")[expected], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(load_firing_frequency(out / f"snap{s}"), (perms[0].float() + 1) / (10 * DICT_SIZE))
    for pair in quality["pairs"]:
        assert pair["share_above_threshold"] == 1.0 and pair["mean_cosine"] > 0.99 and pair["relative_mse"] < 0.02
    assert (out / "snap0" / WEIGHTS_FILE).read_bytes() == (stack / "snap0" / WEIGHTS_FILE).read_bytes()


def test_input_scales_are_folded_before_matching(tmp_path: Path) -> None:
    """Exported weights are W_dec / c_s. One factor per snapshot leaves the best permutation as it is (it scales
    every pairwise dot product alike), but the residual of the match is only meaningful in the normalised space:
    unfolded, a snapshot 4x larger reads as a terrible fit."""
    decoders, perms = drifting_decoders(3, seed=3), permutations(3, seed=4)
    stack = write_stack(tmp_path / "stack", [w[p] for w, p in zip(decoders, perms, strict=True)],
                        scale=[4.0, 1.0, 0.25])
    folded = stack_decoders(stack)[0]
    torch.testing.assert_close(folded[0].float(), decoders[0][perms[0]])  # normalised space, as decoder norms are
    orders, pairs, _, _ = match_stack(stack)
    raw_orders, raw_pairs, _, _ = match_stack(stack, fold=False)
    for s in (1, 2):
        assert orders[s].tolist() == torch.argsort(perms[s])[perms[0]].tolist() == raw_orders[s].tolist()
    assert all(pair.relative_mse < 0.02 for pair in pairs)
    assert all(pair.relative_mse > 5 for pair in raw_pairs)  # about (1 - 4)^2 = 9 each: the scale, not the fit


def test_jumprelu_thresholds_are_folded_before_matching(tmp_path: Path) -> None:
    """A JumpReLU latent is the same latent after (encoder * a, decoder / a, threshold * a): snapshot B is snapshot A
    permuted and so rescaled latent by latent. Matching the bare decoders goes wrong; theta * W_dec matches."""
    gen = torch.Generator().manual_seed(5)
    w_a = drifting_decoders(1, seed=6)[0]
    theta_a = torch.empty(DICT_SIZE).uniform_(0.5, 2.0, generator=gen)
    gauge = torch.exp(torch.empty(DICT_SIZE).uniform_(-3.0, 3.0, generator=gen))  # a_i in [0.05, 20]
    perm = permutations(1, seed=7)[0]
    noise = 0.01 * torch.randn(DICT_SIZE, D_MODEL, generator=gen) * w_a.norm(dim=1, keepdim=True)
    w_b = ((w_a + noise) / gauge[:, None])[perm]
    stack = write_stack(tmp_path / "stack", [w_a, w_b], activation=["jumprelu", "jumprelu"],
                        threshold=[theta_a, (theta_a * gauge)[perm]],
                        encoder_gain=[torch.ones(DICT_SIZE), gauge[perm]])
    truth = torch.argsort(perm)
    orders, pairs, _, _ = match_stack(stack)
    raw_orders, _, _, _ = match_stack(stack, fold=False)
    assert orders[1].tolist() == truth.tolist() and pairs[0].share_above_threshold == 1.0
    assert (raw_orders[1] == truth).float().mean() < 0.9  # unfolded: 6 of 48 wrong here

    out = tmp_path / "aligned"
    match_cli.main([str(stack), "--out", str(out)])
    thresholds = read_tensors(out / "snap1" / WEIGHTS_FILE, ["activation.log_threshold"])["activation.log_threshold"]
    torch.testing.assert_close(thresholds.exp(), theta_a * gauge)  # each latent's threshold moved with it


@pytest.mark.parametrize("activation", ["jumprelu", "snapshot_jumprelu"])
def test_folded_decoder_is_the_same_for_a_rescaled_latent(activation: str) -> None:
    """Rescaling a latent (encoder * a, decoder / a; the shared gate's threshold * a, the per-snapshot gate's, which
    sees pre * n, unchanged) leaves the folded decoder as it was; the bare decoder changes."""
    gen = torch.Generator().manual_seed(8)
    w_dec, theta = torch.randn(6, 1, 4, generator=gen), torch.rand(6, generator=gen) + 0.5
    gauge = torch.exp(torch.randn(6, generator=gen))
    meta = DictionaryMeta(sources=[{"name": "s"}], hook="h", d_model=4, dict_size=6, activation=activation, k=1,
                          aux_k=0, tokens_seen=0, train_step=0, input_scale=[2.0])
    rescaled_theta = theta * gauge if activation == "jumprelu" else theta
    before = folded_decoder({"W_dec": w_dec, "activation.log_threshold": theta.log()}, meta)
    after = folded_decoder({"W_dec": w_dec / gauge[:, None, None], "activation.log_threshold": rescaled_theta.log()},
                           meta)
    torch.testing.assert_close(before, after)
    assert not torch.allclose(w_dec[:, 0].double(), (w_dec / gauge[:, None, None])[:, 0].double())


def test_unrelated_dictionaries_match_badly(tmp_path: Path) -> None:
    """The failing control: dictionaries with nothing in common still get a permutation, but its quality says so."""
    decoders = [drifting_decoders(1, seed=seed)[0] for seed in (10, 11, 12)]
    _, pairs, _, _ = match_stack(write_stack(tmp_path / "stack", decoders), cost="mse")
    _, cosine_pairs, _, _ = match_stack(tmp_path / "stack", cost="cosine")
    for pair in [*pairs, *cosine_pairs]:
        assert pair.share_above_threshold < 0.1 and pair.mean_cosine < 0.5 and pair.relative_mse > 0.5


EXPECTED_CLASSES = {"persistent": 6, "emerging": 9, "vanishing": 3, "transient": 0, "dead": 2}
EXPECTED_EMERGENCE = [9, 4, 5]  # persistent + vanishing at 0, the 0.2 -> 0.8 group at 1, the ~0 ~0 1 group at 2


def test_analyze_reads_an_aligned_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = write_stack(tmp_path / "stack", hand_built_decoders(), aligned="warm_start", method="sae_track",
                        scale=[2.0, 1.0, 0.5])
    evo, meta = load_evolution(stack)
    assert evo.class_counts() == EXPECTED_CLASSES and evo.emergence_counts.tolist() == EXPECTED_EMERGENCE
    assert evo.names == ["snap0", "snap1", "snap2"] and evo.steps == [0, 100, 200] and meta.input_scale == [2, 1, 0.5]

    analyze_main([str(stack), "--max-rows", "10"])
    printed = capsys.readouterr().out
    assert "skipping: a stack's dictionaries each see one snapshot" in printed
    report = stack / "analysis"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["class_counts"] == EXPECTED_CLASSES and summary["emergence_counts"] == EXPECTED_EMERGENCE
    assert summary["stack"]["method"] == "sae_track" and summary["median_cosine_to_final"][-1] == pytest.approx(1.0)
    assert "firing_frequency_dense_latents" in summary or "firing_median_frequency" in summary
    rows = list(csv.DictReader((report / "features.csv").open()))
    late = [row for row in rows if row["emergence_snapshot"] == "2"]
    assert len(late) == 5 and all(row["class"] == "emerging" for row in late)
    assert {"cos_final@snap0", "freq@snap2"} <= set(rows[0]) and float(rows[0]["cos_final@snap2"]) == pytest.approx(1.0)
    page = (report / "report.html").read_text()
    assert "Drift to the final snapshot" in page and "sae_track" in page


def test_match_then_analyze_recovers_the_hand_built_classes(tmp_path: Path) -> None:
    """Permuted per snapshot and unaligned: refused as it is; matched (cosine cost: near-zero decoders still have
    their direction), its classes and emergence are the hand-built ones."""
    decoders = hand_built_decoders()
    gen = torch.Generator().manual_seed(21)
    stored = [w[torch.randperm(len(w), generator=gen)] for w in decoders]
    stack = write_stack(tmp_path / "stack", stored, tag=[torch.zeros(len(w)) for w in decoders])
    with pytest.raises(SystemExit) as exit_info:
        analyze_main([str(stack)])
    assert exit_info.value.code == 2
    match_cli.main([str(stack), "--out", str(tmp_path / "aligned"), "--cost", "cosine"])
    evo, _ = load_evolution(tmp_path / "aligned")
    assert evo.class_counts() == EXPECTED_CLASSES and evo.emergence_counts.tolist() == EXPECTED_EMERGENCE


def test_analyze_refuses_an_unaligned_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = write_stack(tmp_path / "stack", hand_built_decoders())
    with pytest.raises(SystemExit) as exit_info:
        analyze_main([str(stack)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "aligned: none" in error and "run crosscoder-match" in error
    assert not (stack / "analysis").exists()


def test_planted_recovery_of_a_stack(tmp_path: Path) -> None:
    """A stack whose dictionaries hold the planted decoder (plus spare latents) recovers every planted feature."""
    training = {"sources": {"kind": "planted", "planted": {"n_snapshots": 3, "d_model": D_MODEL, "n_features": 24}}}
    truth = planted_truth(planted_config(training))
    spare = 0.5 * torch.randn(DICT_SIZE - 24, D_MODEL, generator=torch.Generator().manual_seed(30))
    decoders = [torch.cat([truth.decoder[:, s], spare]) for s in range(3)]
    stack = write_stack(tmp_path / "stack", decoders, aligned="warm_start", training=[training] * 3)
    result = stack_planted_recovery(stack)
    assert result is not None and result.fraction_recovered == 1.0 and result.emergence_accuracy == 1.0


def _one_line_exit(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    return error


def test_bad_stacks_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "not-a-stack"
    folder.mkdir()
    error = _one_line_exit(match_cli.main, [str(folder)], capsys)
    assert "is not a dictionary stack: stack.json is missing" in error
    stack = write_stack(tmp_path / "stack", drifting_decoders(2, seed=40))
    error = _one_line_exit(match_cli.main, [str(stack), "--out", str(stack / "inside")], capsys)
    assert "must lie outside the stack" in error
    shutil.rmtree(stack / "snap1")
    for main in (match_cli.main, analyze_main):
        error = _one_line_exit(main, [str(stack)], capsys)
        assert str(stack / "snap1") in error and "config.json is missing" in error
    assert not (tmp_path / "stack_sae_match").exists()
