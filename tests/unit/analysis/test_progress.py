"""SAE-Track's progress measure (analysis.diagnostics.progress): the pure measure on hand-made codes (shared codes
give about 1 - baseline, random ones about 0, a never-firing latent NaN, the pair sum equal to an explicit Gram
matrix with zero vectors counting 0, chunking changing nothing), and end to end on planted stacks through
crosscoder-analyze (section, summary key, columns per chain), with controls: permuting an early dictionary's
latents changes nothing (the measure reads whole code vectors), scrambling it lowers early progress."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from crosscoder.analysis.diagnostics.progress import (
    ProgressResult,
    mean_pairwise_cosine,
    progress_measure,
    stack_progress,
)
from crosscoder.analysis.features.chains import Chains
from crosscoder.analysis.features.evolution import FeatureTable
from crosscoder.analysis.features.planted import planted_config
from crosscoder.analysis.report.progress import PROGRESS_TITLE, add_progress_columns
from crosscoder.analysis.report.stack import StackNotAlignedError
from crosscoder.cli.analyze import main as analyze_main
from crosscoder.data.planted import planted_truth
from tests.helpers import D_MODEL, N_SNAPSHOTS, PLANTED, planted_decoders, planted_stack, write_stack


def hand_made_codes() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Final codes [N, F]: latent 0 fires on tokens 0-29, latent 1 on 30-59, latent 2 never, latent 3 on one
    token, the rest at random. Codes at 2 snapshots: random, except latent 0's top 25 tokens at snapshot 1, which
    share one pattern (plus a little noise)."""
    gen = torch.Generator().manual_seed(0)
    n_tokens, n_latents = 3000, 64
    final = (torch.rand(n_tokens, n_latents, generator=gen) - 0.7).clamp_min(0)
    final[:, :4] = 0
    final[:30, 0] = torch.linspace(2.0, 1.0, 30)
    final[30:60, 1] = torch.linspace(2.0, 1.0, 30)
    final[100, 3] = 1.0
    codes = [torch.randn(n_tokens, n_latents, generator=gen).relu() for _ in range(2)]
    pattern = torch.randn(n_latents, generator=gen).relu()
    codes[1][:25] = pattern + 0.01 * torch.rand(25, n_latents, generator=gen)
    return final, codes


def test_shared_codes_progress_and_random_ones_do_not() -> None:
    final, codes = hand_made_codes()
    measured = progress_measure(final, codes, generator=torch.Generator().manual_seed(1))
    assert measured.shape == (64, 2)
    progress = measured.numpy()
    everyone = torch.ones(1, 25, dtype=torch.bool)
    baseline = mean_pairwise_cosine(lambda t, rows: codes[t][rows], 1,
                                    torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:25][None],
                                    everyone)[0].item()
    assert 0.2 < baseline < 0.8  # ReLU'd Gaussian codes: positive, far from 1
    assert progress[0, 1] == pytest.approx(1 - baseline, abs=0.01)  # formed at snapshot 1
    assert abs(progress[0, 0]) < 0.1 and abs(progress[1, 0]) < 0.1 and abs(progress[1, 1]) < 0.1  # random
    assert math.isnan(progress[2, 0]) and math.isnan(progress[2, 1])  # never fires at the final snapshot
    assert math.isnan(progress[3, 1])  # one firing token: no pair
    assert not measured[4:].isnan().any()


def test_pair_sum_is_the_gram_mean_with_zero_vectors_counting_zero() -> None:
    gen = torch.Generator().manual_seed(2)
    codes = torch.randn(40, 12, generator=gen).relu()
    codes[3] = 0  # no direction: its cosines count 0, its pairs still count
    index = torch.stack([torch.randperm(40, generator=gen)[:7] for _ in range(12)])
    index[0, 0] = 3
    valid = torch.ones_like(index, dtype=torch.bool)
    valid[5, 2:] = False  # only 2 of its tokens fire: one pair
    valid[6, 1:] = False  # one token: NaN
    unit = codes / codes.norm(dim=1, keepdim=True).clamp_min(1e-30)
    expected = []
    for row, keep in zip(index, valid, strict=True):
        z = unit[row[keep]]
        n = len(z)
        gram = z @ z.T
        expected.append(float("nan") if n < 2 else float(gram.triu(1).sum() / (n * (n - 1) / 2)))
    for max_elements in (1, 1 << 24):  # one latent per chunk, and all at once
        got = mean_pairwise_cosine(lambda _, rows: codes[rows], 0, index, valid, max_elements=max_elements)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), equal_nan=True)


def test_analyze_writes_the_progress_of_a_planted_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = planted_stack(tmp_path / "stack", planted_decoders())
    analyze_main([str(stack), "--progress-tokens", "2000", "--max-rows", "10"])
    printed = capsys.readouterr().out
    assert "skipping progress measure" not in printed and "progress measure: median over" in printed
    report = stack / "analysis"
    summary = json.loads((report / "summary.json").read_text())
    median = summary["progress_median"]
    assert len(median) == N_SNAPSHOTS and summary["progress"]["n_tokens"] == 2000
    assert median[-1] > 0.3 and all(value is not None for value in median)
    rows = list(csv.DictReader((report / "features.csv").open()))
    columns = [f"progress@snap{s}" for s in range(N_SNAPSHOTS)]
    assert set(columns) <= set(rows[0])
    result = stack_progress(stack, 2000, log=lambda _: None)  # the same replay: the same numbers, row by slot
    for row in rows:
        if row["progress@snap2"]:
            assert float(row["progress@snap2"]) == pytest.approx(float(result.progress[int(row["stack_latent"]), 2]),
                                                                 abs=1e-5)
    magnitudes = planted_truth(planted_config(PLANTED)).magnitudes
    on_at_final = int((magnitudes[:, -1] > 0).sum())  # the others' latents never fire there: NaN, empty cells
    assert sum(bool(row["progress@snap2"]) for row in rows) == int(result.live.sum()) == on_at_final
    page = (report / "report.html").read_text()
    assert PROGRESS_TITLE in page and 'alt="progress measure"' in page
    emerging = (magnitudes[:, 0] == 0) & (magnitudes[:, -1] > 0)  # off at snapshot 0, on at the final one
    assert emerging.any()
    late = result.progress[emerging]
    assert torch.nanmedian(late[:, 0]) < torch.nanmedian(late[:, -1]) - 0.2  # not formed at snapshot 0 yet


def test_permuted_early_latents_change_nothing_scrambled_ones_lower_progress(tmp_path: Path) -> None:
    """A permutation of a dictionary's latents permutes every code vector alike, so no cosine changes: the same
    progress to float precision. Early dictionaries of random directions (the final one kept) do not know the
    planted features: lower early progress than the planted stack's."""
    decoders = planted_decoders()
    plain = stack_progress(planted_stack(tmp_path / "plain", decoders), 2000, log=lambda _: None)
    gen = torch.Generator().manual_seed(3)
    perms = [torch.randperm(24, generator=gen) for _ in range(N_SNAPSHOTS - 1)]
    permuted = planted_stack(tmp_path / "permuted", [w[p] for w, p in zip(decoders[:-1], perms, strict=True)]
                             + [decoders[-1]])
    torch.testing.assert_close(stack_progress(permuted, 2000, log=lambda _: None).progress, plain.progress,
                               equal_nan=True, atol=1e-5, rtol=0)
    gen = torch.Generator().manual_seed(0)  # early-snapshot gaps of 0.10-0.21 over 5 seeds tried
    scrambled = [torch.randn(24, D_MODEL, generator=gen) for _ in range(N_SNAPSHOTS - 1)] + [decoders[-1]]
    control = stack_progress(planted_stack(tmp_path / "scrambled", scrambled), 2000, log=lambda _: None)
    assert control.median()[-1] == pytest.approx(plain.median()[-1], abs=1e-6)  # the same final dictionary
    # Random encoders keep some of the tokens' geometry (random projections do), and at snapshot 0 most features
    # live at the final snapshot have not emerged even in the planted stack, so the gap shows most before the end.
    early_plain, early_control = plain.median()[:-1], control.median()[:-1]
    assert early_control[-1] < early_plain[-1] - 0.05
    assert sum(early_control) < sum(early_plain) - 0.05


def test_skipped_without_activations_and_refused_unaligned(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    stack = write_stack(tmp_path / "no-run", planted_decoders(), aligned="warm_start", method="sae_track")
    analyze_main([str(stack), "--progress-tokens", "2000"])
    printed = capsys.readouterr().out
    assert printed.count("skipping progress measure: ") == 1 and "no run configuration" in printed
    assert "progress_median" not in json.loads((stack / "analysis" / "summary.json").read_text())
    unaligned = planted_stack(tmp_path / "unaligned", planted_decoders(), aligned="none")
    with pytest.raises(StackNotAlignedError):
        stack_progress(unaligned, 100)
    with pytest.raises(SystemExit) as exit_info:
        analyze_main([str(unaligned), "--progress-tokens", "2000"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "aligned: none" in error and not (unaligned / "analysis").exists()


def test_columns_follow_each_chain_to_its_slot() -> None:
    """Rows are chains: a chain reaching the final snapshot takes its slot's progress; one that ends earlier (its
    slot then holds another feature, the final latent's) and a never-firing latent get empty cells."""
    progress = torch.tensor([[0.1, 0.9], [0.2, 0.8], [math.nan, math.nan]], dtype=torch.float64)
    result = ProgressResult(names=["a", "b"], progress=progress, baseline=torch.zeros(2), n_tokens=10)
    chains = Chains(decoder=torch.zeros(4, 2, 1), norms=torch.zeros(4, 2), slot=torch.tensor([0, 1, 1, 2]),
                    first=torch.tensor([0, 0, 1, 0]), last=torch.tensor([1, 0, 1, 1]))
    table = FeatureTable(columns=["feature"], rows=[[0], [1], [2], [3]])
    summary: dict = {}
    add_progress_columns(table, summary, result, chains)
    assert table.columns == ["feature", "progress@a", "progress@b"]
    assert table.rows == [[0, 0.1, 0.9], [1, None, None], [2, 0.2, 0.8], [3, None, None]]
    assert summary["progress_median"] == [pytest.approx(0.15), pytest.approx(0.85)]
    assert summary["progress"]["live_latents"] == 2
