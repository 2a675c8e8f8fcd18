"""The trainer recovers planted features and their emergence snapshots; a dictionary that is untrained, or
whose snapshots are out of order, does not pass the same bar (so the bar can fail)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from crosscoder.analysis.features.matching import recovery
from crosscoder.analysis.features.planted import planted_config, planted_recovery
from crosscoder.analysis.report.dictionary import analyze_dictionary
from crosscoder.analysis.report.scaling import DEFAULT_SCALING_TOKENS
from crosscoder.cli.analyze import main as analyze_main
from crosscoder.cli.train import train
from crosscoder.config import RunConfig
from crosscoder.config.recipes import FAMILY_RECIPES
from crosscoder.constants import ANALYSIS_DIR, ANALYSIS_REPORT_FILE
from crosscoder.data.planted import planted_truth
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import load_decoder_norms, load_firing_frequency, read_meta

RECOVERED, EMERGENCE_EXACT = 0.9, 0.85
FAMILY_RECOVERED, FAMILY_EMERGENCE_EXACT = 0.95, 0.95
"""The bar for a family's recipe (crosscoder.config.recipes), issues 13 and 23."""


def planted_run_config(output_dir: Path, family: str = "relu") -> RunConfig:
    """The planted budget (conf/sources/planted.yaml's comment): 4x as many latents as planted features, 390
    steps of 512 tokens; everything else is the family's recipe (crosscoder.config.recipes)."""
    cfg = RunConfig(output_dir=str(output_dir))
    cfg.sources.kind = "planted"  # 128 features over 8 snapshots, d=64: the defaults
    cfg.data.shuffle.buffer_tokens = 0  # planted rows are independent draws already
    cfg.crosscoder.activation, cfg.crosscoder.dict_size = family, 512
    cfg.trainer.batch_size, cfg.trainer.total_tokens = 512, 200_000
    cfg.trainer.state_every, cfg.trainer.log_every = 0, 100
    cfg.tracking.mode = "disabled"
    return cfg


def _train_clean(cfg: RunConfig) -> Path:
    from tests.helpers import outside_any_launch

    with outside_any_launch():
        return train(cfg).dictionary_dir


@pytest.fixture(scope="module")
def planted_dictionary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped crosscoder=relu group on the planted budget (the same run as planted_run_config's)."""
    return _train_clean(planted_run_config(tmp_path_factory.mktemp("planted") / "run", "relu"))


def test_trained_dictionary_recovers_planted_features_and_their_emergence(planted_dictionary: Path) -> None:
    result = planted_recovery(planted_dictionary)
    assert result is not None
    print(f"recovered {result.fraction_recovered:.3f}, emergence exact {result.emergence_accuracy:.3f}")
    assert result.fraction_recovered >= FAMILY_RECOVERED  # the bar of a shipped family recipe (issue 13)
    assert result.emergence_accuracy >= FAMILY_EMERGENCE_EXACT
    # The analysis' own emergence rule, on the exported norms, is what was scored.
    assert result.learned_emergence.max() < len(read_meta(planted_dictionary).sources)


def test_untrained_or_snapshot_shuffled_dictionaries_fail_the_same_bar(planted_dictionary: Path) -> None:
    assert_controls_fail(planted_dictionary, RECOVERED, EMERGENCE_EXACT)


FAMILY_SEEDS = {"relu": 101, "topk": 102, "batchtopk": 103, "jumprelu": 104, "snapshot_jumprelu": 105}
"""A planted world per family that no other test uses: the recipes were tuned on seed 0 and must not be fitted
to it."""


@pytest.mark.usefixtures("clean_process_env")
@pytest.mark.parametrize("family", list(FAMILY_SEEDS))
def test_a_family_chosen_by_name_recovers_planted_features_and_its_controls_fail(
        family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`crosscoder-train sources=planted crosscoder=<family>` with only the source and the budget set: the
    family's recipe fills the rest (and is printed); >= 95% of the planted features recovered with their exact
    emergence snapshot; the same family untrained, or the trained dictionary with its snapshots shuffled, does
    not pass."""
    from crosscoder.cli.train import main as train_main

    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "crosscoder-train", "sources=planted", f"sources.planted.seed={FAMILY_SEEDS[family]}", f"crosscoder={family}",
        "crosscoder.dict_size=512", "trainer.batch_size=512", "trainer.total_tokens=200000", "tracking=disabled",
        f"hydra.run.dir={run_dir}"])
    train_main()
    out = capsys.readouterr().out
    assert f"crosscoder: recipe for {family}: trainer.lr=" in out and "kept your" not in out
    dictionary = run_dir / "dictionary"
    result = planted_recovery(dictionary)
    assert result is not None
    print(f"{family}: recovered {result.fraction_recovered:.3f}, emergence exact {result.emergence_accuracy:.3f}")
    assert result.fraction_recovered >= FAMILY_RECOVERED
    assert result.emergence_accuracy >= FAMILY_EMERGENCE_EXACT
    meta = read_meta(dictionary)
    assert meta.activation == family and meta.training["trainer"]["lr"] == FAMILY_RECIPES[family]["trainer.lr"]
    assert_controls_fail(dictionary, FAMILY_RECOVERED, FAMILY_EMERGENCE_EXACT)
    if family == "snapshot_jumprelu":  # per-snapshot codes: a firing frequency per snapshot, through to the table
        frequency = load_firing_frequency(dictionary)
        assert frequency is not None and frequency.shape == (8, 512)
        columns = analyze_dictionary(dictionary).table.columns
        assert "firing_frequency" in columns and f"freq@{read_meta(dictionary).source_names[-1]}" in columns


def assert_controls_fail(dictionary: Path, recovered: float, emergence_exact: float) -> None:
    meta = read_meta(dictionary)
    truth = planted_truth(planted_config(meta.training))
    untrained = Crosscoder(n_sources=8, d_model=64, dict_size=512, activation=meta.activation).W_dec.detach()
    scores = {"untrained": recovery(untrained, truth.decoder, truth.emergence)}

    trained = planted_recovery(dictionary)
    assert trained is not None
    from safetensors.torch import load_file

    decoder = load_file(str(dictionary / "weights.safetensors"))["W_dec"]
    decoder = decoder * torch.tensor(meta.input_scale)[None, :, None]
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    scores["snapshots shuffled"] = recovery(decoder[:, order], truth.decoder, truth.emergence,
                                            learned_norms=load_decoder_norms(dictionary)[:, order])
    for name, score in scores.items():
        assert score.fraction_recovered < recovered or score.emergence_accuracy < emergence_exact, name
        assert score.fraction_recovered < 0.5, f"{name}: {score.summary()}"


def test_analyze_reports_recovery_for_a_planted_dictionary(planted_dictionary: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    analyze_main([str(planted_dictionary)])
    out = capsys.readouterr().out
    assert "planted features recovered" in out and "skipping top contexts" in out
    report = (planted_dictionary / ANALYSIS_DIR / ANALYSIS_REPORT_FILE).read_text()
    assert "recover" in report.lower()
    # Latent scaling runs by default on held-out planted draws: its columns, counts and section are there.
    assert "latent scaling:" in out and "Latent scaling" in report
    header = (planted_dictionary / ANALYSIS_DIR / "features.csv").read_text().splitlines()[0].split(",")
    assert {"shrinkage_artefact", "nu@snapshot0", "beta@snapshot7", "nu_own@snapshot3"} <= set(header)
    summary = json.loads((planted_dictionary / ANALYSIS_DIR / "summary.json").read_text())["latent_scaling"]
    print(f"latent scaling: {summary['latents_flagged']} of {summary['live_latents']} flagged")
    assert summary["tokens"] == DEFAULT_SCALING_TOKENS and summary["live_latents"] > 0
    # The latents matched to planted features have decoder norms that follow the planted magnitudes: none of
    # them is a shrinkage artefact (the 5 or so flagged on 2 CPU cores are duplicates sharing a feature).
    result = planted_recovery(planted_dictionary)
    assert result is not None
    with (planted_dictionary / ANALYSIS_DIR / "features.csv").open() as table:
        flagged = {int(row["feature"]) for row in csv.DictReader(table) if row["shrinkage_artefact"] == "True"}
    assert not flagged & set(result.learned_index[result.recovered].tolist())


def _per_snapshot_recovered(decoders: list[torch.Tensor], truth_decoder: torch.Tensor) -> list[float]:
    """For each snapshot s, the share of the features planted there that dictionary decoders[s] [F, d] holds
    (assignment on decoder cosine, >= the recovery cosine)."""
    from crosscoder.analysis.features.matching import RECOVERY_COSINE, linear_sum_assignment

    shares = []
    for s, learned in enumerate(decoders):
        present = truth_decoder[:, s].norm(dim=-1) > 0
        true = torch.nn.functional.normalize(truth_decoder[present, s], dim=-1)
        cos = true @ torch.nn.functional.normalize(learned, dim=-1).T
        rows, cols = linear_sum_assignment(-cos)
        shares.append(float((cos[rows, cols] >= RECOVERY_COSINE).float().mean()))
    return shares


def test_independent_dictionaries_each_recover_their_snapshots_features_in_one_pass(tmp_path: Path) -> None:
    """method=independent with crosscoder=topk (k 6, 128 latents per snapshot), the planted budget: one pass
    trains 8 single-snapshot dictionaries and exports them as a stack, each holding >= 95% of the features planted
    in its snapshot; crosscoder-match aligns them and the aligned stack, read as chains, recovers >= 90% of the
    planted features with their exact emergence snapshot. Controls that must fail: the dictionaries read against
    other snapshots, and the aligned stack with its snapshots shuffled. W&B logs each dictionary under its
    snapshot's name and the stack as one artifact."""
    from crosscoder.analysis.report.stack import load_stack_chains, stack_planted_recovery
    from crosscoder.cli import match as match_cli
    from crosscoder.dictionary.stack import load_stack_decoders, read_stack
    from tests.helpers import artifacts, history_keys, single_wandb_run_file

    cfg = planted_run_config(tmp_path / "run", "topk")
    cfg.method.name = "independent"
    cfg.crosscoder.dict_size, cfg.crosscoder.k = 128, 6
    cfg.tracking.mode, cfg.tracking.log_analysis = "offline", False
    stack = _train_clean(cfg)
    manifest, metas = read_stack(stack)
    assert manifest.method == "independent" and manifest.aligned == "none" and len(manifest.entries) == 8
    assert [meta.source_names for meta in metas] == [[name] for name in manifest.names]
    assert all(meta.train_step == 390 and meta.activation == "topk" for meta in metas)
    decoders, _, _ = load_stack_decoders(stack)
    truth = planted_truth(planted_config(metas[0].training))
    shares = _per_snapshot_recovered(list(decoders.unbind(1)), truth.decoder)
    print("per-snapshot recovered", [round(share, 3) for share in shares])
    assert min(shares) >= 0.95, shares
    shuffled = _per_snapshot_recovered(list(decoders.unbind(1)[::-1]), truth.decoder)  # snapshot 7's at 0, ...
    # The bar fails: the features change over training, so a far snapshot's dictionary misses many (neighbours
    # share most: 3 and 4 swapped still hold 91-96%).
    assert min(shuffled) < 0.7, shuffled

    match_cli.main([str(stack), "--out", str(tmp_path / "aligned")])
    aligned = stack_planted_recovery(tmp_path / "aligned")
    print("aligned stack", aligned.summary())
    assert aligned.fraction_recovered >= 0.9 and aligned.emergence_accuracy >= 0.9
    chains = load_stack_chains(tmp_path / "aligned").chains
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    control = recovery(chains.decoder[:, order], truth.decoder, truth.emergence, learned_norms=chains.norms[:, order])
    assert control.emergence_accuracy < 0.5, control.summary()

    wandb_file = single_wandb_run_file(tmp_path / "run")
    keys = history_keys(wandb_file)
    for name in manifest.names:
        assert {f"l0/{name}", f"explained_variance/{name}", f"decoder_norm/mean/{name}",
                f"density/log10_frequency_hist/{name}/values"} <= keys, sorted(keys)
    logged = [a for a in artifacts(wandb_file) if a.type == "stack"]
    assert len(logged) == 1
    contents = {c.path for c in logged[0].manifest.contents}
    assert "stack.json" in contents and f"{manifest.entries[-1].dictionary}/weights.safetensors" in contents


def test_one_snapshot_of_the_sources_trains_a_plain_sae_of_it(tmp_path: Path) -> None:
    """method.snapshot=snapshot5: a one-source dictionary of that snapshot (its input scale is the one the
    8-snapshot stream measures for it), holding its planted features; a name the sources lack is refused."""
    from crosscoder.dictionary.stack import read_stack
    from crosscoder.errors import ConfigError

    cfg = planted_run_config(tmp_path / "one", "topk")
    cfg.method.snapshot, cfg.crosscoder.dict_size, cfg.crosscoder.k = "snapshot5", 128, 6
    dictionary = _train_clean(cfg)
    meta = read_meta(dictionary)
    assert meta.source_names == ["snapshot5"]
    truth = planted_truth(planted_config(meta.training))
    decoder = load_dictionary_decoder(dictionary)
    assert _per_snapshot_recovered([decoder], truth.decoder[:, 5:6])[0] >= 0.95
    stack = tmp_path / "stack-run"
    whole = planted_run_config(stack, "topk")
    whole.method.name, whole.crosscoder.dict_size, whole.trainer.total_tokens = "independent", 128, 1024
    _, metas = read_stack(_train_clean(whole))
    assert meta.input_scale[0] == pytest.approx(metas[5].input_scale[0], rel=1e-5)

    cfg.method.snapshot, cfg.output_dir = "snapshot9", str(tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"method\.snapshot='snapshot9' is not one of the sources' snapshots"):
        _train_clean(cfg)


def load_dictionary_decoder(dictionary: Path) -> torch.Tensor:
    """[F, d] the single-snapshot dictionary's decoder in its normalised space."""
    from safetensors.torch import load_file

    return load_file(str(dictionary / "weights.safetensors"))["W_dec"][:, 0] * read_meta(dictionary).input_scale[0]


@pytest.mark.usefixtures("clean_process_env")
def test_sae_track_chain_recovers_the_planted_emergence_and_its_control_fails(tmp_path: Path) -> None:
    """method=sae_track with crosscoder=topk (k 6, 256 latents): 200k tokens from scratch on snapshot 0, then
    7 links of 51200 tokens each at the same rate (bench/stack_methods.py: the paper's ratios, a twentieth of the
    tokens at a tenth of the rate, leave the links too short to learn this problem's new features). Read as
    chains, the warm-start stack recovers >= 90% of the planted features with their exact emergence snapshot;
    with its snapshots shuffled it does not."""
    from crosscoder.analysis.report.stack import load_stack_chains, stack_planted_recovery
    from crosscoder.dictionary.stack import read_stack
    from crosscoder.training.sae_track import train_sae_track

    cfg = planted_run_config(tmp_path / "run", "topk")
    cfg.method.name, cfg.crosscoder.dict_size, cfg.crosscoder.k = "sae_track", 256, 6
    cfg.method.link_tokens, cfg.method.link_lr = 51200, 4e-3
    stack = train_sae_track(cfg, log=lambda _: None).dictionary_dir
    manifest, metas = read_stack(stack)
    assert manifest.aligned == "warm_start" and [entry.train_steps for entry in manifest.entries] == [390] + [100] * 7
    score = stack_planted_recovery(stack)
    print("sae_track", score.summary())
    assert score.fraction_recovered >= 0.9 and score.emergence_accuracy >= 0.9
    chains = load_stack_chains(stack).chains
    truth = planted_truth(planted_config(metas[0].training))
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    control = recovery(chains.decoder[:, order], truth.decoder, truth.emergence, learned_norms=chains.norms[:, order])
    assert control.emergence_accuracy < 0.5, control.summary()
