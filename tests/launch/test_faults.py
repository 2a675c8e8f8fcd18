"""Faults driven through the real entry points: each case asserts the exit status, the one line that names the
cause, and what is (and is not) left on disk; where a fault leaves a training state, resuming finishes the run.

Disk-full and read-only cases mount a tmpfs (root, as on this project's CI machines); without that privilege
they are skipped, not faked. In-process faults: tests/unit/test_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crosscoder.constants import DICTIONARY_DIR, RUN_SUMMARY_FILE, TRAINING_STATES_DIR, WEIGHTS_FILE
from tests.helpers import PROCESS_ENV, REPO, copy_snapshots, run, states, tiny_overrides, wait_until

LONG_RUN = ["trainer.total_tokens=6400", "trainer.state_every=5", "trainer.log_every=10", "tracking=disabled"]
"""50 steps, a training state every 5: long enough to fault in the middle (W&B is not what these tests check)."""
INLINE = "data.workers.num_workers=0"
"""The snapshots run in the trainer process: for the tests whose subject is not the workers (a spawned worker
costs a launch ~6 s on 2 cores)."""


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "crosscoder.train", *overrides]


def last_line(result: subprocess.CompletedProcess) -> str:
    return last_line_of(result, "crosscoder:")


def last_line_of(result: subprocess.CompletedProcess, prefix: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert lines, result.stderr[-3000:]
    return lines[-1]


def start(command: list[str], workdir: Path, log: Path) -> subprocess.Popen:
    """A run in its own session, as a terminal job is: a signal to its process group reaches every process."""
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_ENV}
    env = {**inherited, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def worker_pids(parent: int) -> list[int]:
    """The activation workers (spawned children) of process `parent`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cmdline = (stat.parent / "cmdline").read_bytes() if (stat.parent / "cmdline").exists() else b""
        if int(fields[1]) == parent and b"spawn_main" in cmdline:  # not the resource tracker
            found.append(int(stat.parent.name))
    return found


def resume_from_message(line: str, workdir: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    """Run the resume command the stop printed, as a user would paste it."""
    command = line.split("continue it with: ", 1)[1]
    arguments = shlex.split(command)
    assert arguments[0] == "crosscoder-train"
    return run(train_command(*arguments[1:]), workdir, returncode)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / DICTIONARY_DIR / WEIGHTS_FILE))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    """mount(size, read_only) -> a fresh tmpfs folder, unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str = "8m", read_only: bool = False) -> Path:
        where = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_diverging_run_stops_before_the_update_and_exports_nothing(tiny_snapshots: list, toy_cache: Path,
                                                                     tmp_path: Path) -> None:
    """An absurd learning rate without clipping: the loss goes non-finite; the run stops naming the step, with
    exit 1, no dictionary and no summary (an untrained or NaN dictionary is never exported as if complete)."""
    run_dir = tmp_path / "run"
    result = run(train_command(*tiny_overrides(toy_cache), "trainer.lr=1e36", "trainer.lr_warmup_steps=0",
                               "trainer.grad_clip=0", INLINE, f"hydra.run.dir={run_dir}"), tmp_path, returncode=1)
    assert re.fullmatch(r"crosscoder: the loss became NaN/inf at step \d+: the crosscoder diverged .*nothing exported",
                        last_line(result))
    assert "Traceback" not in result.stderr
    assert not (run_dir / DICTIONARY_DIR).exists() and not (run_dir / RUN_SUMMARY_FILE).exists()


def test_a_killed_worker_saves_a_state_and_the_printed_command_resumes_exactly(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path) -> None:
    """SIGKILL to the activation worker mid-run (what the OOM killer does): the trainer saves a training state at
    the step it reached and prints one line naming the worker and the resume command; running that command
    ends with exactly the weights of a run never interrupted."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    overrides = [*tiny_overrides(toy_cache), *LONG_RUN]
    job = start(train_command(*overrides, f"hydra.run.dir={run_dir}"), tmp_path, log)
    wait_until(lambda: bool(states(run_dir)), job, log)
    for pid in worker_pids(job.pid):
        os.kill(pid, signal.SIGKILL)
    assert job.wait(timeout=120) == 1, log.read_text()[-3000:]
    output = log.read_text()
    line = next(line for line in output.splitlines() if line.startswith("crosscoder: activation worker 0"))
    assert "killed by SIGKILL" in line and "Traceback" not in output
    saved = int(re.search(r"training state of step (\d+) is saved", line).group(1))
    assert saved in states(run_dir) and saved < 50 and not (run_dir / DICTIONARY_DIR).exists()

    resumed = resume_from_message(line, tmp_path)
    assert f"resumed from {run_dir / TRAINING_STATES_DIR}" in resumed.stdout
    reference = tmp_path / "reference"
    run(train_command(*overrides, f"hydra.run.dir={reference}"), tmp_path)
    got, want = weights(run_dir), weights(reference)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_ctrl_c_saves_a_state_exits_130_and_resume_by_run_dir_finishes_in_place(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path) -> None:
    """SIGINT to the whole foreground job (Ctrl-C in a terminal, workers included): a state is saved, exit 130
    with the resume command. `trainer.resume=<run dir>` from another Hydra dir continues in the run's own
    directory, and the finished run keeps no more than trainer.keep_states states."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    job = start(train_command(*tiny_overrides(toy_cache), *LONG_RUN, "trainer.keep_states=1",
                              f"hydra.run.dir={run_dir}"), tmp_path, log)
    wait_until(lambda: bool(states(run_dir)), job, log)
    os.killpg(job.pid, signal.SIGINT)
    assert job.wait(timeout=120) == 130, log.read_text()[-3000:]
    output = log.read_text()
    line = next(line for line in output.splitlines() if line.startswith("crosscoder: stopped by SIGINT"))
    assert f"hydra.run.dir={run_dir} trainer.resume=auto" in line and "Traceback" not in output
    assert not (run_dir / DICTIONARY_DIR).exists()

    other = tmp_path / "elsewhere"
    result = run(train_command(*tiny_overrides(toy_cache), *LONG_RUN, "trainer.keep_states=1",
                               f"trainer.resume={run_dir}", f"hydra.run.dir={other}"), tmp_path)
    assert f"continuing the run in {run_dir}" in result.stdout
    assert (run_dir / DICTIONARY_DIR / WEIGHTS_FILE).is_file() and not (other / DICTIONARY_DIR).exists()
    assert json.loads((run_dir / RUN_SUMMARY_FILE).read_text())["resumed_from_step"] > 0
    assert states(run_dir) == [50]  # the state saved before the export; older ones pruned to keep_states=1


def test_a_full_disk_stops_at_the_save_naming_it_and_keeps_the_last_state(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path, tmpfs: callable) -> None:
    """The run directory's disk fills up mid-run: the next training-state save fails with one line saying the
    disk is full and which state is the last complete one (exit 2); after freeing space, resuming finishes."""
    run_dir, log = tmpfs("16m") / "run", tmp_path / "run.log"
    overrides = [*tiny_overrides(toy_cache), *LONG_RUN, INLINE]
    job = start(train_command(*overrides, f"hydra.run.dir={run_dir}"), tmp_path, log)
    wait_until(lambda: bool(states(run_dir)), job, log)
    filler = run_dir.parent / "filler"
    with filler.open("wb") as out:  # take every byte left
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    assert job.wait(timeout=120) == 2, log.read_text()[-3000:]
    output = log.read_text()
    line = next(line for line in output.splitlines() if line.startswith("crosscoder: cannot write the training state"))
    assert "no space left on the device" in line and "the last complete training state is" in line
    assert "Traceback" not in output
    kept = states(run_dir)
    assert kept and not list((run_dir / TRAINING_STATES_DIR).glob(".step_*"))  # the failed save left nothing
    filler.unlink()
    run(train_command(*overrides, f"hydra.run.dir={run_dir}", "trainer.resume=auto"), tmp_path)
    assert (run_dir / DICTIONARY_DIR / WEIGHTS_FILE).is_file()


def test_a_read_only_run_dir_is_one_line_before_any_work(tmp_path: Path, tmpfs: callable) -> None:
    read_only = tmpfs(read_only=True)
    result = run(train_command(f"hydra.run.dir={read_only / 'run'}"), tmp_path, returncode=2)
    assert f"hydra.run.dir={read_only / 'run'}: {read_only} is not writable" in last_line(result)
    assert "Traceback" not in result.stderr


def test_a_config_error_leaves_no_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run(train_command("trainer.batch_size=0", f"hydra.run.dir={run_dir}"), tmp_path, returncode=2)
    assert "trainer.batch_size" in last_line(result)
    assert not run_dir.exists()


def local_sources(paths: list[Path]) -> list[str]:
    return ["sources.kind=hf", f"sources.paths=[{','.join(str(path) for path in paths)}]",
            "sources.hook=blocks.1.hook_resid_pre"]


def test_a_snapshot_with_nan_weights_is_one_line_naming_it(tiny_snapshots: list, toy_cache: Path,
                                                            tmp_path: Path) -> None:
    """NaN weights in one snapshot, found by the activation worker that loads it: exit 2, one line naming the
    snapshot and the parameter, nothing left but the refusal."""
    paths = copy_snapshots(tiny_snapshots, tmp_path / "snapshots")
    weights_file = paths[1] / "model.safetensors"
    tensors = load_file(str(weights_file))
    name = next(key for key in tensors if key.endswith("mlp.dense_h_to_4h.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    result = run(train_command(*tiny_overrides(toy_cache), *local_sources(paths), f"hydra.run.dir={run_dir}"),
                 tmp_path, returncode=2)
    line = last_line(result)
    assert line.startswith("crosscoder: configuration error: activation worker 0:")
    assert str(paths[1]) in line and "NaN/inf" in line and "Traceback" not in result.stderr
    assert not (run_dir / DICTIONARY_DIR).exists()


def test_a_cache_build_on_a_full_disk_names_it_and_keeps_its_complete_shards(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path, tmpfs: callable) -> None:
    """`crosscoder-cache` into a folder that fills up while it builds (the start-up check found room: another
    writer takes it): one line naming the shard and the full disk (exit 2); the shards already complete stay,
    under their final names only. (Too small from the start: refused before any snapshot loads, a unit test.)"""
    cache_dir = tmpfs("16m") / "acts"
    log = tmp_path / "cache.log"
    env = {**{k: v for k, v in os.environ.items() if k not in PROCESS_ENV}, "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        command = [sys.executable, "-m", "crosscoder.cli.cache", *tiny_overrides(toy_cache),
                   f"data.cache.dir={cache_dir}", "data.cache.tokens=20000", "data.cache.shard_batches=1",
                   f"hydra.run.dir={tmp_path / 'log'}"]
        build = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: any(cache_dir.glob("shard_*.safetensors")), build, log)
    with pytest.raises(OSError) as full, (cache_dir.parent / "other-writer").open("wb", buffering=0) as filler:
        while True:  # another writer takes every free byte (unbuffered: closing has nothing left to write)
            filler.write(b"\0" * 2**16)
    assert full.value.errno == errno.ENOSPC
    assert build.wait(timeout=300) == 2, log.read_text()[-4000:]
    output = log.read_text()
    line = next(line for line in output.splitlines() if line.startswith("crosscoder-cache:"))
    assert "cannot write the activation cache shard" in line and "no space left on the device" in line
    assert "Traceback" not in output
    assert list(cache_dir.glob("shard_*.safetensors")) and not list(cache_dir.glob(".shard_*"))


def test_crosscoder_analyze_into_a_read_only_folder_is_one_line(activation_cache: Path, toy_cache: Path,
                                                                 tmp_path: Path, tmpfs: callable) -> None:
    run_dir = tmp_path / "run"
    run(train_command(*tiny_overrides(toy_cache), f"data.cache.dir={activation_cache}", "tracking=disabled",
                      f"hydra.run.dir={run_dir}"), tmp_path)
    read_only = tmpfs(read_only=True)
    result = run([sys.executable, "-m", "crosscoder.cli.analyze", str(run_dir / DICTIONARY_DIR),
                  "--out", str(read_only / "report"), "--contexts", "0", "--scaling-tokens", "0"],
                 tmp_path, returncode=2)  # the replays only delay the write that fails
    assert last_line_of(result, "crosscoder-analyze:").endswith("the file system is read-only ([Errno 30] "
                                                                "Read-only file system)")
