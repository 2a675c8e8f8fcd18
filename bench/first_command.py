"""The README's first command (`crosscoder-train`, the embedded default) on a fresh machine, split into stages.

Runs `python -m crosscoder.train` twice in one go, each in a subprocess with the same settings: first with empty
caches (no toy LM snapshots, no compiled DeepSpeed op: what a new user waits for), then again with the caches the
first run filled. Every output line is time-stamped as it arrives; a stage runs from its first line to the next
stage's. Prints each stage's seconds in both runs, its share of the fresh run, and the fresh / warm ratio.

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

STAGES = [
    ("start-up: imports, Hydra, config checks", r"^crosscoder: recipe for "),
    ("toy LM: train it and save its snapshots", r"^toy LM [0-9a-f]+: "),
    ("describe and fingerprint the snapshots", r"^toy LM built in|another process finished first"),
    ("DeepSpeed op build (first time on a machine)", r"Building extension module|Emitting ninja|ninja"),
    ("load snapshots, start activation workers", r"^started \d+ activation worker|^loaded \d+ snapshots"),
    ("input scales, engine, tracking", r"^input scales: "),
    ("training loop", r"^training \d+ steps of "),
    ("export, spliced-in LM loss, analysis", r"^exported dictionary at step "),
    ("finish: summary, W&B close", r"^done in "),
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
    starts = {"start-up: imports, Hydra, config checks": 0.0}
    for name, pattern in STAGES[1:]:
        found = next((at for at, text in lines if re.search(pattern, text)), None)
        if found is not None:
            starts[name] = found
    ordered = sorted(starts.items(), key=lambda item: item[1])
    seconds = {name: 0.0 for name, _ in STAGES}
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
    for name, _ in STAGES:
        ratio = f"{fresh[name] / warm[name]:.1f}x" if warm[name] > 0.05 else "-"
        print(f"{name:48} {fresh[name]:8.1f} {fresh[name] / fresh_wall:6.0%} {warm[name]:8.1f} {ratio:>10}")
    print(f"{'total':48} {fresh_wall:8.1f} {1:6.0%} {warm_wall:8.1f} {fresh_wall / warm_wall:9.1f}x")


if __name__ == "__main__":
    main()
