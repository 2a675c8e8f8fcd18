"""Hydra entry point: `crosscoder-train [overrides]`, `python -m crosscoder.train`, or under `accelerate launch`.

With no arguments it runs the embedded default: a tiny GPT-NeoX trained locally (snapshots cached), then a
crosscoder across its snapshots, offline, on CPU, in a few minutes.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import hydra
from omegaconf import DictConfig, OmegaConf

from crosscoder.cli.compose import CONF_DIR, check_overrides
from crosscoder.config import RunConfig, check_known_keys, register_configs
from crosscoder.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from crosscoder.training.build import AfterExport
    from crosscoder.training.tracking import AnalysisSummary, RunContinuation
    from crosscoder.training.trainer import TrainResult

T = TypeVar("T")

register_configs()


def quiet_non_main_ranks() -> None:
    """Only rank 0 writes Hydra's .hydra/ folder and log file; the others would race on the same files."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def run_command(command: str, cfg: DictConfig, action: Callable[[RunConfig], T]) -> T:
    """Run a Hydra command on the typed config. Whatever stops it is one line on stderr with an exit status
    that says what kind of stop it was (docs/resume-and-faults.md): 2 bad input, 1 a fault during the run,
    128 + the signal for a stop asked by a signal; a stop that left a training state says how to resume. A stop
    (a refusal, a fault, a traceback) before anything was written to the Hydra run dir leaves no run dir."""
    from crosscoder.cli.run_dir import discard_unused_run_dir

    try:
        return _run_reporting(command, cfg, action)
    except BaseException:
        discard_unused_run_dir()
        raise


def _run_reporting(command: str, cfg: DictConfig, action: Callable[[RunConfig], T]) -> T:
    """The action, each kind of stop turned into its one line and exit status."""
    # Cheap imports only (no trainer, no DeepSpeed): every rank of a launch pays for them.
    from crosscoder.errors import (
        EXIT_BAD_INPUT,
        EXIT_FAULT,
        CheckpointError,
        DictionaryError,
        RunFault,
        TokenDriftError,
        TrainingInterrupted,
        WorkerError,
        same_on_every_rank,
    )
    from crosscoder.storage import write_failure_reason

    def stop(message: str, status: int, state_dir: Path | None = None) -> NoReturn:
        resume = f"; continue it with: {resume_command(state_dir)}" if state_dir is not None else ""
        print(f"{command}: {message}{resume}", file=sys.stderr)
        sys.exit(status)

    try:
        with same_on_every_rank():
            check_known_keys(OmegaConf.to_container(cfg, resolve=False))  # type: ignore[arg-type]
        return action(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    except ConfigError as error:
        if error.on_every_rank and int(os.environ.get("RANK", "0")) > 0:
            sys.exit(EXIT_BAD_INPUT)  # rank 0 says it: one line per launch, not one per rank
        stop(f"configuration error: {error}", EXIT_BAD_INPUT)
    except CheckpointError as error:
        stop(str(error), EXIT_BAD_INPUT)
    except TrainingInterrupted as stopped:
        stop(str(stopped), stopped.exit_status, stopped.state_dir)
    except RunFault as fault:
        stop(str(fault), fault.exit_status, fault.state_dir)
    except (TokenDriftError, WorkerError, DictionaryError) as error:
        stop(str(error), EXIT_FAULT)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without saving
        stop("interrupted by a second Ctrl-C before the training state was saved; what was saved before stays",
             128 + signal.SIGINT)
    except OSError as error:
        reason = write_failure_reason(error, Path(error.filename or "."))
        if reason is None:
            raise
        stop(f"cannot write {error.filename}: {reason}", EXIT_BAD_INPUT)


def resume_command(state_dir: Path) -> str:
    """The command that continues this run in its own directory (the Hydra run dir of the state's run)."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(state_dir).resolve().parent.parent  # <run dir>/training_state/step_N
    keep = [override for override in HydraConfig.get().overrides.task
            if override.lstrip("+~").split("=", 1)[0] not in ("trainer.resume", "hydra.run.dir")]
    arguments = [*keep, f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    launcher = ("crosscoder-launch <your launch options> -m crosscoder.train"
                if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "crosscoder-train")
    return " ".join([launcher, *(shlex.quote(argument) for argument in arguments)])


def check_run_dir_writable(argv: list[str]) -> None:
    """Refuse a run directory on a read-only or unwritable file system before Hydra trips over it with a
    traceback (Hydra creates it before any of our code runs)."""
    multirun = any(argument in ("-m", "--multirun") for argument in argv)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [argument.split("=", 1)[1] for argument in argv if argument.startswith(key)]
    target = Path(given[-1]).expanduser() if given else Path.cwd()
    existing = next(folder for folder in (target, *target.absolute().parents) if folder.exists())
    if not os.access(existing, os.W_OK):
        setting = f"{key}{given[-1]}" if given else f"the working directory {target}"
        print(f"crosscoder: {setting}: {existing} is not writable (read-only file system or no permission); "
              "pick another hydra.run.dir", file=sys.stderr)
        sys.exit(2)


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of every run of one sweep, named after its directory (`multirun/<date>/<time>`)."""
    return "sweep:" + "/".join(Path(sweep_dir).parts[-2:])


def train_method(cfg: RunConfig):  # noqa: ANN201 (a TrainResult; the trainer is imported late)
    """One run of what `method` says: a crosscoder or independent dictionaries (one training run), or SAE-Track's
    chain of runs. Prints the family's recipe as this run applies it (rank 0) once the settings are valid."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"crosscoder: {cfg.validate().describe_recipe()}", flush=True)
    if cfg.method.name == "sae_track":
        from crosscoder.training.sae_track import train_sae_track

        return train_sae_track(cfg, after_export=after_export_callables())
    return train(cfg)


def train(cfg: RunConfig, continuation: RunContinuation | None = None) -> TrainResult:
    """Train as the config says, each exported dictionary evaluated spliced in (trainer.eval_tokens) and analysed
    (tracking.log_analysis)."""
    from crosscoder.training import trainer as training_loop

    return training_loop.train(cfg, continuation, after_export=after_export_callables())


def after_export_callables() -> AfterExport:
    """The spliced-in evaluation, then the analysis: what the trainer calls on each export. The loop imports
    neither (lower floor); the analysis (matplotlib: ~1 s) is imported on its first call, which only the main
    process makes, so the other ranks never pay for it."""
    from crosscoder.evaluation.spliced import export_eval
    from crosscoder.training.build import AfterExport

    return AfterExport(evaluate=export_eval, analyze=_analyze_export)


def _analyze_export(dictionary_dir: Path, dead_mask: torch.Tensor) -> AnalysisSummary:
    from crosscoder.analysis.report.dictionary import analyze_export

    return analyze_export(dictionary_dir, dead_mask)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from crosscoder.cli.run_dir import discard_unused_run_dir

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.tracking.group is None:
        cfg.tracking.group = sweep_group(hydra_cfg.sweep.dir)  # the sweep's runs side by side in W&B
    result = run_command("crosscoder", cfg, train_method)
    discard_unused_run_dir()  # a resumed run continued in its own run dir: the one Hydra made is unused
    if int(os.environ.get("RANK", "0")) == 0:
        ev = result.final_metrics.get("explained_variance/mean", float("nan"))
        print(f"crosscoder: {result.timing()}, {result.tokens_seen} tokens; "
              f"mean explained variance {ev:.3f}, L0 {result.final_metrics.get('l0', float('nan')):.1f}")
        print(f"crosscoder: dictionary: {result.dictionary_dir}")
        print(f"crosscoder: run dir:    {result.output_dir}")


def main() -> None:
    if not CONF_DIR.is_dir():
        sys.exit(f"crosscoder: config folder {CONF_DIR} not found; install the package editable (pip install -e .)")
    check_run_dir_writable(sys.argv[1:])
    check_overrides("crosscoder", sys.argv[1:])  # a bad command line: one line and exit 2, not Hydra's report
    quiet_non_main_ranks()
    _hydra_main()


if __name__ == "__main__":
    main()
