"""Configuration through the real entry point: `python -m crosscoder.train` refuses an empty data.paths file
before loading anything. In-process: tests/unit/test_config.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import run, tiny_overrides


@pytest.mark.slow
def test_train_entry_point_refuses_an_empty_text_file_before_loading_anything(tmp_path: Path) -> None:
    """`python -m crosscoder.train data.kind=text_files` with an empty file: exit 2, one line naming the key
    and the file, before any snapshot is built or any activation worker starts."""
    good, empty = tmp_path / "good.txt", tmp_path / "empty.txt"
    good.write_text("Some text to read.\n")
    empty.write_text("\n  \n")
    toy_cache = tmp_path / "toy"  # its own: the session's may already hold snapshots
    result = run([sys.executable, "-m", "crosscoder.train", *tiny_overrides(toy_cache), "data.kind=text_files",
                  f"data.paths=['{good}','{empty}']", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, returncode=2)
    assert result.stderr.strip().splitlines() == [
        f"crosscoder: configuration error: data.paths[1]={str(empty)!r} is empty (whitespace only)"
    ], result.stderr
    assert "activation worker" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not toy_cache.exists(), "the toy snapshots were built before the data paths were checked"
