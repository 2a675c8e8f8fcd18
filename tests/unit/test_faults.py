"""Faults in-process: a full disk at the final export keeps a training state that finishes the run, resuming
onto other weights under the same snapshot names is refused, what the tools do with an OSError from writing
their output, and a killed activation worker stops the very next step. The faults driven through launched
processes: tests/launch/test_faults.py."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from crosscoder.cli.train import train
from crosscoder.constants import DICTIONARY_DIR, RUN_SUMMARY_FILE, WEIGHTS_FILE
from crosscoder.data.stream import ActivationStream
from crosscoder.errors import ConfigError, StorageError
from crosscoder.storage import exit_if_storage_failed
from tests.helpers import copy_snapshots, states, tiny_overrides, tiny_run_config, train_cli


@pytest.mark.usefixtures("clean_process_env")
def test_a_full_disk_at_the_final_export_keeps_a_state_that_finishes_it(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up just as the dictionary is written (the writer raises ENOSPC): the run stops naming the
    dictionary and the full disk, a training state of the last step is already on disk, and resuming from it
    only exports."""
    import crosscoder.dictionary.io

    cfg = tiny_run_config(toy_cache, tmp_path / "run")
    cfg.trainer.total_tokens = 128 * 6

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(crosscoder.dictionary.io, "save_safetensors", full_disk)
        with pytest.raises(StorageError, match=r"cannot write the dictionary .*/dictionary: no space left on the "
                                               r"device .*the last complete training state is .*step_0000006"):
            train(cfg)
    assert states(tmp_path / "run") == [6] and not (tmp_path / "run" / DICTIONARY_DIR).exists()

    cfg.trainer.resume = "auto"
    result = train(cfg)
    assert result.steps == 6 and (result.dictionary_dir / WEIGHTS_FILE).is_file()
    assert json.loads((tmp_path / "run" / RUN_SUMMARY_FILE).read_text())["resumed_from_step"] == 6


@pytest.mark.usefixtures("clean_process_env")
def test_resuming_onto_other_weights_under_the_same_names_is_refused(tiny_snapshots: list, toy_cache: Path,
                                                                      tmp_path: Path) -> None:
    """A run's snapshot folder now holds another checkpoint (same names): resuming is refused naming it."""
    paths = copy_snapshots(tiny_snapshots, tmp_path / "snapshots")
    cfg = tiny_run_config(toy_cache, tmp_path / "run")
    cfg.sources.kind, cfg.sources.paths = "hf", [str(path) for path in paths]
    cfg.trainer.total_tokens, cfg.trainer.state_every = 128 * 4, 2
    train(cfg)
    shutil.copyfile(paths[1] / "model.safetensors", paths[2] / "model.safetensors")  # step12 now holds step4
    cfg.trainer.resume = "auto"
    with pytest.raises(ConfigError, match=r"the training state .*step_0000004 was made from a different snapshot "
                                          r"'step12' \(fingerprint"):
        train(cfg)


def test_a_tools_write_that_failed_for_storage_is_one_line_exit_2_and_other_errors_go_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What crosscoder-analyze, -match, -compare and -eval do with an OSError from writing their output."""
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.html"))
    with pytest.raises(SystemExit) as stopped:
        exit_if_storage_failed("crosscoder-compare", full, tmp_path)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (f"crosscoder-compare: cannot write {tmp_path / 'report.html'}: no space left "
                                       "on the device ([Errno 28] No space left on device)\n")
    exit_if_storage_failed("crosscoder-compare", OSError(errno.ENOENT, "No such file", str(tmp_path / "x")), tmp_path)
    assert capsys.readouterr().err == ""  # not storage: returned, for the caller to raise


@pytest.mark.usefixtures("clean_process_env")
def test_a_killed_worker_stops_the_next_step_with_one_line_and_a_state(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 23, case 15: SIGKILL to the activation worker once step 10's batch is served, its slots full and the
    shuffle buffer holding rows: step 11 (the next batch) stops the run with one line naming the worker, its
    signal and the training state of step 11, exit 1 (it used to train on what was queued for dozens of steps)."""
    killed_after, served = 11, [0]
    serve = ActivationStream.__next__

    def serve_then_kill(stream: ActivationStream) -> object:
        batch = serve(stream)
        served[0] += 1
        if served[0] == killed_after:
            worker = next(p for p in multiprocessing.active_children()
                          if p.name == "crosscoder-activation-worker-0")
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=10)  # reaped: "dead" from here on
        return batch

    monkeypatch.setattr(ActivationStream, "__next__", serve_then_kill)
    overrides = [o for o in tiny_overrides(toy_cache) if not o.startswith(("tracking=", "trainer.total_tokens="))]
    code, _, err = train_cli([*overrides, "trainer.total_tokens=6400", "data.workers.slots=4",
                              "data.shuffle.buffer_tokens=1024", "tracking=disabled"], tmp_path / "run",
                             monkeypatch, capsys)
    assert code == 1, err
    line = err.strip().splitlines()[-1]  # after any progress lines (stderr, every 2 s)
    assert re.match(r"crosscoder: activation worker 0 \(pid \d+\) was killed by SIGKILL", line)
    assert f"(at step {killed_after}); the training state of step {killed_after} is saved" in line
    assert "continue it with: crosscoder-train" in line and "trainer.resume=auto" in line
    assert served[0] == killed_after and states(tmp_path / "run") == [killed_after]
    assert not (tmp_path / "run" / DICTIONARY_DIR).exists()
