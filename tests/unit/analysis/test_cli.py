"""crosscoder-analyze end to end on an exported dictionary, and its one-line errors on a bad path or a truncated
or corrupt dictionary file. Through the real command: tests/launch/analysis/test_cli.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from crosscoder.cli.analyze import _parser, main
from crosscoder.constants import CONFIG_FILE, DECODER_NORMS_FILE, WEIGHTS_FILE
from tests.helpers import EXPECTED_CLASSES, _truncate


def test_cli_end_to_end(dictionary_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(dictionary_dir), "--max-rows", "10"])
    printed = capsys.readouterr().out
    report = dictionary_dir / "analysis" / "report.html"
    assert f"report: {report}" in printed and "loading" in printed
    assert report.is_file()
    assert json.loads((report.parent / "summary.json").read_text())["class_counts"] == EXPECTED_CLASSES
    args = _parser().parse_args([str(dictionary_dir), "--out", str(tmp_path / "custom")])
    assert args.out == str(tmp_path / "custom")  # analyze_dictionary's out_dir is tested in test_report


def test_cli_rejects_a_folder_that_is_not_a_dictionary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "not-a-dictionary"
    bad.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert str(bad) in error and "config.json" in error
    assert not (bad / "analysis").exists()

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'nowhere'} is not an exported dictionary: no such folder" in capsys.readouterr().err


def _garble(path: Path) -> None:
    path.write_text(path.read_text()[:40])  # cut inside the JSON object


@pytest.mark.parametrize(("name", "damage", "cause"), [
    (WEIGHTS_FILE, _truncate, "is truncated or not a safetensors file"),
    (DECODER_NORMS_FILE, _truncate, "is truncated or not a safetensors file"),
    (CONFIG_FILE, _garble, "is truncated or not valid JSON"),
])
def test_cli_names_a_truncated_or_corrupt_dictionary_file(name: str, damage: Callable[[Path], None], cause: str,
                                                          dictionary_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Each damaged file gives exit status 2 and one stderr line naming that file and the cause; no report."""
    damage(dictionary_dir / name)
    with pytest.raises(SystemExit) as exit_info:
        main([str(dictionary_dir)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("crosscoder-analyze: "), error
    assert f"{dictionary_dir / name} {cause} (" in error and "re-export it" in error
    assert "usage:" not in error and "Traceback" not in error
    assert not (dictionary_dir / "analysis").exists()
