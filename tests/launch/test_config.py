"""Configuration through the real entry points: `python -m crosscoder.train` refuses an empty data.paths file
before loading anything; a mistake only the ranks of a launch can see is one line and exit 2 under
`crosscoder-launch`. In-process: tests/unit/test_config.py, tests/unit/test_bad_input.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from crosscoder.parallel.engine import free_port
from tests.helpers import REPO, run, tiny_overrides


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


@pytest.mark.slow
def test_a_mistake_the_ranks_find_is_one_line_and_exit_2_under_crosscoder_launch(tmp_path: Path) -> None:
    """Case 9 of issue 23: a layout the launch's 2 ranks cannot form (known only once the ranks count themselves).
    `accelerate launch` reports it as its ChildFailedError traceback with exit 1 (the control); `crosscoder-launch`
    with the same arguments exits with the rank's 2, and rank 0's line is all it prints."""
    overrides = ["sources=planted", "parallel.snapshot_parallel=3", "tracking=disabled",
                 f"hydra.run.dir={tmp_path / 'run'}"]
    launch_options = ["--config_file", str(REPO / "launch" / "cpu_2proc_zero2.yaml")]
    said = "crosscoder: configuration error: parallel.snapshot_parallel=3 does not divide the 2 ranks of this launch"
    plain = run([sys.executable, "-m", "accelerate.commands.launch", *launch_options, "--main_process_port",
                 str(free_port()), "-m", "crosscoder.train", *overrides], tmp_path, returncode=1)
    assert "ChildFailedError" in plain.stderr and said in plain.stderr
    wrapped = run([sys.executable, "-m", "crosscoder.cli.launch", *launch_options, "--main_process_port",
                   str(free_port()), "-m", "crosscoder.train", *overrides], tmp_path, returncode=2)
    errors = [line for line in wrapped.stderr.splitlines() if "[WARNING]" not in line]  # DeepSpeed's CPU notice
    assert errors == [said + " (world = data_parallel x snapshot_parallel)"], wrapped.stderr
    # Not asserted: that the run dir is gone. Both ranks make it, and each removes only a dir it made itself, so
    # under a launch it can stay (a race seen in CI; crosscoder.cli.run_dir).
