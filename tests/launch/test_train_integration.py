"""End to end on the real stack: `accelerate launch` with 2 processes and DeepSpeed ZeRO-2 on CPU (gloo),
offline W&B, and a Hydra multirun. These launch subprocesses, so they are few and small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosscoder.constants import (
    CHECKPOINTS_DIR,
    DICTIONARY_DIR,
    EVAL_FILE,
    RUN_SUMMARY_FILE,
    STREAM_POSITION_FILE,
)
from crosscoder.dictionary.io import load_decoder_norms, load_dictionary, load_firing_frequency
from tests.helpers import (
    REPO,
    TINY_TOY,
    artifacts,
    check_sweep,
    history_keys,
    launch_two_ranks,
    run,
    single_wandb_run_file,
    tiny_overrides,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero2_run(tiny_snapshots: list, toy_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return launch_two_ranks("cpu_2proc_zero2.yaml", toy_cache, tmp_path_factory.mktemp("zero2"))


def test_accelerate_launch_two_processes_deepspeed_zero2(zero2_run: tuple[Path, str]) -> None:
    run_dir, log = zero2_run
    assert "2 rank(s), ZeRO-2" in log

    model, meta = load_dictionary(run_dir / DICTIONARY_DIR)
    assert [s["step"] for s in meta.sources] == list(TINY_TOY["snapshot_steps"])
    assert meta.train_step == 8 and meta.tokens_seen == 1024
    assert model.is_folded and model.W_dec.shape == (64, 3, 32)
    norms = load_decoder_norms(run_dir / DICTIONARY_DIR)
    assert norms.shape == (64, 3) and torch.isfinite(norms).all()
    assert (run_dir / CHECKPOINTS_DIR / "step_0000004" / "weights.safetensors").is_file()
    assert not list(run_dir.rglob(".*tmp-*")), "a temporary export was left behind"
    summary = json.loads((run_dir / RUN_SUMMARY_FILE).read_text())
    assert summary["steps"] == 8 and -1 < summary["explained_variance/mean"] <= 1

    wandb_file = single_wandb_run_file(run_dir)
    keys = history_keys(wandb_file)
    for name in ("step0", "step4", "step12"):
        assert f"decoder_norm/mean/{name}" in keys
        assert f"decoder_norm/hist/{name}/values" in keys
        assert f"explained_variance/{name}" in keys
    for key in ("loss/mse", "loss/sparsity", "l0", "dead_fraction", "lr", "tokens_per_second",
                "density/dense_latents", "density/never_fired_fraction", "density/log10_frequency_hist/values"):
        assert key in keys, key
    frequency = load_firing_frequency(run_dir / DICTIONARY_DIR)
    assert frequency is not None and frequency.shape == (64,) and ((frequency >= 0) & (frequency <= 1)).all()
    assert frequency.max() > 0
    logged = [a for a in artifacts(wandb_file) if a.type == "crosscoder"]  # (W&B stores tables as artifacts too)
    assert len(logged) == 2
    contents = {c.path for c in logged[-1].manifest.contents}
    assert {"config.json", "weights.safetensors", "decoder_norms.safetensors", STREAM_POSITION_FILE,
            "analysis/report.html", "analysis/trajectories.png"} <= contents, contents
    # The evolution analysis of every export reaches the dashboard: a feature table, the plots, class counts.
    for key in ("analysis/features", "analysis/trajectories", "analysis/emergence", "analysis/class/emerging",
                "analysis/emerging_at/step4"):
        assert any(k == key or k.startswith(key + "/") for k in keys), (key, sorted(keys))
    positions = json.loads((run_dir / DICTIONARY_DIR / STREAM_POSITION_FILE).read_text())
    assert [(p["kind"], p["rank"], p["world_size"]) for p in positions] == [("online", 0, 2), ("online", 1, 2)]
    # The spliced-in LM loss of every export (rank 0 alone, the other rank waiting at the export's barrier).
    for name in ("step0", "step4", "step12"):
        for key in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl"):
            assert f"eval/{key}/{name}" in keys, (key, name)
    assert "eval/ce_recovered/step12" in keys and "eval/ce_recovered/step12" in summary
    assert (run_dir / CHECKPOINTS_DIR / "step_0000004" / EVAL_FILE).is_file()
    assert {EVAL_FILE, "analysis/ce_recovered.png"} <= contents, contents


def test_hydra_multirun_over_l1_coeff_reuses_one_cache(activation_cache: Path, toy_cache: Path,
                                                        tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    shards_before = {p: p.stat().st_mtime_ns for p in activation_cache.iterdir()}
    run([
        sys.executable, "-m", "crosscoder.train", "--multirun", *tiny_overrides(toy_cache),
        f"data.cache.dir={activation_cache}", "crosscoder.l1_coeff=0.5,5", "deepspeed=zero1",
        f"hydra.sweep.dir={sweep_dir}",
    ], tmp_path)
    assert {p: p.stat().st_mtime_ns for p in activation_cache.iterdir()} == shards_before
    sparsity = check_sweep(sweep_dir)
    assert sparsity[5.0] < sparsity[0.5], f"a 10x larger lambda should give a sparser code: {sparsity}"


def test_a_bad_value_exits_2_naming_it(tmp_path: Path) -> None:
    """Both entry points turn a ConfigError into one line on stderr and exit status 2, before any work."""
    for module, override, message in (
        ("crosscoder.cli.cache", "data.cache.dtype=float32", "crosscoder-cache: configuration error: data.cache.dir"),
        ("crosscoder.train", "data.workers.num_workers=-1", "data.workers.num_workers=-1"),
        ("crosscoder.train", "+crosscoder.dict_sise=256", "crosscoder.dict_sise (did you mean crosscoder.dict_size?)"),
    ):
        result = subprocess.run([sys.executable, "-m", module, override, f"hydra.run.dir={tmp_path / module}"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr
