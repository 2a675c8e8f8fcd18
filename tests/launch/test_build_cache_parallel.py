"""`crosscoder-cache` snapshot-parallel: 2 ranks (gloo, CPU) each run only their share of the 3 tiny snapshots
(2 and 1) and rank 0 writes a cache identical to the one a single process writes, resumed builds included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from crosscoder.constants import CACHE_MANIFEST_FILE
from crosscoder.parallel.engine import free_port
from tests.helpers import PROCESS_ENV, TINY_TOY

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def cache_overrides(toy_cache: Path, cache_dir: Path, log_dir: Path, workers: int = 1) -> list[str]:
    """The tiny toy sources; 1 activation worker per rank, or the snapshots run inline (0: the same tokens)."""
    steps = ",".join(str(s) for s in TINY_TOY["snapshot_steps"])
    return [
        f"sources.toy.cache_dir={toy_cache}", f"sources.toy.hidden_size={TINY_TOY['hidden_size']}",
        f"sources.toy.num_layers={TINY_TOY['num_layers']}", f"sources.toy.train_steps={TINY_TOY['train_steps']}",
        f"sources.toy.snapshot_steps=[{steps}]",
        "data.seq_len=16", "data.model_batch_size=8", "data.toy_documents=200", f"data.workers.num_workers={workers}",
        f"data.cache.dir={cache_dir}", "data.cache.tokens=700", "data.cache.shard_batches=2",
        "tracking=offline", f"hydra.run.dir={log_dir}",
    ]


def run(command: list[str], workdir: Path, extra_env: dict[str, str] | None = None,
        expect: int = 0) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_ENV}
    env = {**inherited, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def build(toy_cache: Path, cache_dir: Path, workdir: Path, ranks: int = 1, *extra: str, workers: int = 1) -> str:
    """stdout + stderr of a `crosscoder-cache` run: one plain process, or `accelerate launch` with 2 ranks."""
    launcher = [sys.executable]
    if ranks == 2:
        launcher += ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc_zero2.yaml"),
                     "--main_process_port", str(free_port())]
    result = run([*launcher, "-m", "crosscoder.cli.cache",
                  *cache_overrides(toy_cache, cache_dir, workdir / f"log-{cache_dir.name}", workers), *extra], workdir)
    return result.stdout + result.stderr


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_same_cache(built: Path, reference: Path) -> None:
    shards = sorted(path.name for path in reference.glob("shard_*.safetensors"))
    assert len(shards) >= 3, shards
    assert sorted(path.name for path in built.glob("shard_*.safetensors")) == shards
    for name in shards:
        ours, theirs = load_file(str(built / name)), load_file(str(reference / name))
        assert ours.keys() == theirs.keys() == {"activations", "token_ids", "row_checksums"}
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, (name, key)
            assert ours[key].view(-1).view(torch.uint8).equal(theirs[key].view(-1).view(torch.uint8)), (name, key)
        # (Not the file bytes: safetensors writes its metadata keys in a per-process random order.)
        assert metadata(built / name) == metadata(reference / name), name
    assert json.loads((built / CACHE_MANIFEST_FILE).read_text()) == json.loads(
        (reference / CACHE_MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def builds(tiny_snapshots: list, toy_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    workdir = tmp_path_factory.mktemp("cache-parallel")
    one, two = workdir / "one", workdir / "two"
    build(toy_cache, one, workdir, workers=0)  # one process, the snapshots inline: the reference
    log = build(toy_cache, two, workdir, 2, "parallel.snapshot_parallel=2")
    return {"workdir": workdir, "one": one, "two": two, "log": log}


def test_two_snapshot_ranks_write_the_cache_one_process_writes(builds: dict) -> None:
    log = builds["log"]
    assert_same_cache(builds["two"], builds["one"])
    assert load_file(str(sorted(builds["two"].glob("shard_*.safetensors"))[0]))["activations"].shape[1:] == (3, 32)
    assert "2 snapshot ranks, snapshots 0-1, 2" in log
    assert log.count("activations in") == 1 and log.count("complete, ") == 1  # rank 0 alone logs
    assert "running 2 snapshot(s)" in log and "running 1 snapshot(s)" not in log  # rank 1's worker is quiet
    assert not list(builds["two"].glob(".*tmp-*"))


def test_a_resumed_two_rank_build_restarts_at_the_first_missing_shard(builds: dict, toy_cache: Path) -> None:
    workdir, resumed = builds["workdir"], builds["workdir"] / "resumed"
    shutil.copytree(builds["two"], resumed)
    shards = sorted(resumed.glob("shard_*.safetensors"))
    (resumed / CACHE_MANIFEST_FILE).unlink()  # as a build killed before its last two shards leaves it
    for path in shards[-2:]:
        path.unlink()
    # Inline snapshots this time (data.workers.num_workers=0): the same token stream, so the same cache.
    log = build(toy_cache, resumed, workdir, 2, "parallel.snapshot_parallel=2", workers=0)
    assert f"resuming after {len(shards) - 2} complete shards" in log
    assert_same_cache(resumed, builds["one"])


@pytest.mark.parametrize("snapshot_parallel", [1, 3])
def test_snapshot_parallel_must_be_the_world_size(snapshot_parallel: int, toy_cache: Path, tmp_path: Path) -> None:
    """Each rank refuses on its own, before any collective: one rank of a 2-rank launch is enough to show it."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    result = run([sys.executable, "-m", "crosscoder.cli.cache",
                  *cache_overrides(toy_cache, tmp_path / "acts", tmp_path / "log"),
                  f"parallel.snapshot_parallel={snapshot_parallel}"], tmp_path, env, expect=2)
    assert f"parallel.snapshot_parallel={snapshot_parallel} but this launch has 2 ranks" in result.stderr
    assert not (tmp_path / "acts").exists()
