"""SAE-Track (Xu et al. 2024; `method=sae_track`): one dictionary per snapshot, snapshot 0's from scratch and each
next one warm-started from the previous one's weights (a fresh optimizer), so latent i stays the same feature
along the chain. The paper trains 300 M tokens at lr 4e-4 from scratch, then 15 M at 4e-5 per checkpoint; the
defaults keep those ratios (a twentieth of the tokens, a tenth of the rate) from the run's own budget.

Each link is an ordinary single-snapshot run (`method.snapshot`, `crosscoder.init_from`) in its own folder under
<run>/links/, so it has the trainer's whole machinery: the engine, workers or cache, W&B, export, and resume.
The chain is resumable mid-way: a link whose dictionary is exported is done and skipped, and the first that is
not resumes from its newest training state (trainer.resume=auto), so rerun the same command in the same run
folder (hydra.run.dir). Every link logs into one W&B run, each after the steps of those before it, its metrics
under its snapshot's name; when the last link is done, rank 0 assembles the stack at <run>/dictionary (hard links
to the links' dictionaries, stack.json last, aligned: warm_start) and logs it as one artifact.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from crosscoder.config import RunConfig
from crosscoder.constants import DICTIONARY_DIR, RUN_SUMMARY_FILE
from crosscoder.data.checks import check_inputs
from crosscoder.data.kinds import configured_snapshot_names
from crosscoder.dictionary.io import read_meta
from crosscoder.dictionary.stack import StackEntry, StackManifest, entry_folder, write_stack_manifest
from crosscoder.errors import ConfigError, same_on_every_rank
from crosscoder.storage import building_dir, write_text_atomic
from crosscoder.training.build import AfterExport
from crosscoder.training.tracking import RunContinuation, Tracker, check_credentials
from crosscoder.training.trainer import TrainResult, train

LINKS_DIR = "links"
CHAIN_FILE = "sae_track.json"
"""The chain's plan and W&B run id, written before the first link: a rerun continues the same run."""
LINK_TOKENS_RATIO, LINK_LR_RATIO = 20, 10
"""The paper's 300 M / 15 M tokens and 4e-4 / 4e-5 learning rates."""
LINK_DEAD_FRACTION = 8
"""A warm-started link counts a latent dead after at most an eighth of its tokens without firing."""


@dataclass
class Link:
    index: int
    name: str
    """The snapshot this link trains."""
    tokens: int
    lr: float
    folder: str
    """Its run folder, relative to the chain's run folder."""
    step_offset: int
    """Optimiser steps of the links before it (where its W&B history starts)."""


def chain_plan(cfg: RunConfig) -> list[Link]:
    """The links in snapshot order: budgets, learning rates and folders."""
    method, trainer = cfg.method, cfg.trainer
    first = method.first_tokens or trainer.total_tokens
    per_link = method.link_tokens or max(trainer.batch_size, first // LINK_TOKENS_RATIO)
    per_link -= per_link % trainer.batch_size  # whole steps
    link_lr = method.link_lr or trainer.lr / LINK_LR_RATIO
    links, offset = [], 0
    for index, name in enumerate(configured_snapshot_names(cfg.sources)):
        tokens = first if index == 0 else per_link
        if tokens < trainer.batch_size:
            raise ConfigError(f"SAE-Track link {index} ({name}) would train {tokens} tokens, less than one batch of "
                              f"trainer.batch_size={trainer.batch_size}: raise method.link_tokens")
        links.append(Link(index, name, tokens, trainer.lr if index == 0 else link_lr,
                          f"{LINKS_DIR}/{entry_folder(index, name)}", offset))
        offset += tokens // trainer.batch_size
    return links


def link_config(cfg: RunConfig, link: Link, root: Path, previous: Path | None) -> RunConfig:
    """The single-snapshot run of one link: its snapshot, budget and rate, warm-started from `previous`."""
    link_cfg = copy.deepcopy(cfg)
    link_cfg.method.name, link_cfg.method.snapshot = "crosscoder", link.name
    link_cfg.method.first_tokens = link_cfg.method.link_tokens = 0
    link_cfg.method.link_lr = 0.0
    link_cfg.trainer.total_tokens, link_cfg.trainer.lr = link.tokens, link.lr
    link_cfg.trainer.resume = "auto"
    link_cfg.output_dir = str(root / link.folder)
    link_cfg.tracking.log_artifacts = False  # the stack is the artifact
    link_cfg.tracking.log_analysis = False  # one snapshot has no evolution; the stack is analysed whole
    if previous is not None:
        link_cfg.crosscoder.init_from = str(previous)
        link_cfg.crosscoder.l1_warmup_steps = 0  # the dictionary is sparse already
        steps = link.tokens // cfg.trainer.batch_size
        link_cfg.trainer.lr_warmup_steps = min(cfg.trainer.lr_warmup_steps, steps // 10)
        # The dead-latent count starts afresh in every link: a window longer than the link would never call a
        # latent dead, so the latents of features that vanished could never be revived (AuxK) for new ones.
        link_cfg.crosscoder.dead_after_tokens = min(cfg.crosscoder.dead_after_tokens,
                                                    max(cfg.trainer.batch_size, link.tokens // LINK_DEAD_FRACTION))
    return link_cfg.validate()


def train_sae_track(cfg: RunConfig, log: Callable[[str], None] = print,
                    after_export: AfterExport | None = None) -> TrainResult:
    """Run (or continue) the chain; every rank of a launch calls this (each link is a collective run).
    `after_export`: what each link's trainer calls on its exported dictionary (crosscoder.training.build; the
    entry point passes the spliced-in evaluation; the links never analyse, tracking.log_analysis is off)."""
    with same_on_every_rank():
        check_inputs(cfg)
        check_credentials(cfg.tracking)
    started = time.perf_counter()
    root = Path(cfg.output_dir).resolve()
    links = chain_plan(cfg)
    run_id = _chain_run_id(cfg, root, links)
    results: list[TrainResult] = []
    previous: Path | None = None
    for link in links:
        done = root / link.folder / DICTIONARY_DIR
        link_cfg = link_config(cfg, link, root, previous)
        if (done / "config.json").is_file():
            _check_done_link(done, link_cfg)
            log(f"SAE-Track link {link.index + 1}/{len(links)} ({link.name}) is done: {done}")
        else:
            log(f"SAE-Track link {link.index + 1}/{len(links)}: {link.name}, {link.tokens} tokens at lr {link.lr:g}"
                + (f", from {previous}" if previous else ", from scratch"))
            continuation = RunContinuation(run_id, link.step_offset) if run_id else None
            results.append(train(link_cfg, continuation, after_export))
        previous = done
    stack_dir = root / DICTIONARY_DIR
    total_steps = sum(link.tokens for link in links) // cfg.trainer.batch_size
    if int(os.environ.get("RANK", "0")) == 0:
        write_chain_stack(root, links, stack_dir)
        write_chain_summary(root, links, stack_dir)
        tracker = Tracker(cfg.tracking, _plain_config(cfg), root, True,
                          resume_id=run_id, step_offset=0) if run_id else None
        if tracker is not None:
            tracker.log_dictionary(stack_dir, total_steps, {"method": "sae_track", "links": len(links)},
                                   ["latest"], kind="stack")
            tracker.finish()
        log(f"SAE-Track: a stack of {len(links)} dictionaries in {stack_dir}")
    metrics = results[-1].final_metrics if results else {}
    tokens = sum(link.tokens for link in links)
    return TrainResult(root, stack_dir, total_steps, tokens, time.perf_counter() - started, metrics)


def write_chain_stack(root: Path, links: list[Link], stack_dir: Path) -> Path:
    """The chain's stack: each link's dictionary hard-linked (copied across file systems) under its entry folder,
    then stack.json; built under a hidden name and renamed into place."""
    with building_dir(stack_dir) as tmp:
        entries = []
        for link in links:
            source = root / link.folder / DICTIONARY_DIR
            folder = entry_folder(link.index, link.name)
            shutil.copytree(source, tmp / folder, copy_function=_link_or_copy)
            meta = read_meta(source)
            entries.append(StackEntry(name=link.name, dictionary=folder, step=meta.sources[0].get("step"),
                                      train_steps=meta.train_step))
        details = {"links": [{"name": link.name, "tokens": link.tokens, "lr": link.lr, "folder": link.folder}
                             for link in links]}
        write_stack_manifest(tmp, StackManifest(method="sae_track", aligned="warm_start", entries=entries,
                                                hook=read_meta(root / links[0].folder / DICTIONARY_DIR).hook,
                                                details=details))
    return stack_dir


def write_chain_summary(root: Path, links: list[Link], stack_dir: Path) -> Path:
    """<run>/summary.json: the chain's training time and tokens, summed over its links' own summaries (so a chain
    finished over several attempts counts each link once), and each link's figures."""
    summaries = [json.loads((root / link.folder / RUN_SUMMARY_FILE).read_text()) for link in links]
    keep = ("wall_seconds", "tokens_seen", "steps", "explained_variance/mean", "l0")
    summary = {"method": "sae_track", "dictionary_dir": str(stack_dir),
               "wall_seconds": sum(item["wall_seconds"] for item in summaries),
               "tokens_seen": sum(item["tokens_seen"] for item in summaries),
               "steps": sum(item["steps"] for item in summaries),
               "links": [{"name": link.name, **{key: item.get(key) for key in keep}}
                         for link, item in zip(links, summaries, strict=True)]}
    path = root / RUN_SUMMARY_FILE
    write_text_atomic(path, json.dumps(summary, indent=2))
    return path


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _check_done_link(done: Path, link_cfg: RunConfig) -> None:
    """A finished link must be the one this chain would train (a changed budget, rate or setting is refused)."""
    from crosscoder.training.state import check_same_run

    check_same_run(read_meta(done).training, _plain_config(link_cfg), done)


def _plain_config(cfg: RunConfig) -> dict:
    """The resolved config as the trainer records it (a dictionary's meta.training, W&B's config)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _chain_run_id(cfg: RunConfig, root: Path, links: list[Link]) -> str | None:
    """The W&B run every link logs into: read from the chain file of an earlier attempt, else a new id (rank 0
    writes the file; only rank 0 talks to W&B)."""
    if cfg.tracking.mode == "disabled":
        return None
    chain_file = root / CHAIN_FILE
    if chain_file.is_file():
        return json.loads(chain_file.read_text())["wandb_run_id"]
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids are 8 characters of [a-z0-9] too
    if int(os.environ.get("RANK", "0")) == 0:
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(chain_file, json.dumps({"wandb_run_id": run_id, "links": [asdict(link) for link in links]},
                                                 indent=2))
    return run_id
