"""SAE-Track's chain (crosscoder.training.sae_track): the plan's budgets and rates, and a chain on a 3-snapshot planted
source that continues where it stopped, logs into one W&B run and ends as a warm_start stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crosscoder.config import RunConfig
from crosscoder.constants import RUN_SUMMARY_FILE, WEIGHTS_FILE
from crosscoder.dictionary.io import read_tensors
from crosscoder.dictionary.stack import read_stack
from crosscoder.errors import ConfigError
from crosscoder.training.sae_track import CHAIN_FILE, chain_plan, train_sae_track
from tests.helpers import artifacts, history_keys, read_records


def _chain_config(output_dir: Path) -> RunConfig:
    cfg = RunConfig(output_dir=str(output_dir))
    cfg.sources.kind = "planted"
    cfg.sources.planted.n_snapshots, cfg.sources.planted.n_features = 3, 32
    cfg.data.shuffle.buffer_tokens = 0
    cfg.method.name, cfg.method.link_tokens = "sae_track", 768
    cfg.crosscoder.activation, cfg.crosscoder.dict_size, cfg.crosscoder.k = "topk", 64, 4
    cfg.trainer.batch_size, cfg.trainer.total_tokens, cfg.trainer.lr = 256, 256 * 12, 4e-3
    cfg.trainer.state_every, cfg.trainer.log_every, cfg.trainer.lr_warmup_steps = 0, 4, 2
    cfg.tracking.mode, cfg.tracking.log_analysis = "offline", False
    return cfg


def test_the_plan_keeps_the_papers_ratios_unless_told_otherwise(tmp_path: Path) -> None:
    cfg = _chain_config(tmp_path)
    cfg.trainer.total_tokens, cfg.method.link_tokens = 256 * 100, 0
    links = chain_plan(cfg)
    assert [link.name for link in links] == ["snapshot0", "snapshot1", "snapshot2"]
    assert [link.tokens for link in links] == [25600, 1280, 1280]  # a twentieth, in whole batches
    assert [link.lr for link in links] == pytest.approx([4e-3, 4e-4, 4e-4])
    assert [link.step_offset for link in links] == [0, 100, 105]
    cfg.method.link_tokens, cfg.method.link_lr = 2560, 1e-3
    assert [(link.tokens, link.lr) for link in chain_plan(cfg)[1:]] == [(2560, 1e-3)] * 2
    cfg.method.link_tokens = 100
    with pytest.raises(ConfigError, match=r"link 1 \(snapshot1\) would train 0 tokens"):
        chain_plan(cfg)


@pytest.mark.usefixtures("clean_process_env")
def test_a_chain_continues_where_it_stopped_in_one_wandb_run(tmp_path: Path) -> None:
    """Three links (12 steps from scratch, then 3 steps each warm-started at a tenth of the rate). A rerun of the
    same chain after its last link and stack are lost trains only that link, ends with the same stack bit for
    bit, and logs into the same W&B run after the earlier links' steps; each dictionary continues the one before
    (its latents moved little), and the stack is aligned by warm start."""
    run_dir = tmp_path / "run"
    first = train_sae_track(_chain_config(run_dir), log=lambda _: None)
    manifest, metas = read_stack(first.dictionary_dir)
    assert manifest.method == "sae_track" and manifest.aligned == "warm_start"
    assert [entry.train_steps for entry in manifest.entries] == [12, 3, 3] and first.steps == 18
    weights = [read_tensors(first.dictionary_dir / entry.dictionary / WEIGHTS_FILE, ["W_dec"])["W_dec"][:, 0]
               for entry in manifest.entries]
    continued = torch.nn.functional.cosine_similarity(weights[0], weights[1], dim=-1)
    assert continued.median() > 0.9  # latent i is still latent i
    saved = {entry.name: (first.dictionary_dir / entry.dictionary / WEIGHTS_FILE).read_bytes()
             for entry in manifest.entries}

    import shutil

    shutil.rmtree(run_dir / manifest.details["links"][2]["folder"])
    shutil.rmtree(first.dictionary_dir)
    said: list[str] = []
    second = train_sae_track(_chain_config(run_dir), log=said.append)
    assert sum("is done" in line for line in said) == 2 and sum("from scratch" in line for line in said) == 0
    manifest_again, _ = read_stack(second.dictionary_dir)
    for entry in manifest_again.entries:
        assert (second.dictionary_dir / entry.dictionary / WEIGHTS_FILE).read_bytes() == saved[entry.name]

    run_files = sorted(run_dir.rglob("run-*.wandb"))
    ids = {next(r.run.run_id for r in read_records(path) if r.WhichOneof("record_type") == "run") for path in run_files}
    assert len(run_files) >= 4 and len(ids) == 1  # 3 links + the rerun link + the stack: one run
    keys = set().union(*(history_keys(path) for path in run_files))
    assert {"explained_variance/snapshot0", "explained_variance/snapshot2", "l0"} <= keys
    assert any(a.type == "stack" for path in run_files for a in artifacts(path))
    assert (run_dir / CHAIN_FILE).is_file()
    summary = json.loads((run_dir / RUN_SUMMARY_FILE).read_text())
    assert summary["tokens_seen"] == 256 * 18 and [link["steps"] for link in summary["links"]] == [12, 3, 3]

    changed = _chain_config(run_dir)
    changed.method.link_lr = 1e-3
    with pytest.raises(ConfigError, match=r"trainer\.lr="):
        train_sae_track(changed, log=lambda _: None)
