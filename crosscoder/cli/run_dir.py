"""The Hydra run directory's lifetime: a run that stops before writing anything there, or that continues in
another folder (a resume), leaves no folder of its own behind (issue 23).

Hydra makes `hydra.run.dir` (with `.hydra/` and the job log) before any of our code runs. `RunDirWatch`, a Hydra
callback named in conf/config.yaml, notes what existed just before, so that only what this process made is ever
removed, and only while the run dir holds nothing but Hydra's own files: a folder that held results is left
alone, and an empty folder the user pointed hydra.run.dir at is left empty.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class _Before:
    existing: Path
    """The watched folder itself if it existed, else its nearest ancestor that did."""
    names: frozenset[str]
    """What the watched folder held, when it existed (a sweep dir's earlier job folders)."""


_watched: dict[Path, _Before] = {}
"""This process's latest Hydra run (or sweep) dir, as it was before Hydra made it; an earlier run's (a test
running the entry point again in one process) is forgotten, so it cannot be taken for this run's."""


class RunDirWatch(Callback):
    """Notes the run (or sweep) directory's state before Hydra creates it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: ANN401
        note_before(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: ANN401
        note_before(config, "hydra.sweep.dir")


def note_before(config: DictConfig, key: str) -> None:
    """Resolving the key here caches `${now:...}` in the config, so Hydra's run_job makes this very folder."""
    _watched.clear()
    try:
        folder = Path(str(OmegaConf.select(config, key, throw_on_missing=True))).absolute()
    except Exception:  # unresolvable here: nothing noted, so nothing will ever be removed
        return
    existing = next(path for path in (folder, *folder.parents) if path.is_dir())
    names = frozenset(os.listdir(folder)) if existing == folder else frozenset()
    _watched[folder] = _Before(existing, names)


def discard_unused_run_dir() -> None:
    """Undo what Hydra made for this run when the run wrote nothing there: the run dir and the empty parents this
    process made for it, or, in an empty folder that existed before, the Hydra files this run put there."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).absolute()
    found = _watching(run_dir)
    if found is None or not run_dir.is_dir():
        return
    watched, before = found
    hydra_own = {str(hydra_cfg.output_subdir), f"{hydra_cfg.job.name}.log"}
    present = {path.name for path in run_dir.iterdir()}
    if run_dir == before.existing:  # a folder the user made: emptied again if it was empty and got only these
        if run_dir == watched and not before.names and present <= hydra_own:
            for name in present:
                _remove(run_dir / name)
        return
    top = before.existing / run_dir.relative_to(before.existing).parts[0]
    if (before.existing == watched and top.name in before.names) or not present <= hydra_own:
        return  # a job folder of an earlier sweep in the same sweep dir, or a run dir holding results
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir.parent
    while folder == top or top in folder.parents:  # rmdir: only while empty (another run may share a parent)
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _watching(run_dir: Path) -> tuple[Path, _Before] | None:
    """The watched folder that is run_dir or holds it, with its state before Hydra made the run dir."""
    for watched, before in _watched.items():
        if run_dir == watched or watched in run_dir.parents:
            return watched, before
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
