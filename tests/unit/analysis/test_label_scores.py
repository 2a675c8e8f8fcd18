"""Oracle-label AUROC: exact on hand-made scores (ties count one half), and through the real pass on the tiny toy
snapshots: a latent reading the direction that separates digit tokens (found from the tokens' text, not from the
labels) picks out role=digit; a random latent, the control, does not."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from crosscoder.analysis.interpretation.label_scores import auroc_per_column, label_scores
from crosscoder.data.activations import paired_activations
from crosscoder.data.kinds import describe_sources
from crosscoder.data.tokens import iter_token_batches, special_token_ids
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary
from crosscoder.errors import ConfigError
from crosscoder.sources.models import load_runners
from crosscoder.toy.corpus import ROLES
from tests.helpers import tiny_toy_config

N_TOKENS = 1500


def test_auroc_counts_ties_one_half() -> None:
    scores = torch.tensor([[0.0, 1.0, 4.0], [0.0, 2.0, 3.0], [1.0, 3.0, 2.0], [2.0, 4.0, 1.0]])
    positive = torch.tensor([False, True, False, True])
    # column 0: positives {0, 2} vs negatives {0, 1}: (tie) 0.5 + 0 + 1 + 1 = 2.5 of 4 pairs
    assert auroc_per_column(scores, positive).tolist() == pytest.approx([0.625, 0.75, 0.25])
    assert auroc_per_column(scores[:, :1] * 0, positive).item() == pytest.approx(0.5)


def _digit_direction(toy_cache: Path) -> tuple[torch.Tensor, object]:
    """[S, d] mean activation of digit tokens minus the others', digits found by their decoded text."""
    cfg = tiny_toy_config(toy_cache)
    info = describe_sources(cfg.sources, log=lambda _: None)
    runners = load_runners(cfg.sources, info.specs, torch.device("cpu"))
    bos, pad = special_token_ids(info.tokenizer)
    xs, digits, seen = [], [], 0
    for batch in iter_token_batches(cfg.data, info.tokenizer):
        x = paired_activations(batch, runners, bos, pad, torch.device("cpu"))
        ids = batch.input_ids[batch.input_ids != bos]
        xs.append(x)
        digits += [info.tokenizer.decode([token]).strip().isdigit() for token in ids.tolist()]
        seen += len(x)
        if seen >= N_TOKENS:
            break
    x, digit = torch.cat(xs), torch.tensor(digits)
    assert len(x) == len(digit) and digit.sum() > 20
    return x[digit].mean(dim=0) - x[~digit].mean(dim=0), info


def test_a_latent_reading_the_digit_direction_picks_out_role_digit(tiny_snapshots: list, toy_cache: Path,
                                                                    tmp_path: Path) -> None:
    direction, info = _digit_direction(toy_cache)
    n_snap, d = direction.shape
    torch.manual_seed(0)
    model = Crosscoder(n_snap, d, 2, "relu")
    with torch.no_grad():
        model.W_enc.zero_()
        model.W_enc[:, :, 0] = direction
        model.W_enc[:, :, 1] = torch.randn(n_snap, d)  # the control: a random reading
        model.b_enc.zero_()
    cfg = tiny_toy_config(toy_cache)
    meta = DictionaryMeta(sources=[asdict(spec) for spec in info.specs], hook=info.hook, d_model=d, dict_size=2,
                          activation="relu", k=1, aux_k=0, tokens_seen=0, train_step=0, input_scale=[1.0] * n_snap,
                          training=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    dictionary = export_dictionary(model.state_dict(), meta, tmp_path / "dictionary")
    scores = label_scores(dictionary, N_TOKENS, log=lambda _: None)
    assert scores.n_tokens == N_TOKENS
    digit = scores.labels.index(("role", ROLES.index("digit") + 1))
    assert scores.auroc[digit, 0] >= 0.9 and scores.auroc[digit, 1] < 0.9, scores.auroc[digit]
    assert scores.best()[digit]["latents"][0] == 0
    kinds = {kind for kind, _ in scores.labels}
    assert {"topic", "role", "number", "arithmetic", "count_position"} <= kinds

    # crosscoder-analyze --label-tokens: labels.json beside the report, the best latent per kind logged
    from crosscoder.cli.analyze import main

    main([str(dictionary), "--out", str(tmp_path / "analysis"), "--label-tokens", str(N_TOKENS), "--contexts", "0",
          "--scaling-tokens", "0", "--adjacent-tokens", "0"])
    written = json.loads((tmp_path / "analysis" / "labels.json").read_text())
    digit_entry = next(item for item in written["labels"] if (item["kind"], item["value"]) == scores.labels[digit])
    assert written["n_tokens"] == N_TOKENS and digit_entry["latents"][0] == 0 and digit_entry["auroc"][0] >= 0.9


def test_labels_are_refused_for_a_dictionary_not_trained_on_the_toy_corpus(tiny_snapshots: list, toy_cache: Path,
                                                                           tmp_path: Path) -> None:
    """The same snapshots read from a text file: no oracle, one clear ConfigError."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some text to read, long enough for a sequence or two of tokens. " * 20)
    cfg = tiny_toy_config(toy_cache)
    cfg.data.kind, cfg.data.paths = "text_files", [str(corpus)]
    info = describe_sources(cfg.sources, log=lambda _: None)
    meta = DictionaryMeta(sources=[asdict(spec) for spec in info.specs], hook=info.hook, d_model=info.d_model,
                          dict_size=2, activation="relu", k=1, aux_k=0, tokens_seen=0, train_step=0,
                          input_scale=[1.0] * len(info.specs),
                          training=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    model = Crosscoder(len(info.specs), info.d_model, 2, "relu")
    dictionary = export_dictionary(model.state_dict(), meta, tmp_path / "dictionary")
    with pytest.raises(ConfigError, match="oracle labels exist for the embedded toy corpus only; this dictionary "
                                          "read data.kind='text_files'"):
        label_scores(dictionary, 100, log=lambda _: None)
