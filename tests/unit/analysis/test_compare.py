"""crosscoder-compare: a stack cut from a crosscoder's own decoder agrees with it (and a random one does not),
mismatched or unaligned inputs exit 2 with one line, the report is written, and the replayed per-snapshot EV and
L0 of a crosscoder and of its per-snapshot slices as a stack are the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crosscoder.analysis.alignment.compare import agreement, compare, decoder_similarity, load_input
from crosscoder.analysis.features.planted import planted_config
from crosscoder.analysis.inputs.replay import activation_batches
from crosscoder.analysis.report.compare import write_compare_report
from crosscoder.cli import compare as compare_cli
from crosscoder.data.planted import planted_truth
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary, load_dictionary
from crosscoder.dictionary.stack import StackEntry, StackManifest, write_stack_manifest
from tests.helpers import D_MODEL, hand_built_decoders, write_single

HOOK = "blocks.0.hook_resid_pre"  # write_single's
N_SNAPSHOTS = 3
NAMES = [f"snap{s}" for s in range(N_SNAPSHOTS)]
PLANTED = {"sources": {"kind": "planted", "planted": {"n_snapshots": N_SNAPSHOTS, "d_model": D_MODEL,
                                                      "n_features": 24}}}


def write_crosscoder(path: Path, w_dec: torch.Tensor, *, activation: str = "topk", names: list[str] = NAMES,
                     training: dict | None = None, fingerprints: list[str] | None = None) -> Path:
    """An exported crosscoder with decoder `w_dec` [F, S, d] (normalised space, input scale 1), encoder its
    transpose, no biases."""
    n_latents, n_snapshots, d_model = w_dec.shape
    model = Crosscoder(n_snapshots, d_model, n_latents, activation, k=4)
    with torch.no_grad():
        model.W_dec.copy_(w_dec)
        model.W_enc.copy_(w_dec.permute(1, 2, 0))
    meta = DictionaryMeta(
        sources=[{"name": name, "path": "toy", "revision": None, "step": 100 * s,
                  "fingerprint": fingerprints[s] if fingerprints else None} for s, name in enumerate(names)],
        hook=HOOK, d_model=d_model, dict_size=n_latents, activation=activation, k=4, aux_k=0, tokens_seen=5000,
        train_step=10, input_scale=[1.0] * n_snapshots, training=training or {})
    return export_dictionary(model.state_dict(), meta, path)


def write_aligned_stack(path: Path, decoders: list[torch.Tensor], *, aligned: str = "sae_match",
                        **per_snapshot: object) -> Path:
    """A stack of `write_single` dictionaries (decoder [F, d] each, snapshot names NAMES), one hook with the
    crosscoder's; `per_snapshot` keyword values go to every `write_single`."""
    entries = []
    for s, w_dec in enumerate(decoders):
        write_single(path / NAMES[s], NAMES[s], w_dec, **per_snapshot)
        entries.append(StackEntry(name=NAMES[s], dictionary=NAMES[s], step=100 * s, train_steps=10))
    manifest = StackManifest(method="independent", aligned=aligned, entries=entries, hook=HOOK,
                             details={"wall_seconds": 12.5})
    write_stack_manifest(path, manifest)
    return path


def crosscoder_and_permuted_stack(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    """The hand-built crosscoder and its per-snapshot slices as a stack, latents permuted (stack latent j is
    crosscoder latent perm[j]), marked aligned by sae_match."""
    decoders = hand_built_decoders()  # [F, d] per snapshot, 20 latents: classes and emergence known, 2 dead
    crosscoder = write_crosscoder(tmp_path / "run" / "dictionary", torch.stack(decoders, dim=1))
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"wall_seconds": 3.5, "tokens_seen": 777}))
    perm = torch.randperm(len(decoders[0]), generator=torch.Generator().manual_seed(1))
    stack = write_aligned_stack(tmp_path / "stack", [w[perm] for w in decoders])
    return crosscoder, stack, perm


def test_stack_cut_from_the_crosscoder_agrees(tmp_path: Path) -> None:
    crosscoder, stack, perm = crosscoder_and_permuted_stack(tmp_path)
    a, b = load_input(crosscoder), load_input(stack)
    assert a.evolution.emergence_counts.tolist() == b.evolution.emergence_counts.tolist() == [9, 4, 5]
    result = agreement(a, b)
    summary = result.summary()
    assert result.live == 18 and result.matched == 18 and summary["matched_share"] == pytest.approx(1.0)
    assert summary["mean_matched_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert summary["same_emergence_share"] == 1.0 and summary["emergence_within_one_share"] == 1.0
    assert perm[result.stack_index].tolist() == result.crosscoder_index.tolist()  # the permutation undone
    assert (a.kind, a.wall_seconds, a.tokens) == ("crosscoder", 3.5, 777)  # from the run's summary.json
    assert (b.kind, b.wall_seconds, b.tokens) == ("stack", 12.5, 3 * 1000)  # the manifest's details; tokens summed


def test_decoder_similarity_averages_where_both_are_present() -> None:
    e0, e1 = torch.eye(2)
    w_a = torch.stack([torch.stack([e0, e0, e1])])  # [1, 3, 2]: one latent
    w_b = torch.stack([torch.stack([e0, e1, e1]), torch.stack([e1, e1, e0])])  # [2, 3, 2]
    present_a = torch.tensor([[True, True, True]])
    present_b = torch.tensor([[True, True, False], [False, False, False]])
    similarity = decoder_similarity(w_a, present_a, w_b, present_b, block_rows=1)
    assert similarity.tolist() == [[0.5, 0.0]]  # (cos 1 at snapshot 0, 0 at 1) / 2; never both present: 0


def test_default_names_tell_repeated_folders_apart(tmp_path: Path) -> None:
    paths = [tmp_path / "a" / "dictionary", tmp_path / "b" / "dictionary"]
    assert compare_cli.default_names(paths) == ["a/dictionary", "b/dictionary"]
    assert compare_cli.default_names([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]
    assert compare_cli.default_out(paths) == tmp_path.resolve() / "compare"


def test_random_stack_does_not_agree(tmp_path: Path) -> None:
    """The failing control: directions drawn at random in every snapshot match (almost) nothing."""
    decoders = hand_built_decoders()
    crosscoder = write_crosscoder(tmp_path / "crosscoder", torch.stack(decoders, dim=1))
    gen = torch.Generator().manual_seed(2)
    random = [torch.randn(len(w), D_MODEL, generator=gen) for w in decoders]
    stack = write_aligned_stack(tmp_path / "stack", random)
    result = agreement(load_input(crosscoder), load_input(stack))
    assert result.live == 18 and result.matched_share < 0.1


def _one_line_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        compare_cli.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("crosscoder-compare: ")
    return error


def test_mismatched_or_unaligned_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    decoders = hand_built_decoders()
    renamed = write_crosscoder(tmp_path / "renamed", torch.stack(decoders, dim=1), names=["snap0", "snap1", "late"])
    stack = write_aligned_stack(tmp_path / "stack", decoders)
    error = _one_line_exit([str(stack), str(renamed), "--tokens", "0"], capsys)
    assert "snapshot 2 is 'late' in renamed but 'snap2' in stack" in error
    unaligned = write_aligned_stack(tmp_path / "unaligned", decoders, aligned="none")
    error = _one_line_exit([str(renamed), str(unaligned), "--tokens", "0"], capsys)
    assert "aligned: none" in error and "run crosscoder-match" in error
    assert not (tmp_path / "compare").exists()


def test_crosscoders_of_other_snapshots_under_the_same_names_exit_2(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 23, case 3: two models' snapshots both called snap0..2 (other fingerprints) are not compared (the
    second was scored on the first's activations before); the same fingerprints, or none recorded, compare."""
    decoder = torch.stack(hand_built_decoders(), dim=1)
    one = write_crosscoder(tmp_path / "one", decoder, fingerprints=["a1" * 32, "b1" * 32, "c1" * 32])
    other = write_crosscoder(tmp_path / "other", decoder, fingerprints=["a1" * 32, "f2" * 32, "c1" * 32])
    error = _one_line_exit([str(one), str(other), "--tokens", "0"], capsys)
    assert "snapshot 'snap1' of other is not the one of one (fingerprints f2f2f2f2f2f2 and b1b1b1b1b1b1" in error
    same = write_crosscoder(tmp_path / "same", decoder, fingerprints=["a1" * 32, "b1" * 32, "c1" * 32])
    unrecorded = write_crosscoder(tmp_path / "unrecorded", decoder)
    compare_cli.main([str(one), str(same), str(unrecorded), "--tokens", "0", "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "report.html").is_file()


def test_cli_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crosscoder, stack, _ = crosscoder_and_permuted_stack(tmp_path)
    compare_cli.main([str(crosscoder), str(stack), "--tokens", "0", "--names", "xc", "sae"])
    out = tmp_path / "compare"  # default: compare/ in the folder holding both inputs
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1  # the emergence figure; no replay, so no EV/L0 figures
    assert "Skipped: replay disabled" in page and "sae_match" in page
    data = json.loads((out / "compare.json").read_text())
    assert data["snapshots"] == NAMES and [item["name"] for item in data["inputs"]] == ["xc", "sae"]
    assert [item["emergence_counts"] for item in data["inputs"]] == [[9, 4, 5], [9, 4, 5]]
    assert data["inputs"][1]["class_counts"]["dead"] == 2 and data["inputs"][1]["wall_seconds"] == 12.5
    assert data["agreement"][0]["matched_share"] == pytest.approx(1.0) and data["replay"]["skipped"]


def block_decoder() -> tuple[torch.Tensor, list[int]]:
    """[F, S, d] unit planted directions, latents in one block per snapshot (decoder zero elsewhere), blocks of
    different sizes: with a ReLU and the encoder the decoder's transpose, a latent of block s reads and writes
    snapshot s only, so the crosscoder and its per-snapshot slices reconstruct every snapshot identically."""
    truth = planted_truth(planted_config(PLANTED))
    sizes = [3, 7, 12]
    rows = []
    for s, size in enumerate(sizes):
        on = torch.nonzero(truth.magnitudes[:, s] > 0).flatten()[:size]
        assert len(on) == size
        block = torch.zeros(size, N_SNAPSHOTS, D_MODEL)
        block[:, s] = truth.decoder[on, s] / truth.decoder[on, s].norm(dim=1, keepdim=True)
        rows.append(block)
    return torch.cat(rows), sizes


def test_replayed_ev_and_l0_of_a_crosscoder_and_its_slices(tmp_path: Path) -> None:
    w_dec, _ = block_decoder()
    crosscoder = write_crosscoder(tmp_path / "crosscoder", w_dec, activation="relu", training=PLANTED)
    stack = write_aligned_stack(tmp_path / "stack", [w_dec[:, s] for s in range(N_SNAPSHOTS)], activation="relu",
                                tag=torch.zeros(len(w_dec)), training=PLANTED)
    # The stack first: the replay then re-creates the activations from the stack's metadata.
    result = compare([stack, crosscoder], n_tokens=3000, log=lambda _: None)
    replay = result.replay
    assert replay.reason is None and replay.n_tokens == 3000
    ev_stack, ev_crosscoder = replay.explained_variance
    assert ev_stack == pytest.approx(ev_crosscoder, abs=1e-5)
    assert min(abs(a - b) for i, a in enumerate(ev_crosscoder) for b in ev_crosscoder[i + 1:]) > 0.01
    l0_stack, l0_crosscoder = replay.l0
    assert len(set(l0_crosscoder)) == 1 and l0_crosscoder[0] == pytest.approx(sum(l0_stack))
    assert len(set(l0_stack)) == N_SNAPSHOTS

    model, meta = load_dictionary(crosscoder)  # the crosscoder's EV computed here directly
    x = torch.cat(list(activation_batches(meta, 3000)))
    with torch.no_grad():
        error = (x - model.decode(model.encode(x))).double().pow(2).sum(dim=(0, 2))
    variance = (x.double() - x.double().mean(dim=0)).pow(2).sum(dim=(0, 2))
    assert ev_crosscoder == pytest.approx((1 - error / variance).tolist(), abs=1e-5)

    page = write_compare_report(result, tmp_path / "report").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "Skipped" not in page
    saved = json.loads((tmp_path / "report" / "compare.json").read_text())["replay"]
    assert saved["explained_variance"] == replay.explained_variance and saved["skipped"] is None
