"""Training-state checkpoints: what a stopped run needs to continue exactly where it was.

One folder per saved step, `<output_dir>/training_state/step_XXXXXXX/`:
- `engine/`: the DeepSpeed engine's own checkpoint: every rank's partition of the parameters and of the
  optimizer state (only DeepSpeed can lay ZeRO partitions back in place, so it reads these itself);
- `trainer_state.json`: step, LR scheduler, W&B run id, input scales and the run config;
- `rank_XXXXX.json` / `.safetensors`: each rank's stream position, shuffle buffer contents, dead-latent
  counters and RNG state (safetensors and JSON: nothing of ours is ever unpickled);
- `manifest.json`, written last: the size and sha256 of every other file.

What `trainer_state.json` and the rank files hold is crosscoder.training.run_state.RunState's `state_dict()`; this
module writes, verifies and loads it.

The folder is written under a hidden temporary name and renamed once complete. Before anything is loaded,
every file is checked against the manifest (the ranks share the hashing), so a partial or corrupt checkpoint
is refused with the reason, and `resume=auto` falls back to the previous one. The DeepSpeed files are handed
to DeepSpeed only after their hashes match what this tool wrote.

Every function that takes an accelerator is collective: all ranks call it. The output directory must be on a
filesystem all ranks share (as for the exported dictionaries).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from crosscoder.constants import (
    ENGINE_STATE_DIR,
    RANK_STATE_PATTERN,
    TRAINER_STATE_FILE,
    TRAINING_STATE_MANIFEST,
    TRAINING_STATE_PATTERN,
    TRAINING_STATES_DIR,
)
from crosscoder.errors import CheckpointError, ConfigError
from crosscoder.storage import save_safetensors, temporary_sibling

ENGINE_TAG = "state"
STATE_FORMAT_VERSION = 2
"""2: the snapshots' fingerprints are saved (a resume onto other weights is refused)."""
# Settings a resumed run may change: where it logs, how often it saves, how its workers are placed. Anything
# else (the data, the model, the schedule) would make the resumed run a different run.
MUTABLE_SETTINGS = (
    "output_dir", "tracking", "trainer.resume", "trainer.state_every", "trainer.keep_states", "trainer.log_every",
    "trainer.checkpoint_every", "data.workers.device", "data.workers.threads", "data.workers.cpus",
    "data.workers.slots", "data.workers.start_timeout_s", "data.cache.dir", "sources.toy.cache_dir",
    "parallel.token_check_every",
    "deepspeed.zero_stage",  # the stage it resolves to must match instead (check_same_zero_stage)
)
DEAD_TENSOR, FIRING_TENSOR = "tokens_since_fired", "firing_counts"
RNG_TENSORS = ("rng_cpu", "rng_cuda")
RUN_TENSORS = (DEAD_TENSOR, FIRING_TENSOR, *RNG_TENSORS)
"""A rank's tensors that are the run's own (crosscoder.training.run_state); the others are its stream's."""


@dataclass
class TrainingState:
    """One loaded training state, as this rank needs it."""

    path: Path
    trainer: dict[str, Any]
    """trainer_state.json: step, scheduler, wandb_run_id, input_scale, world_size, zero_stage, sources (with their
    fingerprints), config."""
    rank: dict[str, Any]
    """This rank's scalars: stream position and shuffle-buffer bookkeeping."""
    tensors: dict[str, torch.Tensor]
    """This rank's tensors: shuffle-buffer rows, pending rows, generator and RNG states, dead-latent counters."""

    @property
    def step(self) -> int:
        return int(self.trainer["step"])

    @property
    def stream_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """`build_activation_stream(state=...)`: the stream is rebuilt from it before the input scales would be
        estimated from its first batches, so it is read here rather than by RunState.load_state_dict."""
        return self.rank, {key: value for key, value in self.tensors.items() if key not in RUN_TENSORS}

    @property
    def input_scale(self) -> torch.Tensor:
        return torch.tensor(self.trainer["input_scale"])

    @property
    def sources(self) -> list[dict[str, Any]]:
        """The snapshot specs it was saved with, fingerprints included."""
        return self.trainer["sources"]

    @property
    def config(self) -> dict[str, Any]:
        return self.trainer["config"]

    @property
    def zero_stage(self) -> int:
        return int(self.trainer["zero_stage"])


def states_root(output_dir: Path) -> Path:
    return Path(output_dir) / TRAINING_STATES_DIR


def list_training_states(root: Path) -> list[Path]:
    """Complete-looking state folders (final names only, never temporaries), newest step first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and path.name.startswith("step_")
             and path.name[5:].isdigit()]
    return sorted(found, key=lambda path: int(path.name[5:]), reverse=True)


def save_training_state(
    accelerator, engine, root: Path, step: int, trainer_state: dict[str, Any],  # noqa: ANN001
    rank_scalars: dict[str, Any], rank_tensors: dict[str, torch.Tensor], keep: int,
) -> Path:
    """Write the state of every rank for `step` under `root`, atomically, and keep only the newest `keep`."""
    from accelerate.utils import broadcast_object_list, gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    final = root / TRAINING_STATE_PATTERN.format(step=step)
    chosen = [str(temporary_sibling(final, "tmp"))]
    broadcast_object_list(chosen, from_process=0)  # one temporary folder for all ranks
    tmp = Path(chosen[0])
    made_root = accelerator.is_main_process and not root.exists()  # a failed first save leaves no empty folder
    if accelerator.is_main_process:
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        engine.save_checkpoint(str(tmp / ENGINE_STATE_DIR), tag=ENGINE_TAG, save_latest=False)
        name = RANK_STATE_PATTERN.format(rank=rank)
        save_safetensors({key: value.detach().cpu().contiguous() for key, value in rank_tensors.items()},
                         tmp / f"{name}.safetensors")
        (tmp / f"{name}.json").write_text(json.dumps(rank_scalars, indent=2))
        if accelerator.is_main_process:
            state = {**trainer_state, "step": step, "world_size": world, "format_version": STATE_FORMAT_VERSION}
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        files = _state_files(tmp)
        hashes: dict[str, dict[str, Any]] = {}
        for part in gather_object([_describe_files(tmp, files[rank::world])]):  # the ranks share the hashing
            hashes.update(part)
        if accelerator.is_main_process:
            manifest = {"step": step, "world_size": world, "files": dict(sorted(hashes.items()))}
            (tmp / TRAINING_STATE_MANIFEST).write_text(json.dumps(manifest, indent=2))
            if final.exists():  # the same step saved again (a resumed run stopped at once): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _prune(root, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_root:
            with contextlib.suppress(OSError):  # rmdir: only while empty
                root.rmdir()
        raise
    accelerator.wait_for_everyone()
    return final


def _state_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if path.is_file() and path.name != TRAINING_STATE_MANIFEST)


def _describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _prune(root: Path, keep: int) -> None:
    """Delete states beyond the newest `keep`, and temporaries that killed runs left behind."""
    for old in list_training_states(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def verify_training_state(path: Path, rank: int = 0, world_size: int = 1) -> None:
    """Raise CheckpointError unless the manifest exists and this rank's share of the files matches it (sizes
    of all files, sha256 of files i with i % world_size == rank)."""
    manifest_path = path / TRAINING_STATE_MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: the save did not finish")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed: dict[str, dict[str, Any]] = manifest["files"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{manifest_path} is unreadable: {error}") from error
    if TRAINER_STATE_FILE not in listed:
        raise CheckpointError(f"{manifest_path} does not list {TRAINER_STATE_FILE}")
    names = sorted(listed)
    for name in names:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != listed[name]["bytes"]:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, the manifest says {listed[name]['bytes']}")
    for name in names[rank::world_size]:
        if _sha256(path / name) != listed[name]["sha256"]:
            raise CheckpointError(f"{path / name} does not match its sha256 in the manifest (corrupt)")


def resume_target(resume: str, output_dir: Path) -> tuple[Path, str]:
    """(output dir, resume setting) for `trainer.resume`: a run directory (one holding `training_state/`)
    continues in that directory from its newest complete state, as `auto` would there."""
    if resume in ("none", "auto"):
        return output_dir, resume
    path = Path(resume).expanduser()
    if (path / TRAINING_STATES_DIR).is_dir():
        return path.resolve(), "auto"
    return output_dir, resume


def select_training_state(
    accelerator, resume: str, root: Path, log: Callable[[str], None] = print  # noqa: ANN001
) -> Path | None:
    """The state to resume from: None for `none` (or `auto` with nothing saved yet). `auto` takes the newest
    state that verifies, saying why each newer one was refused; an explicit folder must verify."""
    from accelerate.utils import gather_object

    if resume == "none":
        return None
    candidates = list_training_states(root) if resume == "auto" else [Path(resume).expanduser()]
    if resume != "auto" and not candidates[0].is_dir():
        raise ConfigError(f"trainer.resume={resume!r} is neither a training-state folder nor a run directory "
                          f"with saved states (<run dir>/{TRAINING_STATES_DIR})")
    for candidate in candidates:
        try:
            verify_training_state(candidate, accelerator.process_index, accelerator.num_processes)
            problem = ""
        except CheckpointError as error:
            problem = str(error)
        problems = [p for p in gather_object([problem]) if p]  # every rank checked its share of the files
        if not problems:
            return candidate
        if resume != "auto":
            raise CheckpointError(f"cannot resume from {candidate}: {problems[0]}")
        log(f"refusing training state {candidate}: {problems[0]}; trying the previous one")
    if resume == "auto":
        log(f"no complete training state under {root}: starting from scratch")
    return None


def load_training_state(path: Path, rank: int, world_size: int) -> TrainingState:
    trainer = json.loads((path / TRAINER_STATE_FILE).read_text())
    if trainer.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={trainer.get('format_version')!r}, "
                              f"expected {STATE_FORMAT_VERSION}")
    if trainer["world_size"] != world_size:
        raise ConfigError(f"the training state {path} was saved by {trainer['world_size']} ranks; this run has "
                          f"{world_size}: resume with the same number of processes")
    name = RANK_STATE_PATTERN.format(rank=rank)
    return TrainingState(path=path, trainer=trainer, rank=json.loads((path / f"{name}.json").read_text()),
                         tensors=load_file(str(path / f"{name}.safetensors")))


def load_engine_state(engine, path: Path) -> None:  # noqa: ANN001
    """Lay the saved parameter and optimizer partitions back into the engine (files already verified)."""
    loaded, _ = engine.load_checkpoint(str(path / ENGINE_STATE_DIR), tag=ENGINE_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load the engine state in {path / ENGINE_STATE_DIR}")


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume under settings that make it a different run; name the first one that differs."""
    def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if any(name == m or name.startswith(m + ".") for m in MUTABLE_SETTINGS):
                continue
            flat.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
        return flat

    before, now = flatten(saved), flatten(current)
    for key in sorted(before.keys() | now.keys()):
        if before.get(key) != now.get(key):
            raise ConfigError(f"cannot resume from {path}: it was saved with {key}={before.get(key)!r}, this run "
                              f"has {key}={now.get(key)!r}")


def check_same_zero_stage(saved: int, current: int, path: Path) -> None:
    """Only DeepSpeed lays ZeRO partitions back in place, and only under the stage that wrote them."""
    if saved != current:
        raise ConfigError(f"cannot resume from {path}: it was saved under ZeRO-{saved}, this run has ZeRO-{current}; "
                          f"resume with deepspeed.zero_stage={saved}")


def rng_tensors() -> dict[str, torch.Tensor]:
    cpu, cuda = RNG_TENSORS
    tensors = {cpu: torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors[cuda] = torch.cuda.get_rng_state()
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    cpu, cuda = RNG_TENSORS
    torch.set_rng_state(tensors[cpu])
    if cuda in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[cuda])

