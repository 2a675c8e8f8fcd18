"""Issue 23, cases 16 and 17, through the real entry points: a run refused at start-up or failing before it wrote
anything leaves no folder it made (a resume leaves no new run dir, a failed first state save no empty states
folder), and every safetensors file a tool writes has the mode the umask gives any other new file."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from crosscoder.constants import DICTIONARY_DIR, TRAINING_STATES_DIR
from tests.helpers import console_cli, train_cli, write_activation_folder

pytestmark = pytest.mark.usefixtures("clean_process_env")


def _cache_cli(arguments: list[str], monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`crosscoder-cache <arguments>` in this process (Hydra's own run dir unless the arguments set one)."""
    from crosscoder.cli.cache import main

    return console_cli(main, ["crosscoder-cache", *arguments], monkeypatch, capsys)


def _planted_cache(cache_dir: Path) -> list[str]:
    return ["sources=planted", f"data.cache.dir={cache_dir}", "data.cache.tokens=1024", "tracking=disabled"]


def _files_run(tmp_path: Path) -> list[str]:
    rows = torch.randn(2048, 3, 8, generator=torch.Generator().manual_seed(0))
    folder = write_activation_folder(tmp_path / "acts", rows, [{"name": f"L{layer}", "layer": layer}
                                                               for layer in range(3)])
    return ["sources=files", f"sources.files.dir={folder}", "crosscoder.dict_size=16", "trainer.batch_size=64",
            "trainer.total_tokens=640", "trainer.state_every=4", "tracking=disabled", "deepspeed=zero0"]


def test_a_refused_or_crashed_cache_build_leaves_no_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Case 16 (a): Hydra's outputs/<date>/<time>/ (its .hydra/ and log) goes with a refusal (exit 2, one line)
    and with a traceback; an empty folder hydra.run.dir named is left empty, one holding files is left alone."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _cache_cli([*_planted_cache(tmp_path / "cache"), "trainer.batch_size=-3"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "trainer.batch_size=-3" in err, err
    assert sorted(os.listdir(tmp_path)) == []

    def crash(*_: object) -> None:
        raise RuntimeError("an unexpected failure")

    monkeypatch.setattr("crosscoder.cli.cache.build_cache", crash)
    code, _, err = _cache_cli(_planted_cache(tmp_path / "cache"), monkeypatch, capsys)
    assert code == 1 and "an unexpected failure" in err
    assert sorted(os.listdir(tmp_path)) == []

    empty, results = tmp_path / "empty", tmp_path / "results"
    empty.mkdir()
    results.mkdir()
    (results / "notes.txt").write_text("the user's")
    for folder in (empty, results):
        code, _, err = _cache_cli([*_planted_cache(tmp_path / "cache"), f"hydra.run.dir={folder}"], monkeypatch,
                                  capsys)
        assert code == 1, err
    assert os.listdir(empty) == [] and (results / "notes.txt").read_text() == "the user's"
    assert sorted(os.listdir(tmp_path)) == ["empty", "results"]


def test_a_resume_leaves_no_new_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Case 16 (b): `trainer.resume=<run dir>` continues in that run dir; the one Hydra made is removed."""
    run = _files_run(tmp_path)
    code, _, err = train_cli(run, tmp_path / "run", monkeypatch, capsys)
    assert code == 0, err
    code, out, err = train_cli([*run, f"trainer.resume={tmp_path / 'run'}"], tmp_path / "new" / "day" / "time",
                               monkeypatch, capsys)
    assert code == 0 and f"continuing the run in {tmp_path / 'run'}" in out, err
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "run" / DICTIONARY_DIR).is_dir() and (tmp_path / "run" / ".hydra").is_dir()


def test_a_failed_first_state_save_leaves_no_states_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Case 16 (c): a full disk at the first training-state save is one line and exit 2, and leaves no empty
    training_state/ (nor, in a fresh run dir that holds nothing else, the run dir)."""
    def disk_full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("crosscoder.training.state.save_safetensors", disk_full)
    run = _files_run(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    (results / "notes.txt").write_text("the user's")
    code, _, err = train_cli(run, results, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot write the training state" in err, err
    assert "no space left on the device" in err
    assert not (results / TRAINING_STATES_DIR).exists() and (results / "notes.txt").is_file()

    code, _, err = train_cli(run, tmp_path / "fresh", monkeypatch, capsys)
    assert code == 2, err
    assert not (tmp_path / "fresh").exists()


# ---- case 17: file modes --------------------------------------------------------------------------------------------


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_safetensors_files_have_the_mode_of_their_json(umask: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Case 17: cache shards, an exported dictionary's weights, a training state's rank tensors and the toy
    LM's weights are 0644 under umask 022 (a group sharing them can read them), like the JSON beside them;
    under umask 077 all are 0600."""
    from crosscoder.toy import ToyLMConfig, ensure_toy_snapshots

    expected = 0o666 & ~umask
    code, _, err = _cache_cli([*_planted_cache(tmp_path / "cache"), f"hydra.run.dir={tmp_path / 'cache-run'}"],
                              monkeypatch, capsys)
    assert code == 0, err
    code, _, err = train_cli(_files_run(tmp_path), tmp_path / "run", monkeypatch, capsys)
    assert code == 0, err
    toy = ensure_toy_snapshots(tmp_path / "toy", ToyLMConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                             intermediate_size=32, vocab_size=300, seq_len=16,
                                                             batch_size=4, train_steps=2, warmup_steps=1,
                                                             snapshot_steps=(0, 2), n_documents=120),
                               log=lambda _: None)
    state = sorted((tmp_path / "run" / TRAINING_STATES_DIR).iterdir())[0]
    pairs = {
        "cache": (next((tmp_path / "cache").glob("*.safetensors")), next((tmp_path / "cache").glob("*.json"))),
        "dictionary": (tmp_path / "run" / DICTIONARY_DIR / "weights.safetensors",
                       tmp_path / "run" / DICTIONARY_DIR / "config.json"),
        "training state": (state / "rank_00000.safetensors", state / "rank_00000.json"),
        "toy": (toy[0].path / "model.safetensors", toy[0].path / "config.json"),
    }
    modes = {what: (_mode(weights), _mode(beside)) for what, (weights, beside) in pairs.items()}
    assert modes == {what: (expected, expected) for what in pairs}
