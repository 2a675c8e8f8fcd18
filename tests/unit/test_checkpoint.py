"""Exported dictionaries: raw-space round trip, metadata, decoder norms, atomic replace, safetensors only;
non-finite states refused, truncated or corrupt files named."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import crosscoder.dictionary.io as checkpoint
from crosscoder.constants import CONFIG_FILE, DECODER_NORMS_FILE, WEIGHTS_FILE
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary, load_decoder_norms, load_dictionary, read_meta
from crosscoder.errors import DictionaryError

N_SOURCES, D_MODEL, DICT_SIZE, K = 3, 8, 32, 4
SCALE = torch.tensor([0.5, 2.0, 3.5])
SOURCES = [
    {"name": "step0", "path": "EleutherAI/pythia-70m", "revision": "step0", "step": 0},
    {"name": "step1000", "path": "EleutherAI/pythia-70m", "revision": "step1000", "step": 1000},
    {"name": "local-final", "path": "/models/final", "revision": None, "step": None},
]


def _model(activation: str) -> Crosscoder:
    """A crosscoder with a non-trivial input scale, random biases and (BatchTopK) a learnt threshold."""
    torch.manual_seed(0)
    model = Crosscoder(N_SOURCES, D_MODEL, DICT_SIZE, activation, k=K)
    model.set_input_scale(SCALE)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_()
        model.W_dec.mul_(1 + torch.rand(DICT_SIZE, N_SOURCES, 1))  # per-latent, per-source norms differ
    if activation == "batchtopk":
        for _ in range(3):
            model(torch.randn(64, N_SOURCES, D_MODEL))  # training mode: the eval threshold is estimated
        assert float(model.activation.threshold) > 0
    return model.eval()


def _meta(activation: str, tokens_seen: int = 123_456) -> DictionaryMeta:
    return DictionaryMeta(
        sources=[dict(s) for s in SOURCES], hook="blocks.4.hook_resid_pre", d_model=D_MODEL,
        dict_size=DICT_SIZE, activation=activation, k=K, aux_k=0, tokens_seen=tokens_seen, train_step=42,
        input_scale=[1.0] * N_SOURCES, training={"trainer": {"lr": 1e-3}},
    )


def _raw_input() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([2.0, 0.5, 0.3])[None, :, None]  # raw snapshots of different magnitudes
    return torch.randn(16, N_SOURCES, D_MODEL, generator=generator) * scale


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_export_round_trip(activation: str, tmp_path: Path) -> None:
    """The loaded dictionary is folded and gives the original model's raw-space reconstructions."""
    model = _model(activation)
    out = export_dictionary(model.state_dict(), _meta(activation), tmp_path / "dictionary")
    assert out == tmp_path / "dictionary"
    assert {p.name for p in out.iterdir()} == {WEIGHTS_FILE, DECODER_NORMS_FILE, CONFIG_FILE}

    loaded, meta = load_dictionary(out)
    assert loaded.is_folded and not model.is_folded
    assert not loaded.training
    x = _raw_input()
    with torch.no_grad():
        expected = model.decode(model.encode(x))
        actual = loaded.decode(loaded.encode(x))
        assert (model.encode(x) > 0).any()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    # The scale matters: ignoring it (a plain unscaled model) would not reproduce the reconstruction.
    assert not torch.allclose(expected, x, atol=1e-2)

    assert meta.sources == SOURCES
    assert meta.hook == "blocks.4.hook_resid_pre"
    assert (meta.tokens_seen, meta.train_step, meta.activation, meta.k) == (123_456, 42, activation, K)
    assert meta.input_scale == pytest.approx(SCALE.tolist())
    assert meta.normalization_folded is True
    assert meta.training == {"trainer": {"lr": 1e-3}}
    torch.testing.assert_close(loaded.input_scale, SCALE)

    norms = load_decoder_norms(out)
    assert norms.shape == (DICT_SIZE, N_SOURCES)
    torch.testing.assert_close(norms, model.decoder_norms().detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loaded.decoder_norms().detach(), norms, rtol=1e-5, atol=1e-6)
    expected_means = model.decoder_norms().detach().mean(dim=0).tolist()
    assert list(meta.decoder_norm_mean) == [s["name"] for s in SOURCES]
    assert list(meta.decoder_norm_mean.values()) == pytest.approx(expected_means)


def test_export_of_a_folded_state_is_not_folded_twice(tmp_path: Path) -> None:
    """Exporting an already folded model's state gives the same reconstructions again."""
    model = _model("relu")
    x = _raw_input()
    with torch.no_grad():
        expected = model.decode(model.encode(x))
    model.fold_normalization()
    loaded, _ = load_dictionary(export_dictionary(model.state_dict(), _meta("relu"), tmp_path / "d"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), expected, rtol=0, atol=1e-5)


def test_reexport_replaces_and_leaves_no_siblings(tmp_path: Path) -> None:
    """A second export over the same folder replaces it; no .tmp-/.old- folders remain."""
    out = tmp_path / "dictionary"
    export_dictionary(_model("topk").state_dict(), _meta("topk", tokens_seen=1), out)
    (out / "stale.txt").write_text("from the first export")
    export_dictionary(_model("relu").state_dict(), _meta("relu", tokens_seen=2), out)
    meta = read_meta(out)
    assert (meta.tokens_seen, meta.activation) == (2, "relu")
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dictionary"]


def test_failed_export_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure midway leaves neither the final folder nor a temporary one; an older export survives."""
    real_save = checkpoint.save_safetensors
    calls: list[Path] = []

    def failing_save(tensors: dict[str, torch.Tensor], path: Path, **kwargs: Any) -> None:  # noqa: ANN401
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, path, **kwargs)

    monkeypatch.setattr(checkpoint, "save_safetensors", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_dictionary(_model("relu").state_dict(), _meta("relu"), tmp_path / "dictionary")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(checkpoint, "save_safetensors", real_save)
    export_dictionary(_model("relu").state_dict(), _meta("relu", tokens_seen=7), tmp_path / "dictionary")
    calls.clear()
    monkeypatch.setattr(checkpoint, "save_safetensors", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_dictionary(_model("topk").state_dict(), _meta("topk", tokens_seen=8), tmp_path / "dictionary")
    assert [p.name for p in tmp_path.iterdir()] == ["dictionary"]
    assert read_meta(tmp_path / "dictionary").tokens_seen == 7
    load_dictionary(tmp_path / "dictionary")


def test_loading_a_folder_without_config_names_it(tmp_path: Path) -> None:
    """A folder that is not an exported dictionary raises FileNotFoundError naming the folder."""
    folder = tmp_path / "not-a-dictionary"
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        load_dictionary(folder)


def test_load_uses_safetensors_not_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading works with torch.load and pickle disabled: the weights are safetensors, the metadata JSON."""
    model = _model("topk")
    out = export_dictionary(model.state_dict(), _meta("topk"), tmp_path / "dictionary")

    def forbidden(*args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        raise AssertionError("unpickling is not allowed when loading a dictionary")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded, _ = load_dictionary(out)
    norms = load_decoder_norms(out)
    torch.testing.assert_close(loaded.W_enc.detach(), model.W_enc.detach() * SCALE[:, None, None])
    assert norms.shape == (DICT_SIZE, N_SOURCES)


@pytest.mark.parametrize(("tensor", "value"), [("W_dec", float("nan")), ("b_enc", float("inf")),
                                               ("input_scale", float("nan"))])
def test_export_refuses_a_non_finite_state_and_keeps_the_older_export(tensor: str, value: float,
                                                                     tmp_path: Path) -> None:
    """A NaN/inf anywhere in the state is a DictionaryError naming the tensor; nothing is written, so the
    previous export of the same folder stays whole."""
    out = tmp_path / "dictionary"
    export_dictionary(_model("relu").state_dict(), _meta("relu", tokens_seen=7), out)
    state = {name: t.clone() for name, t in _model("relu").state_dict().items()}
    state[tensor].view(-1)[0] = value
    with pytest.raises(DictionaryError, match=rf"1 non-finite value\(s\) .* in {tensor} .*nothing was exported"):
        export_dictionary(state, _meta("relu", tokens_seen=8), out)
    assert [p.name for p in tmp_path.iterdir()] == ["dictionary"]
    assert read_meta(out).tokens_seen == 7
    load_dictionary(out)


def test_export_refuses_a_state_that_overflows_when_folded(tmp_path: Path) -> None:
    """A zero input scale is finite but folding divides by it: refused, naming the folded tensor."""
    state = _model("relu").state_dict()
    state["input_scale"] = torch.tensor([0.5, 0.0, 3.5])
    with pytest.raises(DictionaryError, match=r"the folded dictionary has .* in W_dec"):
        export_dictionary(state, _meta("relu"), tmp_path / "dictionary")
    assert list(tmp_path.iterdir()) == []


def _exported(tmp_path: Path) -> Path:
    return export_dictionary(_model("topk").state_dict(), _meta("topk"), tmp_path / "dictionary")


@pytest.mark.parametrize("name", [WEIGHTS_FILE, DECODER_NORMS_FILE])
@pytest.mark.parametrize("keep", [0.5, 0.0, 20])
def test_a_truncated_safetensors_file_is_named(name: str, keep: float, tmp_path: Path) -> None:
    """A safetensors file cut short (half of it, empty, or inside its header) is a DictionaryError (a
    ValueError) naming the file and the cause, from every loader that reads it."""
    out = _exported(tmp_path)
    data = (out / name).read_bytes()
    (out / name).write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    load = (lambda: load_dictionary(out)) if name == WEIGHTS_FILE else (lambda: load_decoder_norms(out))
    with pytest.raises(DictionaryError, match=rf"{re.escape(str(out / name))} is truncated or not a safetensors "
                                              r"file \(.+\); re-export it"):
        load()
    assert issubclass(DictionaryError, ValueError)


@pytest.mark.parametrize(("text", "cause"), [
    ('{"sources": [', r"is truncated or not valid JSON"),
    ("\xff\xfe not json", r"is truncated or not valid JSON"),
    ("[1, 2]", r"holds a JSON list"),
    ('{"format_version": 1, "hook": "blocks.0.hook_resid_pre"}', r"does not fit the dictionary metadata"),
    ('{"format_version": 99}', r"format_version=99, expected 1"),
])
def test_an_unusable_config_json_is_named(text: str, cause: str, tmp_path: Path) -> None:
    """config.json that does not parse, or parses into something else than the metadata: DictionaryError
    naming the file."""
    out = _exported(tmp_path)
    (out / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(DictionaryError, match=re.escape(str(out / CONFIG_FILE)) + r".*" + cause):
        read_meta(out)
    with pytest.raises(DictionaryError, match=cause):
        load_dictionary(out)


def test_weights_that_do_not_fit_the_metadata_are_named(tmp_path: Path) -> None:
    """Weights of another dictionary size than config.json says: one DictionaryError line naming both files."""
    out = _exported(tmp_path)
    other = export_dictionary(Crosscoder(N_SOURCES, D_MODEL, 2 * DICT_SIZE, "topk", k=K).state_dict(),
                              DictionaryMeta(**{**_meta("topk").__dict__, "dict_size": 2 * DICT_SIZE}),
                              tmp_path / "other")
    (out / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(DictionaryError, match=rf"{re.escape(str(out / WEIGHTS_FILE))} does not match "
                                              rf"{re.escape(str(out / CONFIG_FILE))} \(.*size mismatch") as error:
        load_dictionary(out)
    assert "\n" not in str(error.value)


def test_decoder_norms_without_their_tensor_are_named(tmp_path: Path) -> None:
    out = _exported(tmp_path)
    save_file({"something_else": torch.zeros(2)}, str(out / DECODER_NORMS_FILE))
    with pytest.raises(DictionaryError, match=rf"{re.escape(str(out / DECODER_NORMS_FILE))} has no tensor "
                                              "decoder_norms"):
        load_decoder_norms(out)
