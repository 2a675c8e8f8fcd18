"""Adjacent-source feature statistics (analysis.diagnostics.adjacent): the streamed correlation equals numpy's
corrcoef over uneven batches, the sparse top-k accumulator finds the dense path's matches on sparse codes, a planted
permutation of half the latents is recovered (pass-through 0.5, every matched latent's best match its image) while
B's codes shuffled over tokens pass nothing, the per-source codes of each crosscoder family, and crosscoder-analyze
writing the section, adjacent.csv and summary.json's `adjacent` for a planted stack and a planted crosscoder; an
unaligned stack matched through its permutation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crosscoder.analysis.diagnostics.adjacent import AdjacentAccumulator, adjacent_statistics, crosscoder_codes
from crosscoder.analysis.report.adjacent import ADJACENT_COLUMNS, ADJACENT_TITLE, dictionary_adjacent
from crosscoder.cli.analyze import main as analyze_main
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.errors import ConfigError
from tests.helpers import N_SNAPSHOTS, _planted_dictionary, planted_decoders, planted_stack

N_TOKENS, HALF = 20000, 32


def sparse_codes(n: int, width: int, gen: torch.Generator, p: float = 0.05) -> torch.Tensor:
    """Non-negative codes: each latent fires on a share p of tokens, with magnitude in [0.5, 2]."""
    fires = torch.rand(n, width, generator=gen) < p
    return fires * torch.empty(n, width).uniform_(0.5, 2.0, generator=gen)


def planted_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [n, 65], B [n, 66], pi [32]): A's latent j < 32 is B's latent pi[j] (rescaled, with 10% jitter); A's
    latents 32-63 and B's other 32 fire independently; A's latent 64 and B's latent 65 never fire (dead)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.cat([sparse_codes(N_TOKENS, 2 * HALF, gen), torch.zeros(N_TOKENS, 1)], dim=1)
    pi = torch.randperm(2 * HALF, generator=gen)[:HALF]
    b = torch.zeros(N_TOKENS, 2 * HALF + 2)
    b[:, : 2 * HALF + 1] = sparse_codes(N_TOKENS, 2 * HALF + 1, gen)  # a live unrelated 65th latent; 66th dead
    jitter = 1 + 0.1 * torch.rand(N_TOKENS, HALF, generator=gen)
    b[:, pi] = a[:, :HALF] * torch.empty(HALF).uniform_(0.5, 3.0, generator=gen) * jitter
    return a, b, pi


def batches(a: torch.Tensor, b: torch.Tensor, sizes: tuple[int, ...] = (7000, 3000, 6500, 3500)
            ) -> list[list[torch.Tensor]]:
    edges = np.cumsum((0, *sizes))
    return [[a[start:stop], b[start:stop]] for start, stop in zip(edges[:-1], edges[1:], strict=True)]


def test_streamed_correlation_equals_corrcoef() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3000, 12, generator=gen) + 3, torch.randn(3000, 9, generator=gen)  # any sign, offset means
    b[:, :4] += 0.7 * a[:, 8:]
    accumulator = AdjacentAccumulator(["a", "b"])
    for batch in batches(a, b, (1000, 1, 1500, 499)):
        accumulator.update(batch)
    expected = np.corrcoef(a.double().T.numpy(), b.double().T.numpy())[:12, 12:]
    np.testing.assert_allclose(accumulator.correlation(0).numpy(), expected, atol=1e-10)
    transition = accumulator.result().transitions[0]
    assert transition.forward_match.tolist() == expected.argmax(1).tolist()
    assert transition.backward_match.tolist() == expected.argmax(0).tolist()
    np.testing.assert_allclose(transition.forward_corr.numpy(), expected.max(1), atol=1e-10)


def test_sparse_accumulator_agrees_with_the_dense_path_on_sparse_codes() -> None:
    a, b, _ = planted_pair(2)
    dense = adjacent_statistics(batches(a, b), ["a", "b"]).transitions[0]
    assert dense.exact
    for top_k in (8, 100):  # the default, and every partner kept (exact for every co-active pair)
        sparse = adjacent_statistics(batches(a, b), ["a", "b"], max_dense=0, top_k=top_k).transitions[0]
        assert not sparse.exact
        for match, corr, sparse_match, sparse_corr in (
                (dense.forward_match, dense.forward_corr, sparse.forward_match, sparse.forward_corr),
                (dense.backward_match, dense.backward_corr, sparse.backward_match, sparse.backward_corr)):
            strong = corr >= 0.1  # every match that can pass a threshold
            assert strong.sum() >= HALF
            assert torch.equal(sparse_match[strong], match[strong])
            torch.testing.assert_close(sparse_corr[strong], corr[strong], atol=1e-10, rtol=0)
            if top_k == 100:
                live = ~corr.isnan()
                assert torch.equal(sparse_match[live], match[live])
        for tau in (0.4, 0.5):
            assert sparse.shares(tau) == dense.shares(tau)


@pytest.mark.parametrize("max_dense", [1 << 22, 0])
def test_a_planted_permutation_passes_through_and_shuffled_tokens_do_not(max_dense: int) -> None:
    a, b, pi = planted_pair()
    result = adjacent_statistics(batches(a, b), ["A", "B"], max_dense=max_dense)
    transition = result.transitions[0]
    assert transition.live_source.sum() == 64 and transition.live_target.sum() == 65  # the dead ones excluded
    assert transition.forward_match[64] == -1 and transition.backward_match[65] == -1
    for tau in (0.4, 0.5):
        shares = transition.shares(tau)
        assert shares["pass_through"] == pytest.approx(0.5) and shares["disappear"] == pytest.approx(0.5)
        assert shares["appear"] == pytest.approx(33 / 65)
    assert transition.forward_match[:HALF].tolist() == pi.tolist()
    assert (transition.forward_corr[:HALF] > 0.9).all() and (transition.forward_corr[HALF:64] < 0.1).all()
    assert transition.backward_match[pi].tolist() == list(range(HALF))
    summary = json.loads(json.dumps(result.summary()))  # JSON-able
    entry = summary["transitions"][0]
    assert (entry["dead_from"], entry["dead_to"], entry["exact"]) == (1, 1, max_dense > 0)
    assert entry["at"]["0.5"]["passing"] == HALF

    shuffled = b[torch.randperm(N_TOKENS, generator=torch.Generator().manual_seed(9))]  # no token pairing left
    control = adjacent_statistics(batches(a, shuffled), ["A", "B"], max_dense=max_dense).transitions[0]
    assert control.shares(0.4)["pass_through"] == 0 and control.shares(0.5)["appear"] == 1


def test_per_source_codes_of_shared_and_per_snapshot_crosscoders() -> None:
    torch.manual_seed(3)
    x = torch.randn(300, 2, 8)
    shared = Crosscoder(2, 8, 16, "relu")
    with torch.no_grad():
        shared.W_dec[3, 1] = 0  # latent 3 absent from source 1: dead there
    codes = crosscoder_codes(shared)(x)
    norms = shared.decoder_norms()
    assert len(codes) == 2 and all(c.shape == (300, 16) for c in codes)
    torch.testing.assert_close(codes[1], shared.encode(x) * norms[:, 1])
    transition = adjacent_statistics([codes], ["a", "b"], codes="shared").transitions[0]
    live = transition.live_source & transition.live_target
    assert not transition.live_target[3] and live.sum() >= 8
    assert transition.forward_match[live].tolist() == torch.nonzero(live).flatten().tolist()  # its own match
    torch.testing.assert_close(transition.forward_corr[live], torch.ones(int(live.sum()), dtype=torch.float64))

    gated = Crosscoder(2, 8, 16, "snapshot_jumprelu", activation_options={"initial_threshold": 0.005})
    per_snapshot = crosscoder_codes(gated)(x)
    torch.testing.assert_close(torch.stack(per_snapshot, dim=1), gated.encode(x))


def test_analyze_writes_adjacent_statistics_of_a_planted_stack(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    stack = planted_stack(tmp_path / "stack", planted_decoders())
    analyze_main([str(stack), "--adjacent-tokens", "4000", "--progress-tokens", "0", "--max-rows", "10"])
    printed = capsys.readouterr().out
    assert "skipping adjacent statistics" not in printed and "adjacent statistics: pass-through at 0.5" in printed
    report = stack / "analysis"
    summary = json.loads((report / "summary.json").read_text())["adjacent"]
    assert summary["n_tokens"] == 4000 and summary["codes"] == "stack" and len(summary["transitions"]) == 2
    rows = list(csv.DictReader((report / "adjacent.csv").open()))
    assert list(rows[0]) == ADJACENT_COLUMNS and len(rows) == N_SNAPSHOTS * 24
    # The stack is aligned by construction: a latent live in consecutive snapshots is the same planted feature.
    first = {int(row["latent"]): row for row in rows if row["source"] == "snap0"}
    second = {int(row["latent"]): row for row in rows if row["source"] == "snap1"}
    both = [i for i in first if first[i]["live"] == "True" and second[i]["live"] == "True"]
    assert len(both) >= 8
    assert all(int(first[i]["best_next"]) == i and float(first[i]["next_corr"]) > 0.5 for i in both)
    assert all(row["best_prev"] == "" for row in first.values())  # the first source has no previous one
    page = (report / "report.html").read_text()
    assert ADJACENT_TITLE in page and 'alt="adjacent statistics"' in page and (report / "adjacent.png").is_file()


def test_analyze_writes_adjacent_statistics_of_a_planted_crosscoder_or_skips(
        tmp_path: Path, dictionary_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dictionary, _, _ = _planted_dictionary(tmp_path / "planted")  # (dictionary_dir is tmp_path / "dictionary")
    summary = dictionary_adjacent(dictionary, 3000).summary()
    assert summary["codes"] == "shared"  # degenerate: a latent live at both is its own match
    for entry in summary["transitions"]:
        assert entry["at"]["0.5"]["pass_through"] == 1.0 and entry["median_forward_corr"] == pytest.approx(1.0)
    capsys.readouterr()
    analyze_main([str(dictionary), "--adjacent-tokens", "3000", "--scaling-tokens", "0", "--contexts", "0"])
    assert "skipping adjacent statistics: this crosscoder's latents share one code" in capsys.readouterr().out
    assert "adjacent" not in json.loads((dictionary / "analysis" / "summary.json").read_text())

    analyze_main([str(dictionary), "--adjacent-tokens", "0", "--scaling-tokens", "0", "--out", str(tmp_path / "off")])
    assert not (tmp_path / "off" / "adjacent.csv").exists()
    assert "adjacent" not in json.loads((tmp_path / "off" / "summary.json").read_text())
    capsys.readouterr()
    with pytest.raises(ConfigError, match="the dictionary's config.json holds no run configuration"):
        dictionary_adjacent(dictionary_dir, 3000)  # no run configuration: nothing to replay
    assert not (dictionary_dir / "analysis" / "adjacent.csv").exists()


def test_an_unaligned_stack_is_matched_through_its_permutation(tmp_path: Path) -> None:
    """Independent dictionaries need no alignment: snapshot 1's latents stored permuted are found at their new
    index (dictionary_adjacent reads any stack; crosscoder-analyze itself refuses an unaligned one)."""
    decoders = planted_decoders()
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(5))
    stored = [decoders[0], decoders[1][perm], decoders[2]]  # stored latent k of snapshot 1 is feature perm[k]
    result = dictionary_adjacent(planted_stack(tmp_path / "stack", stored, aligned="none"), 3000, log=lambda _: None)
    first = result.transitions[0]
    passing = first.live_source & (first.forward_corr >= 0.5)
    assert passing.sum() >= 8
    where = torch.argsort(perm)  # feature i sits at index where[i] in snapshot 1
    assert torch.equal(first.forward_match[passing], where[passing])
