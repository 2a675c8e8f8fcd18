"""Where the run is watched: W&B (online / offline / disabled) and a console progress line.

Only the main process talks to W&B; the other ranks get a tracker that does nothing.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from crosscoder.config import TrackingConfig
from crosscoder.constants import WANDB_DATA_DIR
from crosscoder.errors import ConfigError

ANALYSIS_TABLE_ROWS = 2000
"""Latents per logged W&B feature table (evenly spaced beyond it)."""

_DATA_DIR_OWNED = "CROSSCODER_OWNS_WANDB_DATA_DIR"


def check_credentials(tracking: TrackingConfig) -> None:
    """tracking=online needs a W&B login: look for one at start-up, before any model loads, rather than fail in
    `wandb.init` once everything is built. W&B's own lookup (WANDB_API_KEY, ~/.netrc, its settings; at a terminal
    it asks), without contacting the server: a key's presence, not its validity."""
    if tracking.mode != "online":
        return
    import wandb

    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError as error:
        raise ConfigError(f"tracking=online needs W&B credentials and none were found ({error}): run `wandb "
                          "login` or set WANDB_API_KEY, or log with tracking=offline and `wandb sync` the run "
                          "later") from error


class AnalysisSummary(Protocol):
    """What W&B is given of an exported dictionary's analysis (crosscoder.analysis's AnalysisResult has it): the
    feature table, the report's files, the evolution's counts and, for planted sources, the recovery."""

    table: Any
    files: list[Path]
    evolution: Any
    recovery: Any
    by_hook: dict[str, Any]
    """A snapshots x hooks crosscoder's result per hook ({} otherwise), each with files and evolution."""


@dataclass
class RunContinuation:
    """A W&B run a new training run logs into, after the steps already there (SAE-Track: one run, every link)."""

    run_id: str
    step_offset: int = 0


class Tracker:
    def __init__(
        self, cfg: TrackingConfig, run_config: dict[str, Any], output_dir: Path, is_main: bool,
        resume_id: str | None = None, step_offset: int = 0,
    ) -> None:
        """`resume_id`: the W&B run a resumed training run continues (its history goes on at the saved step).
        `step_offset`: added to every step logged (SAE-Track's links continue one run, each from its own step 0)."""
        self.run = None
        self.step_offset = step_offset
        if not is_main or cfg.mode == "disabled":
            return
        # Artifact files are staged here rather than in ~/.local/share, so they stay with the run and a later
        # `wandb sync` of an offline run can upload them.
        # A user's own WANDB_DATA_DIR wins; ours is re-pointed for every run (multirun jobs share the process).
        if "WANDB_DATA_DIR" not in os.environ or os.environ.get(_DATA_DIR_OWNED):
            os.environ.update({"WANDB_DATA_DIR": str(output_dir / WANDB_DATA_DIR), _DATA_DIR_OWNED: "1"})
        import wandb

        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group, tags=list(cfg.tags) or None,
            config=run_config, dir=str(output_dir), mode=cfg.mode, id=resume_id,
            resume="allow" if resume_id else None,
        )
        self.log_artifacts = cfg.log_artifacts

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    @property
    def run_dir(self) -> str | None:
        return None if self.run is None else self.run.dir

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step + self.step_offset)

    def log_decoder_norms(self, decoder_norms: torch.Tensor, source_names: list[str], step: int) -> None:
        """Per-snapshot mean decoder norm (a trajectory over the dashboard) and a histogram per snapshot."""
        if self.run is None:
            return
        import wandb

        norms = decoder_norms.detach().float().cpu()
        metrics: dict[str, Any] = {}
        for index, name in enumerate(source_names):
            metrics[f"decoder_norm/mean/{name}"] = norms[:, index].mean().item()
            metrics[f"decoder_norm/hist/{name}"] = wandb.Histogram(norms[:, index].numpy())
        # Share of each latent's total decoder norm per snapshot: where in training the latents live.
        share = norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-12)
        metrics["decoder_norm/peak_snapshot_hist"] = wandb.Histogram(share.argmax(dim=1).numpy())
        self.run.log(metrics, step=step + self.step_offset)

    def log_firing_frequency(self, frequency: torch.Tensor, step: int, source_names: list[str] | None = None) -> None:
        """log10 of each fired latent's firing frequency as a histogram (the density plot of the SAE literature),
        one per snapshot (`density/log10_frequency_hist/<snapshot>`) for a per-snapshot frequency [S, F]; the
        never-fired share and the dense count are scalars of `step_metrics`."""
        if self.run is None:
            return
        import wandb

        rows = {"": frequency} if frequency.dim() == 1 else {f"/{name}": row for name, row in
                                                            zip(source_names or [], frequency, strict=True)}
        metrics = {}
        for suffix, row in rows.items():
            fired = row[row > 0].double()
            if fired.numel():
                metrics[f"density/log10_frequency_hist{suffix}"] = wandb.Histogram(fired.log10().numpy())
        if metrics:
            self.run.log(metrics, step=step + self.step_offset)

    def log_analysis(self, result: AnalysisSummary, step: int, max_rows: int = ANALYSIS_TABLE_ROWS) -> None:
        """An exported dictionary's evolution: a table of per-feature trajectories, the report's plots, and class
        and emergence counts as scalars (so the dashboard shows them change over training)."""
        if self.run is None:
            return
        import wandb

        rows = result.table.rows
        if len(rows) > max_rows:  # a W&B table of every latent of a big dictionary would be slow to log and view
            rows = [rows[round(i * (len(rows) - 1) / (max_rows - 1))] for i in range(max_rows)]
        metrics: dict[str, Any] = {"analysis/features": wandb.Table(columns=result.table.columns, data=rows)}
        # A snapshots x hooks crosscoder is analysed one hook at a time: each hook's plots and counts under its name.
        parts = {f"{hook}/": part for hook, part in result.by_hook.items()} or {"": result}
        for prefix, part in parts.items():
            for path in part.files:
                if path.suffix == ".png":
                    metrics[f"analysis/{prefix}{path.stem}"] = wandb.Image(str(path))
            for name, count in part.evolution.class_counts().items():
                metrics[f"analysis/{prefix}class/{name}"] = count
            for name, count in zip(part.evolution.names, part.evolution.emergence_counts.tolist(), strict=True):
                metrics[f"analysis/{prefix}emerging_at/{name}"] = count
        if result.recovery is not None:  # planted sources: how much of the ground truth is found, as it trains
            metrics["analysis/recovery/fraction_recovered"] = result.recovery.fraction_recovered
            metrics["analysis/recovery/emergence_accuracy"] = result.recovery.emergence_accuracy
        self.run.log(metrics, step=step + self.step_offset)

    def log_dictionary(self, path: Path, step: int, metadata: dict[str, Any], aliases: list[str],
                       kind: str = "crosscoder") -> None:
        """The folder as one artifact (`kind`: crosscoder, or stack for a stack of dictionaries)."""
        if self.run is None or not self.log_artifacts:
            return
        import wandb

        artifact = wandb.Artifact(name=f"{kind}-{self.run.id}", type=kind, metadata=metadata)
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact, aliases=aliases + [f"step-{step + self.step_offset}"])

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        """Close the W&B run; a non-zero `exit_code` marks it failed in W&B (a stopped run can still resume)."""
        if self.run is None:
            return
        if summary:
            self.run.summary.update(summary)
        self.run.finish(exit_code=exit_code)
        self.run = None


class ProgressBar:
    """A console line with throughput and ETA, printed at most every `interval` seconds (main process only).
    Steps are the run's own (a resumed run shows where the run stands, not how far this session got); the rate is
    this session's, measured from `first_step`."""

    def __init__(self, total_steps: int, tokens_per_step: int, enabled: bool, first_step: int = 0,
                 interval: float = 2.0) -> None:
        self.total_steps, self.tokens_per_step, self.first_step = total_steps, tokens_per_step, first_step
        self.enabled, self.interval = enabled, interval
        self.start = self.last_print = time.perf_counter()

    def tokens_per_second(self, step: int) -> float:
        """This session's throughput when the run stands at `step`."""
        elapsed = time.perf_counter() - self.start
        return (step - self.first_step) * self.tokens_per_step / elapsed if elapsed > 0 else 0.0

    def line(self, step: int, extra: dict[str, float]) -> str:
        rate = self.tokens_per_second(step)
        remaining = (self.total_steps - step) * self.tokens_per_step / rate if rate > 0 else float("inf")
        fields = "".join(f" | {key} {value:.4g}" for key, value in extra.items())
        return (f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) | "
                f"{_si(step * self.tokens_per_step)} tok | {_si(rate)} tok/s | ETA {_duration(remaining)}{fields}")

    def update(self, step: int, extra: dict[str, float], force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last_print < self.interval):
            return
        self.last_print = now
        print(self.line(step, extra), file=sys.stderr, flush=True)


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
