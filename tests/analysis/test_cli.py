"""crosscoder-analyze end to end on an exported dictionary, and its error on a bad path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crosscoder.analysis.cli import _parser, main
from tests.analysis.conftest import EXPECTED_CLASSES


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

