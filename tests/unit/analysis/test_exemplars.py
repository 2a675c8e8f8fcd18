"""The exemplar pass on dictionaries trained on the tiny toy snapshots (a crosscoder and a stack of independent
dictionaries), against a brute-force pass over the same tokens: the top-N of every latent at every channel is
exactly the largest N codes, the sample holds only real firings, the densities are the firing counts; the files
read back without the trainer."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from crosscoder.analysis.inputs.token_stream import replayed_batches
from crosscoder.analysis.interpretation.exemplar_files import ExemplarFiles, write_exemplars
from crosscoder.analysis.interpretation.exemplars import (
    ExemplarSettings,
    crosscoder_codes,
    exemplar_pass,
    stack_codes,
)
from crosscoder.cli.train import train
from crosscoder.config import RunConfig
from crosscoder.data.kinds import describe_sources
from crosscoder.dictionary.io import load_dictionary
from crosscoder.dictionary.stack import stack_members
from crosscoder.sources.models import load_runners
from tests.helpers import outside_any_launch, tiny_run_config

N_TOKENS, TOP_N, SAMPLES, F = 700, 5, 4, 32


def _train(toy_cache: Path, out: Path, method: str) -> Path:
    cfg = tiny_run_config(toy_cache, out)
    cfg.crosscoder.dict_size, cfg.trainer.total_tokens, cfg.method.name = F, 128 * 12, method
    with outside_any_launch():
        return train(cfg).dictionary_dir


@pytest.fixture(scope="module", params=["crosscoder", "independent"])
def trained(request: pytest.FixtureRequest, tiny_snapshots: list, toy_cache: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, _train(toy_cache, tmp_path_factory.mktemp(request.param), request.param)


def _brute_force(kind: str, dictionary: Path, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Every code [n, C, F] of the first N_TOKENS tokens, their keys [n], and the token ids per sequence."""
    info = describe_sources(cfg.sources, log=lambda _: None)
    runners = load_runners(cfg.sources, info.specs, torch.device("cpu"))
    if kind == "crosscoder":
        codes = crosscoder_codes(load_dictionary(dictionary)[0])
    else:
        codes = stack_codes([load_dictionary(path)[0] for path in stack_members(dictionary)])
    xs, keys, sequences = [], [], {}
    for batch in replayed_batches(cfg, info.tokenizer, runners, N_TOKENS, torch.device("cpu")):
        xs.append(batch.x)
        keys.append(batch.keys)
        sequences.update({batch.first_sequence + row: ids for row, ids in enumerate(batch.input_ids.tolist())})
    with torch.no_grad():
        return codes(torch.cat(xs)), torch.cat(keys), sequences


def test_exemplars_are_the_brute_force_top_n_at_every_channel(trained: tuple[str, Path], toy_cache: Path,
                                                               tmp_path: Path) -> None:
    kind, dictionary = trained
    found = exemplar_pass(dictionary, ExemplarSettings(top_n=TOP_N, samples=SAMPLES, n_tokens=N_TOKENS),
                          log=lambda _: None)
    cfg = tiny_run_config(toy_cache, tmp_path)
    codes, keys, sequences = _brute_force(kind, dictionary, cfg)
    n, channels, latents = codes.shape
    assert (n, latents) == (N_TOKENS, F) and channels == (4 if kind == "crosscoder" else 3)
    assert found.n_tokens == N_TOKENS and found.channels[0] == ("shared" if kind == "crosscoder" else "step0")
    flat = codes.reshape(n, -1).T  # [C*F, n], channel c of latent i at row c * F + i
    assert torch.equal(found.firing_counts.cpu(), (flat > 0).sum(dim=1))
    expected, where = flat.topk(TOP_N, dim=1)
    fired = 0
    for row in range(channels * F):
        positive = expected[row] > 0
        held = found.top.held()[row]
        assert int(held.sum()) == int(positive.sum()), row
        torch.testing.assert_close(found.top.values[row][held], expected[row][positive], rtol=1e-5, atol=1e-6)
        if len(set(expected[row][positive].tolist())) == int(positive.sum()):  # no ties: the tokens are named
            assert found.top.keys[row][held].tolist() == keys[where[row][positive]].tolist(), row
        sampled = found.sample.held()[row]
        assert int(sampled.sum()) == min(SAMPLES, int((flat[row] > 0).sum()))
        by_key = dict(zip(keys.tolist(), flat[row].tolist(), strict=True))
        sample_keys = found.sample.keys[row][sampled].tolist()
        assert len(set(sample_keys)) == len(sample_keys)  # without replacement
        for key, value in zip(sample_keys, found.sample.values[row][sampled].tolist(), strict=True):
            assert by_key[key] > 0 and abs(by_key[key] - value) <= 1e-5 * max(1.0, abs(value))
        fired += int(positive.any())
    assert fired > F  # the dictionary fires: the comparison was not over empty channels

    folder = write_exemplars(found, tmp_path / "exemplars", dictionary)
    files = ExemplarFiles(folder)
    top_rows = pq.read_table(folder / "exemplars.parquet").filter(
        pq.filters_to_expression([("kind", "=", "top")])).num_rows
    assert top_rows == int(found.top.held().sum())
    latent = int(found.top.values[:F, 0].argmax())  # channel 0: the strongest latent
    contexts = files.contexts(latent, 0)
    assert [c.rank for c in contexts] == list(range(len(contexts))) and contexts
    first_key = int(found.top.keys[latent, 0])
    sequence, position = divmod(first_key, cfg.data.seq_len)
    assert contexts[0].token == files.vocabulary[sequences[sequence][position]]
    assert contexts[0].activation == pytest.approx(float(found.top.values[latent, 0]))
    samples = files.contexts(latent, 0, kind="sample")
    assert all(0 < c.quantile < 1 for c in samples) and [c.activation for c in samples] == sorted(
        c.activation for c in samples)
    density = pq.read_table(folder / "latents.parquet").to_pydict()
    assert density["firing_count"] == found.firing_counts.tolist()


@pytest.mark.parametrize("trained", ["crosscoder"], indirect=True)  # analyze reads aligned stacks only
def test_crosscoder_analyze_writes_the_exemplar_files(trained: tuple[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`crosscoder-analyze --exemplars N`: the folder beside the report, read back without the trainer."""
    from crosscoder.cli.analyze import main

    _, dictionary = trained
    main([str(dictionary), "--out", str(tmp_path / "analysis"), "--exemplars", "3", "--exemplar-tokens", "300",
          "--exemplar-samples", "2", "--contexts", "0", "--scaling-tokens", "0", "--adjacent-tokens", "0"])
    out = capsys.readouterr().out
    folder = tmp_path / "analysis" / "exemplars"
    assert f"exemplars: {folder}" in out and "exemplars: done over 300 tokens" in out
    files = ExemplarFiles(folder)
    assert files.header["n_tokens"] == 300 and files.channels == ["shared", "step0", "step4", "step12"]
    assert files.header["settings"] == {"top_n": 3, "samples": 2, "n_tokens": 300, "seed": 0}
    assert files.tables["latents"].num_rows == 4 * F


def test_the_sample_is_uniform_over_the_firings() -> None:
    """Each of 400 firings offered in random batches lands in a k=40 sample with probability 0.1; a biased
    priority (the control) does not pass the same bound."""
    from crosscoder.analysis.interpretation.streaming_top import StreamingTopK

    generator, trials, n, k = torch.Generator().manual_seed(0), 300, 400, 40
    inclusion, biased = torch.zeros(n), torch.zeros(n)
    for _ in range(trials):
        for counts, bias in ((inclusion, False), (biased, True)):
            kept = StreamingTopK(1, k, torch.device("cpu"), flush_at=50)  # merges between offers too
            order = torch.randperm(n, generator=generator)
            for chunk in order.split(37):
                priority = torch.rand(len(chunk), generator=generator) * (1 + (chunk >= n // 2) if bias else 1)
                kept.offer(torch.zeros(len(chunk), dtype=torch.long), priority, chunk.float(), chunk)
            kept.flush()
            counts[kept.keys[0]] += 1
    rate = inclusion / trials  # binomial(300, 0.1): sd 0.017 per firing
    assert (rate - k / n).abs().max() < 0.08 and abs(rate.mean() - k / n) < 1e-6
    assert (biased / trials - k / n).abs().max() > 0.08


def test_top_token_entropy_is_zero_for_one_token_and_log_n_for_n_tokens() -> None:
    """H over the top exemplars' tokens, activation-weighted: one token 0, N equal-mass tokens log N, two tokens
    with masses 3:1 the binary entropy; an empty channel NaN."""
    import math

    from crosscoder.analysis.interpretation.exemplars import Exemplars
    from crosscoder.analysis.interpretation.scores import top_token_entropy
    from crosscoder.analysis.interpretation.streaming_top import StreamingTopK

    seq_len, device = 8, torch.device("cpu")
    top = StreamingTopK(4, 4, device)
    # sequence 0 holds tokens 10..17, sequence 1 holds 20..27; key = sequence * seq_len + position
    offers = [(0, [1.0, 1.0, 1.0, 1.0], [0, 8, 1, 9]),       # tokens 10, 20, 11, 21 (displaced below)
              (1, [2.0, 2.0, 2.0, 2.0], [0, 1, 2, 3]),       # four tokens, equal mass: log 4
              (2, [3.0, 1.0], [5, 13])]                      # tokens 15 and 25, masses 3:1
    sequences = {0: list(range(10, 18)), 1: list(range(20, 28))}
    for channel, values, keys in offers:
        top.offer(torch.full((len(values),), channel), torch.tensor(values), torch.tensor(values), torch.tensor(keys))
    top.offer(torch.tensor([0, 0, 0, 0]), torch.tensor([5.0, 5.0, 5.0, 5.0]), torch.tensor([5.0, 5.0, 5.0, 5.0]),
              torch.tensor([4, 4, 4, 4]))  # channel 0: four exemplars of one token (14) displace the others
    top.flush()
    found = Exemplars("crosscoder", ["shared"], 4, top, StreamingTopK(4, 1, device), torch.zeros(4, dtype=torch.long),
                      torch.zeros(4, dtype=torch.float64), 100, seq_len, sequences=sequences)
    entropy = top_token_entropy(found)
    assert entropy[0] == pytest.approx(0.0, abs=1e-12)
    assert entropy[1] == pytest.approx(math.log(4))
    assert entropy[2] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert math.isnan(entropy[3])
