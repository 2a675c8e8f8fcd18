"""Launching the real entry points in subprocesses for the end-to-end tests: `accelerate launch` of 1-4 CPU ranks
(gloo), the tiny toy run's overrides, signals to a whole job, and the shared activation cache."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from crosscoder.checkpoint import load_dictionary
from crosscoder.training_state import list_training_states

from crosscoder.constants import DICTIONARY_DIR, RUN_SUMMARY_FILE, TRAINING_STATES_DIR
from crosscoder.parallel import free_port
from crosscoder.train import sweep_group
from tests.conftest import PROCESS_ENV, TINY_TOY
from tests.wandb_records import run_group

REPO = Path(__file__).resolve().parent.parent


def tiny_overrides(toy_cache: Path) -> list[str]:
    steps = ",".join(str(s) for s in TINY_TOY["snapshot_steps"])
    return [
        f"sources.toy.cache_dir={toy_cache}",
        f"sources.toy.hidden_size={TINY_TOY['hidden_size']}",
        f"sources.toy.num_layers={TINY_TOY['num_layers']}",
        f"sources.toy.train_steps={TINY_TOY['train_steps']}",
        f"sources.toy.snapshot_steps=[{steps}]",
        "data.seq_len=16", "data.model_batch_size=8", "data.toy_documents=200",
        "data.shuffle.buffer_tokens=512", "data.workers.num_workers=1",
        "crosscoder.dict_size=64", "crosscoder.norm_estimation_batches=2", "crosscoder.l1_warmup_steps=2",
        "trainer.batch_size=128", "trainer.total_tokens=1024", "trainer.log_every=2",
        "trainer.lr_warmup_steps=2", "trainer.eval_tokens=0", "tracking=offline",
    ]


def run(command: list[str], tmp_path: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    """Run a command in a clean offline environment; it must exit with `returncode`."""
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_ENV}
    env = {**inherited, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == returncode, (f"exit {result.returncode}\n{result.stdout[-4000:]}\n"
                                             f"{result.stderr[-6000:]}")
    return result


def single_wandb_run_file(run_dir: Path) -> Path:
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected exactly one W&B run (rank 0 only), found {runs}"
    return runs[0]


def launch_two_ranks(launch_config: str, toy_cache: Path, workdir: Path) -> tuple[Path, str]:
    """A 2-process `accelerate launch` of the tiny run fed by one worker per rank; (run dir, its log)."""
    run_dir = workdir / "run"
    result = run([
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "launch" / launch_config), "--main_process_port", str(free_port()),
        "-m", "crosscoder.train", *[o for o in tiny_overrides(toy_cache) if not o.startswith("trainer.eval_tokens=")],
        "trainer.checkpoint_every=4", "trainer.eval_tokens=128", f"hydra.run.dir={run_dir}",
    ], workdir)
    return run_dir, result.stdout + result.stderr


def launch(config: str | None, overrides: list[str], workdir: Path, num_processes: int | None = None,
           returncode: int = 0) -> subprocess.CompletedProcess:
    """`accelerate launch` with a launch/ config (its 2 ranks, or `num_processes`), or a plain one-process run
    when config is None."""
    processes = ["--num_processes", str(num_processes)] if num_processes else []
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
                *processes, "--main_process_port", str(free_port())] if config else [sys.executable]
    return run([*launcher, "-m", "crosscoder.train", *overrides], workdir, returncode)


def in_order_overrides(toy_cache: Path, cache: Path, run_dir: Path) -> list[str]:
    """From the cache, unshuffled: rank r of N reads the r-th micro batch of every global batch."""
    return [*tiny_overrides(toy_cache), f"data.cache.dir={cache}", "data.shuffle.buffer_tokens=0",
            "trainer.checkpoint_every=4", f"hydra.run.dir={run_dir}"]


def resume_overrides(toy_cache: Path, cache: Path, run_dir: Path) -> list[str]:
    """64 steps of 32 tokens from the cache, shuffled, a training state every 4 steps."""
    return [*tiny_overrides(toy_cache), f"data.cache.dir={cache}", "trainer.batch_size=32",
            "trainer.total_tokens=2048", "trainer.state_every=4", "trainer.log_every=8", f"hydra.run.dir={run_dir}"]


def start_two_ranks(overrides: list[str], workdir: Path, log: Path, config: str = "cpu_2proc_zero2.yaml",
                    num_processes: int | None = None) -> subprocess.Popen:
    """A 2-rank launch (or `num_processes`) in its own process group (so a signal reaches the launcher and every
    rank)."""
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_ENV}
    env = {**inherited, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    processes = ["--num_processes", str(num_processes)] if num_processes else []
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
               *processes, "--main_process_port", str(free_port()), "-m", "crosscoder.train", *overrides]
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) first:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.02)


def signal_job(process: subprocess.Popen, signum: int) -> None:
    """Signal the launcher and every process under it, as a scheduler does to a job (the ranks run in sessions
    of their own, so a process-group signal would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, parent = stat.read_text().rsplit(")", 1)[1].split()[1:2][0], int(stat.parent.name)
        except (OSError, IndexError):
            continue
        children.setdefault(int(pid), []).append(parent)
    job, frontier = [], [process.pid]
    while frontier:
        pid = frontier.pop()
        job.append(pid)
        frontier.extend(children.get(pid, []))
    for pid in job:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def wait_for_job(process: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    """The launcher and the ranks have exited (the ranks hold their W&B runs open until then)."""
    process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(str(run_dir) in cmdline.read_text(errors="ignore") for cmdline in _cmdlines()):
        assert time.monotonic() < deadline, "ranks of the job are still running"
        time.sleep(0.1)


def _cmdlines() -> list[Path]:
    return [path for path in Path("/proc").glob("[0-9]*/cmdline") if path.parent.name != str(os.getpid())]


def newest_state_step(run_dir: Path) -> int:
    states = list_training_states(run_dir / TRAINING_STATES_DIR)
    return int(states[0].name[5:]) if states else 0




def build_activation_cache(toy_cache: Path, workdir: Path) -> Path:
    """A cache of the tiny toy run (3072 tokens), written by the `crosscoder-cache` entry point."""
    cache_dir = workdir / "acts"
    result = run([sys.executable, "-m", "crosscoder.build_cache", *tiny_overrides(toy_cache),
                  f"data.cache.dir={cache_dir}", "data.cache.tokens=3072", f"hydra.run.dir={workdir / 'log'}"],
                 workdir)
    assert f"activations in {cache_dir}" in result.stdout
    assert (cache_dir / "manifest.json").is_file()
    return cache_dir


def check_sweep(sweep_dir: Path) -> dict[float, float]:
    """Jobs 0 and 1 of a lambda = 0.5, 5 sweep each exported their dictionary and ran one W&B run, both in
    the sweep's W&B group; returns L0 per lambda."""
    sparsity, groups = {}, set()
    for job, coeff in (("0", 0.5), ("1", 5.0)):
        _, meta = load_dictionary(sweep_dir / job / DICTIONARY_DIR)
        assert meta.training["crosscoder"]["l1_coeff"] == coeff
        summary = json.loads((sweep_dir / job / RUN_SUMMARY_FILE).read_text())
        sparsity[coeff] = summary["l0"]
        groups.add(run_group(single_wandb_run_file(sweep_dir / job)))
    assert groups == {sweep_group(sweep_dir)}, groups
    return sparsity
