"""A Hydra launcher that runs every job of a sweep as its own multi-process `accelerate launch`.

    crosscoder-train --multirun hydra/launcher=accelerate hydra.launcher.config_file=launch/8gpu_zero2.yaml \
        crosscoder.l1_coeff=1,3,10

Hydra's basic launcher runs jobs one after another inside the driver process, which cannot host a process
group of several ranks per job. This one composes each job's overrides as Hydra would, then starts
`accelerate launch --config_file <config_file> --main_process_port <free port> -m crosscoder.train <overrides>`
with the job's own output directory (`<sweep dir>/<job number>`) and, unless set, one W&B group for the
whole sweep. Jobs run one after another; a failed job stops the sweep with its exit status.
"""

# No `from __future__ import annotations` here: Hydra's plugin scanner imports this module without putting it
# in sys.modules, and dataclasses then cannot resolve string annotations.
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from crosscoder.cli.train import sweep_group

log = logging.getLogger(__name__)


@dataclass
class AccelerateLauncherConf:
    _target_: str = "hydra_plugins.crosscoder_launcher.accelerate_launcher.AccelerateLauncher"
    config_file: str = "launch/1gpu.yaml"
    """The accelerate launch config every job runs with (processes, machines, ZeRO stage)."""
    module: str = "crosscoder.train"
    """The module each job runs (`-m`)."""


ConfigStore.instance().store(group="hydra/launcher", name="accelerate", node=AccelerateLauncherConf,
                             provider="crosscoder")


class AccelerateLauncher(Launcher):
    def __init__(self, config_file: str, module: str) -> None:
        self.config_file, self.module = config_file, module
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:  # noqa: ANN401
        from crosscoder.parallel.engine import free_port  # here, not at import: Hydra imports every plugin at start-up

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if not Path(self.config_file).is_file():
            raise FileNotFoundError(f"hydra.launcher.config_file={self.config_file!r} does not exist")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        returns = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job_config):
                job_config.hydra.job.id = idx
                job_config.hydra.job.num = idx
            job_dir = sweep_dir / str(job_config.hydra.sweep.subdir)
            extra = [f"hydra.run.dir={job_dir}"]
            if OmegaConf.select(job_config, "tracking.group") is None:
                extra.append(f"tracking.group={sweep_group(sweep_dir)}")
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", self.config_file,
                       "--main_process_port", str(free_port()), "-m", self.module, *overrides, *extra]
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} -> {job_dir}")
            status = subprocess.run(command).returncode
            if status:
                raise RuntimeError(f"sweep job #{idx} ({' '.join(overrides)}) failed with exit status {status}; "
                                   f"its log is in {job_dir}")
            returns.append(JobReturn(overrides=list(overrides), cfg=job_config, working_dir=str(job_dir),
                                     task_name=str(job_config.hydra.job.name), status=JobStatus.COMPLETED))
        return returns
