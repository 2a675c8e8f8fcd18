"""The README's first command (`crosscoder-train`, the embedded default) on a fresh machine, split into stages.

Runs `python -m crosscoder.train` twice in one go, each in a subprocess with the same settings: first with empty
caches (no toy LM snapshots, no compiled DeepSpeed op: what a new user waits for), then again with the caches the
first run filled. Every output line is time-stamped as it arrives; a stage runs from its first line to the next
stage's (the time between the line that ends one stage and the next stage's first line counts to the former).
Prints each stage's seconds in both runs, its share of the fresh run, and the fresh / warm ratio.

    python bench/first_command.py [extra overrides...]     # e.g. trainer.total_tokens=200000
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = [  # (stage, the line that starts it, whether its first or its last such line)
    ("start-up: imports, Hydra, config checks", r"^crosscoder: recipe for ", "first"),
    ("DeepSpeed op build (once per machine)", r"compilers\.C\.base|Emitting ninja|Building extension", "first"),
    ("accelerator and DeepSpeed set-up", r"deepspeed_shm_comm_op built|Loading extension module", "first"),
    ("toy LM: train it, save its snapshots", r"^toy LM tiny-gptneox-[0-9a-f]+: ", "first"),
    ("describe and fingerprint the snapshots", r"^toy LM built in|another process finished first", "first"),
    ("load snapshots in activation workers", r"^started \d+ activation worker|^loaded \d+ snapshots", "first"),
    ("input scales, engine, tracking", r"^input scales: ", "first"),
    ("training loop", r"^training \d+ steps of ", "first"),
    ("final state, spliced-in LM loss, analysis", r"^saved training state at step ", "last"),
    ("finish: summary, W&B close", r"^exported dictionary at step ", "last"),
]


def timed_run(workdir: Path, caches: Path, overrides: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """(wall seconds, [(seconds since start, line)]) of one `python -m crosscoder.train` run."""
    env = {**os.environ, "CROSSCODER_CACHE": str(caches / "crosscoder"),
           "TORCH_EXTENSIONS_DIR": str(caches / "torch_extensions"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-u", "-m", "crosscoder.train", f"hydra.run.dir={workdir}", *overrides]
    started = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip()))
        status = process.wait()
    wall = time.perf_counter() - started
    if status != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise SystemExit(f"crosscoder-train exited {status}:\n{tail}")
    return wall, lines


def stage_seconds(wall: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds per stage: from the stage's first matching line to the next stage that appears (the process start
    and exit bound the first and last); stages that print nothing get 0."""
    starts = {STAGES[0][0]: 0.0}
    for name, pattern, which in STAGES[1:]:
        found = [at for at, text in lines if re.search(pattern, text)]
        if found:
            starts[name] = found[0] if which == "first" else found[-1]
    ordered = sorted(starts.items(), key=lambda item: item[1])
    seconds = {name: 0.0 for name, _, _ in STAGES}
    for (name, at), (_, following) in zip(ordered, [*ordered[1:], ("end", wall)], strict=True):
        seconds[name] = following - at
    return seconds


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="first_command_") as scratch:
        caches = Path(scratch) / "caches"
        fresh_wall, fresh_lines = timed_run(Path(scratch) / "fresh", caches, overrides)
        warm_wall, warm_lines = timed_run(Path(scratch) / "warm", caches, overrides)
    fresh, warm = stage_seconds(fresh_wall, fresh_lines), stage_seconds(warm_wall, warm_lines)
    print(f"crosscoder-train {' '.join(overrides)} (python -m crosscoder.train), {os.cpu_count()} cores")
    print(f"{'stage':48} {'fresh s':>8} {'share':>6} {'warm s':>8} {'fresh/warm':>10}")
    for name, _, _ in STAGES:
        ratio = f"{fresh[name] / warm[name]:.1f}x" if warm[name] > 0.05 else "-"
        print(f"{name:48} {fresh[name]:8.1f} {fresh[name] / fresh_wall:6.0%} {warm[name]:8.1f} {ratio:>10}")
    print(f"{'total':48} {fresh_wall:8.1f} {1:6.0%} {warm_wall:8.1f} {fresh_wall / warm_wall:9.1f}x")


if __name__ == "__main__":
    main()
