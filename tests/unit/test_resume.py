"""Resuming in-process (one rank, ZeRO-2): a run continued from a training state ends with exactly the weights
of the uninterrupted run; corrupt or partial states are refused, and `auto` falls back to the previous one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from crosscoder.cli.cache import build_cache
from crosscoder.cli.train import train
from crosscoder.config import RunConfig
from crosscoder.constants import DICTIONARY_DIR, TRAINER_STATE_FILE, TRAINING_STATE_MANIFEST, TRAINING_STATES_DIR
from crosscoder.dictionary.io import load_dictionary
from crosscoder.errors import CheckpointError, ConfigError
from crosscoder.training.state import list_training_states
from tests.helpers import outside_any_launch, tiny_run_config

STEPS = 9


@pytest.fixture(scope="module")
def finished_run(tiny_snapshots: list, toy_cache: Path, tmp_path_factory: pytest.TempPathFactory,
                 ) -> tuple[RunConfig, Path, dict[str, torch.Tensor]]:
    """An uninterrupted 9-step run from a cache, shuffled, W&B offline, saving its state every 3 steps."""
    workdir = tmp_path_factory.mktemp("resume")
    cfg = resume_config(toy_cache, workdir / "run")
    cfg.data.cache.dir, cfg.data.workers.num_workers = str(workdir / "acts"), 1
    build_cache(cfg, log=lambda _: None)
    cfg.data.workers.num_workers = 0
    with outside_any_launch():  # as clean_process_env does, for a module-scoped fixture
        result = train(cfg)
    model, _ = load_dictionary(result.dictionary_dir)
    return cfg, result.output_dir, {name: t.clone() for name, t in model.state_dict().items()}


def resume_config(toy_cache: Path, output_dir: Path) -> RunConfig:
    cfg = tiny_run_config(toy_cache, output_dir)
    cfg.trainer.total_tokens, cfg.trainer.state_every, cfg.trainer.keep_states = 128 * STEPS, 3, 2
    cfg.data.shuffle.buffer_tokens = 512  # rows stay in the buffer across the saved steps
    cfg.deepspeed.zero_stage, cfg.tracking.mode = 2, "offline"
    return cfg


def assert_same_weights(run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    model, _ = load_dictionary(run_dir / DICTIONARY_DIR)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name} differs after resuming"


def test_states_are_kept_with_retention_and_record_the_run(finished_run: tuple) -> None:
    _, run_dir, _ = finished_run
    states = list_training_states(run_dir / TRAINING_STATES_DIR)
    # keep_states=2, the newest saved just before the final export (so a failed export loses nothing)
    assert [path.name for path in states] == ["step_0000009", "step_0000006"]
    saved = json.loads((states[0] / TRAINER_STATE_FILE).read_text())
    assert saved["step"] == STEPS and saved["world_size"] == 1 and saved["wandb_run_id"]
    assert not list((run_dir / TRAINING_STATES_DIR).glob(".*")), "a temporary state folder was left behind"


def test_resume_from_a_state_ends_with_the_uninterrupted_weights(finished_run: tuple, tmp_path: Path,
                                                                  clean_process_env: None,  # noqa: F811
                                                                  capsys: pytest.CaptureFixture) -> None:
    cfg, run_dir, expected = finished_run
    state = run_dir / TRAINING_STATES_DIR / "step_0000006"
    cfg.output_dir, cfg.trainer.resume = str(tmp_path / "resumed"), str(state)
    result = train(cfg)
    assert result.steps == STEPS
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 6
    # Case 13 of issue 23: the progress counts the run's steps, and the run's time is the sessions' sum.
    earlier = json.loads((state / TRAINER_STATE_FILE).read_text())["run_seconds"]
    assert summary["session_seconds"] == result.wall_seconds and summary["run_seconds_known"]
    assert summary["wall_seconds"] == pytest.approx(earlier + result.wall_seconds, abs=1.0)
    assert result.run_seconds == summary["wall_seconds"] > result.wall_seconds
    output = capsys.readouterr()
    printed = output.out + output.err
    assert f"step {STEPS}/{STEPS} (100%)" in printed and "step 3/3" not in printed
    assert f"this session resumed at step 6 and trained 3 in {result.wall_seconds:.1f}s" in printed
    assert_same_weights(result.output_dir, expected)
    # The W&B run continues: the resumed run logs under the saved run id.
    run_id = json.loads((state / TRAINER_STATE_FILE).read_text())["wandb_run_id"]
    assert list((result.output_dir / "wandb").glob(f"offline-run-*-{run_id}")), "W&B did not continue the run"


def test_auto_refuses_a_corrupt_state_and_uses_the_previous(finished_run: tuple, tmp_path: Path,
                                                            clean_process_env: None,  # noqa: F811
                                                            capsys: pytest.CaptureFixture) -> None:
    cfg, run_dir, expected = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir / TRAINING_STATES_DIR, copy / TRAINING_STATES_DIR)
    newest = copy / TRAINING_STATES_DIR / "step_0000009"
    rank_file = newest / "rank_00000.safetensors"
    data = bytearray(rank_file.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte, same size
    rank_file.write_bytes(bytes(data))

    cfg.output_dir, cfg.trainer.resume = str(copy), str(newest)
    with pytest.raises(CheckpointError, match=r"rank_00000.safetensors does not match its sha256"):
        train(cfg)
    cfg.trainer.resume = "auto"
    train(cfg)
    out = capsys.readouterr().out
    assert "refusing training state" in out and "step_0000009" in out and "resumed from" in out
    assert "step_0000006 at step 6" in out
    assert_same_weights(copy, expected)


def test_partial_state_and_other_settings_are_refused(finished_run: tuple, tmp_path: Path,
                                                      clean_process_env: None) -> None:  # noqa: F811
    cfg, run_dir, _ = finished_run
    partial = tmp_path / "step_0000006"
    shutil.copytree(run_dir / TRAINING_STATES_DIR / "step_0000006", partial)
    (partial / TRAINING_STATE_MANIFEST).unlink()  # a save killed before its last write
    cfg.output_dir, cfg.trainer.resume = str(tmp_path / "out"), str(partial)
    with pytest.raises(CheckpointError, match="manifest.json is missing: the save did not finish"):
        train(cfg)

    cfg.trainer.resume = str(run_dir / TRAINING_STATES_DIR / "step_0000006")
    cfg.crosscoder.l1_coeff = 9.0
    with pytest.raises(ConfigError, match=r"crosscoder.l1_coeff=0.5, this run has crosscoder.l1_coeff=9.0"):
        train(cfg)


def test_resuming_under_another_zero_stage_is_refused(finished_run: tuple, toy_cache: Path, tmp_path: Path,
                                                      clean_process_env: None) -> None:  # noqa: F811
    """The state was saved under ZeRO-2; the one-rank default is ZeRO-0, whose engine cannot read ZeRO-2's
    optimizer partitions: refused before any load, naming the override that resumes it."""
    finished_cfg, run_dir, _ = finished_run
    cfg = resume_config(toy_cache, tmp_path / "out")  # the fixture's config is changed by the tests above
    cfg.data.cache.dir, cfg.data.workers.num_workers = finished_cfg.data.cache.dir, 0
    cfg.trainer.resume = str(run_dir / TRAINING_STATES_DIR / "step_0000006")
    cfg.deepspeed.zero_stage = None
    with pytest.raises(ConfigError, match=r"saved under ZeRO-2, this run has ZeRO-0; resume with "
                                          r"deepspeed.zero_stage=2"):
        train(cfg)
