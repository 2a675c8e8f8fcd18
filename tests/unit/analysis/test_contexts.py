"""Top-activating contexts on the tiny toy snapshots, against a brute-force pass over the same tokens."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from crosscoder.analysis.inputs.contexts import (
    CONTEXTS_TITLE,
    Context,
    ContextsResult,
    FeatureContexts,
    contexts_section,
    top_contexts,
)
from crosscoder.cli.analyze import main
from crosscoder.config import RunConfig
from crosscoder.constants import CONFIG_FILE
from crosscoder.data.activations import paired_activations, valid_token_mask
from crosscoder.data.kinds import describe_sources
from crosscoder.data.tokens import iter_token_batches, special_token_ids
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary, load_dictionary
from crosscoder.errors import ConfigError
from crosscoder.sources.models import load_runners
from tests.helpers import tiny_toy_config

N_TOKENS, TOP_K, WINDOW = 500, 4, (8, 3)
F = 4
SILENT_SNAPSHOT = 1
"""Latent 1 has a zero encoder for this snapshot: it cannot fire from that snapshot alone."""


def _run_config(toy_cache: Path) -> RunConfig:
    return tiny_toy_config(toy_cache)


def _export(path: Path, cfg: RunConfig, training: dict[str, Any]) -> Path:
    info = describe_sources(cfg.sources, log=lambda _: None)
    n_snap, d = len(info.specs), info.d_model
    torch.manual_seed(0)
    model = Crosscoder(n_snap, d, F, "relu")
    model.set_input_scale(torch.tensor([2.0, 1.0, 0.5]))  # folded at export: the loaded W_enc differs from this
    with torch.no_grad():
        direction = torch.randn(d)
        model.W_enc.zero_()
        model.W_enc[:, :, 0] = direction  # latent 0 reads one direction in every snapshot
        model.W_enc[:, :, 1] = -direction
        model.W_enc[SILENT_SNAPSHOT, :, 1] = 0.0
        model.W_enc[:, :, 2] = torch.randn(n_snap, d)
        model.W_enc[:, :, 3] = torch.randn(d)
        model.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0, -1e4]))  # latent 3 never fires
        model.W_dec[1] *= torch.tensor([0.1, 0.6, 1.0])[:, None]  # emerging; the others persistent
    meta = DictionaryMeta(sources=[asdict(spec) for spec in info.specs], hook=info.hook, d_model=d, dict_size=F,
                          activation="relu", k=1, aux_k=0, tokens_seen=0, train_step=0, input_scale=[1.0] * n_snap,
                          training=training)
    return export_dictionary(model.state_dict(), meta, path)


@pytest.fixture(scope="module")
def dictionary(tiny_snapshots: list, toy_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = _run_config(toy_cache)
    training = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return _export(tmp_path_factory.mktemp("contexts") / "dictionary", cfg, training)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(dictionary: Path, toy_cache: Path) -> dict[str, Any]:
    """Every activation of the first N_TOKENS valid tokens, by the documented rules, and their token ids."""
    cfg = _run_config(toy_cache)
    info = describe_sources(cfg.sources, log=lambda _: None)
    runners = load_runners(cfg.sources, info.specs, torch.device("cpu"))
    bos, pad = special_token_ids(info.tokenizer)
    model, _ = load_dictionary(dictionary)
    xs, sequences = [], []
    for batch in iter_token_batches(cfg.data, info.tokenizer):
        xs.append(paired_activations(batch, runners, bos, pad, torch.device("cpu")))
        sequences += batch.input_ids.tolist()
        assert valid_token_mask(batch, bos, pad).sum() == len(xs[-1])
        if sum(len(x) for x in xs) >= N_TOKENS:
            break
    x = torch.cat(xs)[:N_TOKENS]
    with torch.no_grad():
        shared = model.encode(x)
        single = (torch.einsum("nsd,sdf->nsf", x, model.W_enc) + model.b_enc).relu()  # folded: raw x as is
    return {"shared": shared, "single": single, "sequences": sequences, "tokenizer": info.tokenizer}


@pytest.fixture(scope="module")
def result(dictionary: Path) -> ContextsResult:
    return top_contexts(dictionary, [0, 1, 2, 3], n_tokens=N_TOKENS, top_k=TOP_K, window=WINDOW, log=lambda _: None)


def _channels(fc: FeatureContexts) -> list[tuple[int | None, list[Context]]]:
    return [(None, fc.overall), *enumerate(fc.per_snapshot)]


def test_top_contexts_are_the_largest_activations_sorted(result: ContextsResult, reference: dict[str, Any]) -> None:
    assert result.n_tokens == N_TOKENS and result.snapshots == ["step0", "step4", "step12"]
    for fc in result.features:
        for s, contexts in _channels(fc):
            all_values = reference["shared"][:, fc.feature] if s is None else reference["single"][:, s, fc.feature]
            expected = all_values[all_values > 0].sort(descending=True).values[:TOP_K].tolist()
            got = [c.value for c in contexts]
            assert got == sorted(got, reverse=True) and all(v > 0 for v in got)
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-5), (fc.feature, s)
    assert len(result.feature(0).overall) == TOP_K


def test_single_snapshot_rule(result: ContextsResult) -> None:
    assert result.feature(1).per_snapshot[SILENT_SNAPSHOT] == []  # zero W_enc[s]: never fires from s alone
    assert all(len(contexts) == TOP_K for s, contexts in enumerate(result.feature(1).per_snapshot)
               if s != SILENT_SNAPSHOT)
    silent = result.feature(3)  # b_enc = -1e4: no positive activation anywhere
    assert silent.overall == [] and all(contexts == [] for contexts in silent.per_snapshot)


def test_contexts_point_at_the_activating_token(result: ContextsResult, reference: dict[str, Any]) -> None:
    tokenizer, sequences = reference["tokenizer"], reference["sequences"]
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    flat = [(seq, pos) for seq, ids in enumerate(sequences) for pos, t in enumerate(ids)
            if pos > 0 and t != tokenizer.eos_token_id][:N_TOKENS]  # valid tokens in stream order
    row_of = {key: row for row, key in enumerate(flat)}
    for fc in result.features:
        for s, contexts in _channels(fc):
            for ctx in contexts:
                ids = sequences[ctx.sequence]
                assert ctx.token_id == ids[ctx.position] and ctx.token == decode([ctx.token_id])
                assert ctx.before == decode(ids[max(0, ctx.position - WINDOW[0]):ctx.position])
                assert ctx.after == decode(ids[ctx.position + 1:ctx.position + 1 + WINDOW[1]])
                assert ctx.marked() == f"{ctx.before}⟦{ctx.token}⟧{ctx.after}"
                row = row_of[(ctx.sequence, ctx.position)]
                value = reference["shared"][row, fc.feature] if s is None else reference["single"][row, s, fc.feature]
                assert float(value) == pytest.approx(ctx.value, rel=1e-4, abs=1e-5)


def test_section_escapes_text(result: ContextsResult) -> None:
    page = contexts_section(result, {0: "persistent, emerges at step0"}, max_per_cell=2)
    assert "latent 0" in page and "persistent, emerges at step0" in page and page.count("<mark>") > 0
    assert "&lt;|endoftext|&gt;" in page or "<|endoftext|>" not in page
    hostile = Context(value=1.5, sequence=0, position=3, token_id=7, before="a <script>x", token="<x>", after="&\n")
    fake = ContextsResult(snapshots=["<s0>"], features=[FeatureContexts(5, [hostile], [[]])], n_tokens=10, top_k=1,
                          window=WINDOW)
    page = contexts_section(fake, {5: "<emerging>"})
    assert "<script>" not in page and "<x>" not in page and "<s0>" not in page and "<emerging>" not in page
    assert "a &lt;script&gt;x<mark>&lt;x&gt;</mark>&amp;↵" in page and "&lt;s0&gt;" in page


def test_cli_adds_the_contexts_section(dictionary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(dictionary), "--out", str(tmp_path / "report"), "--contexts", "1", "--context-tokens", "300",
          "--scaling-tokens", "300"])  # latent scaling re-runs the snapshots too: few tokens keep the test short
    page = (tmp_path / "report" / "report.html").read_text()
    assert f"<h2>{CONTEXTS_TITLE}</h2>" in page and "<mark>" in page
    assert "Latent scaling" in page and "over 300 tokens" in capsys.readouterr().out
    assert "latent 1 <span class='muted'>emerging, emerges at step4" in page  # the only emerging latent


def test_sources_without_text_are_refused(dictionary: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    planted = tmp_path / "planted"
    raw = json.loads((dictionary / CONFIG_FILE).read_text())
    raw["training"]["sources"]["kind"] = "planted"
    export_dictionary(load_dictionary(dictionary)[0].state_dict(), DictionaryMeta(**raw), planted)
    with pytest.raises(ConfigError, match=r"sources.kind='planted'.*no tokenizer"):
        top_contexts(planted, [0], log=lambda _: None)
    main([str(planted), "--out", str(tmp_path / "report"), "--context-tokens", "100"])
    assert "skipping top contexts: sources.kind='planted'" in capsys.readouterr().out
    assert CONTEXTS_TITLE not in (tmp_path / "report" / "report.html").read_text()
