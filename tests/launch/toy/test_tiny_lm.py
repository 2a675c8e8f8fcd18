"""The embedded toy LM's snapshot cache: a dead build's temporary folder (its pid from a `python -c` that
ended) and an incomplete cache are replaced, a live build's folder is kept. The rest: tests/unit/toy/test_tiny_lm.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from crosscoder.toy import ToySnapshot, ensure_toy_snapshots
from crosscoder.toy.tiny_lm import MANIFEST_NAME
from tests.helpers import SMALL


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_stale_tmp_and_incomplete_cache_replaced(tmp_path: Path,
                                                 built: tuple[Path, list[ToySnapshot]]) -> None:
    name = SMALL.fingerprint()
    stale = tmp_path / f".{name}.tmp-{_dead_pid()}"
    (stale / "step0").mkdir(parents=True)
    live = tmp_path / f".{name}.tmp-{os.getppid()}"  # a concurrent build: keep it
    live.mkdir()
    half = tmp_path / name  # no manifest: must not count as a cache
    (half / "step0").mkdir(parents=True)
    (half / "junk").write_text("x")

    snaps = ensure_toy_snapshots(tmp_path, SMALL, log=lambda _: None)
    assert not stale.exists()
    assert live.exists()
    assert (half / MANIFEST_NAME).exists() and not (half / "junk").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, live.name])
    # Same config, separate build: bit-identical weights (deterministic training).
    a = load_file(snaps[-1].path / "model.safetensors")
    b = load_file(built[1][-1].path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
