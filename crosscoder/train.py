"""Hydra entry point: `crosscoder-train [overrides]`, `python -m crosscoder.train`, or under `accelerate launch`.

With no arguments it runs the embedded default: a tiny GPT-NeoX trained locally (snapshots cached), then a
crosscoder across its snapshots, offline, on CPU, in a few minutes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import hydra
from omegaconf import DictConfig, OmegaConf

from crosscoder.config import ConfigError, RunConfig, check_known_keys, register_configs

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
T = TypeVar("T")

register_configs()


def _quiet_non_main_ranks() -> None:
    """Only rank 0 writes Hydra's .hydra/ folder and log file; the others would race on the same files."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def run_command(command: str, cfg: DictConfig, action: Callable[[RunConfig], T]) -> T:
    """Run a Hydra command on the typed config; a bad value is one line on stderr and exit status 2."""
    # Cheap imports only (no trainer, no DeepSpeed): every rank of a launch pays for them.
    from crosscoder.layout import TokenDriftError
    from crosscoder.preemption import TrainingInterrupted
    from crosscoder.training_state import CheckpointError

    try:
        check_known_keys(OmegaConf.to_container(cfg, resolve=False))  # type: ignore[arg-type]
        return action(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    except ConfigError as error:
        print(f"{command}: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as error:
        print(f"{command}: {error}", file=sys.stderr)
        sys.exit(2)
    except TokenDriftError as error:
        print(f"{command}: {error}", file=sys.stderr)
        sys.exit(1)
    except TrainingInterrupted as stopped:
        print(f"{command}: {stopped}; continue it with trainer.resume=auto", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of every run of one sweep, named after its directory (`multirun/<date>/<time>`)."""
    return "sweep:" + "/".join(Path(sweep_dir).parts[-2:])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from crosscoder.trainer import train

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.tracking.group is None:
        cfg.tracking.group = sweep_group(hydra_cfg.sweep.dir)  # the sweep's runs side by side in W&B
    result = run_command("crosscoder", cfg, train)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = result.final_metrics.get("explained_variance/mean", float("nan"))
        print(f"crosscoder: {result.steps} steps, {result.tokens_seen} tokens in {result.wall_seconds:.1f}s; "
              f"mean explained variance {ev:.3f}, L0 {result.final_metrics.get('l0', float('nan')):.1f}")
        print(f"crosscoder: dictionary: {result.dictionary_dir}")
        print(f"crosscoder: run dir:    {result.output_dir}")


def main() -> None:
    if not CONF_DIR.is_dir():
        sys.exit(f"crosscoder: config folder {CONF_DIR} not found; install the package editable (pip install -e .)")
    _quiet_non_main_ranks()
    _hydra_main()


if __name__ == "__main__":
    main()
