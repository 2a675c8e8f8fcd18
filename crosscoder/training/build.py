"""Assembling a training run on this rank, before its first step: the run directory and the state to resume
from, the sources (configs only) and the layout, the activation stream, the crosscoder inside its DeepSpeed
engine with its input scales, Adam and the schedule, the run's resumable state (crosscoder.training.run_state:
restored when resuming), and W&B. The loop itself is crosscoder.training.trainer's `TrainingRun`, which is a
`RunAssembly`; what it calls after each export (`AfterExport`) is handed in, not imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from omegaconf import OmegaConf

from crosscoder.config import RunConfig
from crosscoder.config.recipes import get_setting, set_setting
from crosscoder.data.checks import complete_cache
from crosscoder.data.kinds import describe_sources, source_kind
from crosscoder.data.stream import ActivationStream, build_activation_stream
from crosscoder.data.workers import resolve_worker_device
from crosscoder.errors import ConfigError
from crosscoder.parallel.engine import (
    full_parameters,
    partitioned_init,
    slow_precision_warning,
    with_model_parallel_unit,
)
from crosscoder.parallel.layout import build_layout
from crosscoder.parallel.memory import check_state_fits
from crosscoder.sources.fingerprint import check_same_contents, check_same_snapshots
from crosscoder.sources.models import snapshot_model_bytes
from crosscoder.storage import writing
from crosscoder.training.methods import (
    build_module,
    dead_shape,
    restrict_sources,
    snapshot_window,
)
from crosscoder.training.metrics import (
    DeadLatentTracker,
    FiringFrequency,
)
from crosscoder.training.normalization import estimate_input_scale
from crosscoder.training.preemption import StopRequest
from crosscoder.training.run_state import RunState
from crosscoder.training.schedules import adam, lr_multiplier
from crosscoder.training.state import (
    TrainingState,
    check_same_run,
    check_same_zero_stage,
    load_engine_state,
    load_training_state,
    resume_target,
    select_training_state,
    states_root,
)
from crosscoder.training.tracking import AnalysisSummary, ProgressBar, RunContinuation, Tracker
from crosscoder.training.warm_start import check_warm_start, warm_start

AnalyzeExport = Callable[[Path, torch.Tensor], AnalysisSummary]
"""(dictionary folder, dead mask [F]) -> its analysis, logged to W&B (crosscoder.analysis.report.dictionary's
analyze_export)."""
EvaluateExport = Callable[[Path, int, str, Callable[[str], None]], dict[str, float]]
"""(dictionary folder, tokens, device, log) -> the spliced-in LM loss figures, also written into the folder
(crosscoder.evaluation.spliced's export_eval)."""


@dataclass(frozen=True)
class AfterExport:
    """What the loop calls on each exported crosscoder (main process, the other ranks wait at the export's
    barrier), in this order: the analysis reports the evaluation's eval.json. The loop imports neither (they sit
    on higher floors); the entry point passes them in (crosscoder.cli.train). None: skipped."""

    evaluate: EvaluateExport | None = None
    """Called when trainer.eval_tokens > 0 and the sources are a language model's (planted data has none)."""
    analyze: AnalyzeExport | None = None
    """Called when tracking.log_analysis is on."""


class RunAssembly:
    """A run's parts, built in `start()` (collective: every rank calls it, in the same order)."""

    def __init__(self, cfg: RunConfig, accelerator, micro_batch: int, stop: StopRequest,  # noqa: ANN001
                 continuation: RunContinuation | None = None, after_export: AfterExport | None = None) -> None:
        self.cfg, self.accelerator, self.micro_batch, self.stop = cfg, accelerator, micro_batch, stop
        self.continuation = continuation
        self.after_export = after_export or AfterExport()
        self.is_main = accelerator.is_main_process
        self.log: Callable[[str], None] = print if self.is_main else (lambda *_: None)
        self.stream: ActivationStream | None = None
        self.tracker: Tracker | None = None
        self.last_state: Path | None = None
        """The newest complete training state of this run: where it can resume from now."""
        self.metrics: dict[str, Any] = {}
        """Figures of the last log step."""
        self.eval_metrics: dict[str, float] = {}
        """Spliced-in LM loss of the last export (main process only)."""
        self.stopped_by: str | None = None

    def start(self) -> None:
        torch.manual_seed(self.cfg.trainer.seed)
        self._open_run()
        self._open_stream()
        self._build_engine()
        self._restore()
        self._start_tracking()

    def _open_run(self) -> None:
        """The run directory, the state to resume from, the snapshots (configs only) and the layout."""
        cfg, log = self.cfg, self.log
        configured_dir, resume = resume_target(cfg.trainer.resume, Path(cfg.output_dir))
        self.output_dir = _shared_output_dir(str(configured_dir))
        if self.output_dir != Path(cfg.output_dir).resolve():
            log(f"continuing the run in {self.output_dir}")
        self.resumed = _resumable_state(self.accelerator, resume, self.output_dir, cfg, log)
        self.run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        # Rank 0 first: it builds the embedded snapshots (or fills the hub cache) while the others wait.
        with self.accelerator.main_process_first():
            self.stream_sources = describe_sources(cfg.sources, log=log)  # what the stream reads from
        self.window = snapshot_window(cfg, self.stream_sources)  # what this run trains (method.snapshot: one)
        self.sources = restrict_sources(self.stream_sources, self.window)
        check_warm_start(cfg, len(self.sources.specs), self.sources.d_model)
        if self.resumed is not None:  # the same snapshot names may hold other weights now
            check_same_snapshots(self.resumed.sources, self.sources.specs,
                                 f"the training state {self.resumed.path}", folder=self.sources.folder)
            self.last_state = self.resumed.path
        self.input_digests = self._input_digests()
        self.source_names = [spec.name for spec in self.sources.specs]
        self.layout = build_layout(cfg.parallel.snapshot_parallel, len(self.sources.specs),
                                   cfg.parallel.sparse_topk_gradient)
        self.total_steps = cfg.trainer.total_tokens // cfg.trainer.batch_size
        check_state_fits(len(self.layout.share), self.sources.d_model, cfg.crosscoder.dict_size,
                         self.layout.data_parallel, self.accelerator.state.deepspeed_plugin.zero_stage,
                         cfg.trainer.precision, self.accelerator.device, self._worker_models())

    def _worker_models(self) -> tuple[int, str] | None:
        """The snapshot models this rank's activation workers will hold on the rank's own device (each worker
        loads every snapshot of the rank's share; none with an activation cache or without models), as bytes
        and words, or None."""
        cfg = self.cfg
        if not cfg.sources.has_model() or complete_cache(cfg.data.cache.dir):
            return None
        if torch.device(resolve_worker_device(cfg.data.workers.device)) != self.accelerator.device:
            return None
        shared = [self.sources.specs[index] for index in self.layout.share]
        snapshots = list({spec.snapshot_name: spec for spec in shared}.values())
        per_copy = sum(snapshot_model_bytes(spec, cfg.sources.dtype, cfg.sources.trust_remote_code)
                       for spec in snapshots)
        workers = cfg.data.workers.num_workers  # 0: the snapshots run in the trainer process, once
        where = f"each of {workers} activation worker(s)" if workers else "the trainer process (no workers)"
        return max(1, workers) * per_copy, f"{len(snapshots)} snapshot model(s) ({cfg.sources.dtype}) in {where}"

    def _input_digests(self) -> dict[str, str] | None:
        """The input files' whole-content digests (an activation folder's, local snapshots' weights: the kind
        says), hashed by the main process and shared; when resuming, checked against the state's (a state from
        before has none)."""
        digests: list[dict[str, str] | None] = [None]
        if self.is_main:
            kind = source_kind(self.cfg.sources.kind)
            digests[0] = kind.content_digests(self.cfg.sources, self.stream_sources, self.log)
        broadcast_object_list(digests, from_process=0)
        saved = None if self.resumed is None else self.resumed.trainer.get("input_digests")
        if digests[0] is not None and saved is not None:
            folder = self.sources.folder
            what = f"activations in the folder {folder}" if folder else "snapshots"
            check_same_contents(saved, digests[0], what, f"the training state {self.resumed.path}")  # type: ignore[union-attr]
        return digests[0]

    def _open_stream(self) -> None:
        resumed, layout, offset = self.resumed, self.layout, self.window.start
        self.stream = build_activation_stream(
            self.cfg.sources, self.cfg.data, self.stream_sources, layout.data_rank, layout.data_parallel,
            self.micro_batch, log=self.log, state=None if resumed is None else resumed.stream_state,
            share=range(offset + layout.share.start, offset + layout.share.stop))
        if resumed is None:  # the steps, and the first batches that set the input scales and the encoder bias
            steps = max(self.total_steps, self.cfg.crosscoder.norm_estimation_batches)
            _check_enough_tokens(self.stream, self.cfg, steps * self.micro_batch)

    def _build_engine(self) -> None:
        """The crosscoder (this rank's share), its input scales, Adam and the schedule, inside DeepSpeed."""
        cfg, crosscoder_cfg, trainer_cfg, layout = self.cfg, self.cfg.crosscoder, self.cfg.trainer, self.layout
        share, total_steps = layout.share, self.total_steps
        self.zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage
        with partitioned_init(self.accelerator, layout):  # ZeRO-3: no rank ever holds even its whole share
            model = build_module(cfg, len(self.sources.specs), self.sources.d_model, layout)
        self.aux_k = model.aux_k
        self.input_scale = estimate_input_scale(cfg, self.accelerator, layout, self.stream, self.sources, self.resumed,
                                        self.log)  # every snapshot's
        model.set_input_scale(self.input_scale[share.start : share.stop])
        if crosscoder_cfg.init_from and self.resumed is None:
            with full_parameters(model, modify=True) as module:
                warm_start(module, crosscoder_cfg.init_from)
            self.log(f"weights from {crosscoder_cfg.init_from} (a fresh optimizer)")
        elif crosscoder_cfg.init == "anthropic_2025" and self.resumed is None:
            # Rank 0's bias is every rank's: DeepSpeed broadcasts rank 0's weights (ZeRO-3: `modify`).
            with full_parameters(model, modify=True) as module:
                module.initialize_encoder_bias(self.stream.peek(crosscoder_cfg.norm_estimation_batches),
                                               crosscoder_cfg.firing_fraction())
        optimizer = adam(model.parameters(), lr=trainer_cfg.lr, betas=tuple(trainer_cfg.adam_betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(step, total_steps, trainer_cfg.lr_warmup_steps, trainer_cfg.lr_decay_fraction),
        )
        with with_model_parallel_unit(layout):  # ZeRO over the data group only
            self.engine, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.param_dtype = next(self.engine.parameters()).dtype
        latents, n_snapshots = crosscoder_cfg.dict_size, len(self.sources.specs)
        self.per_dictionary = model.dictionaries_per_snapshot
        self.dead = DeadLatentTracker(dead_shape(model, n_snapshots, latents), crosscoder_cfg.dead_after_tokens,
                                      self.accelerator.device)
        firing_shape = (n_snapshots, latents) if model.codes_per_snapshot else (latents,)
        self.firing = FiringFrequency(firing_shape, self.accelerator.device)

    def _restore(self) -> None:
        """The run's resumable state over its live parts; when resuming, the engine's partitions and then the
        rest of the saved state laid back in."""
        self.state = RunState(self.scheduler, self.stream, self.dead, self.firing, self.input_scale,
                              self.sources.specs, self.zero_stage, self.run_config, input_digests=self.input_digests)
        resumed = self.resumed
        if resumed is not None:
            load_engine_state(self.engine, resumed.path)
            self.state.load_state_dict(resumed)
            self.log(f"resumed from {resumed.path} at step {self.state.step}")
        self.first_step = self.state.step

    def _start_tracking(self) -> None:
        cfg, layout = self.cfg, self.layout
        resume_id = self.state.wandb_run_id  # the saved run's, when resuming
        continuation = self.continuation  # a chain's run (with its step offset) wins over the state's own id
        if continuation is None and resume_id:
            continuation = RunContinuation(resume_id)
        self.tracker = Tracker(cfg.tracking, self.run_config, self.output_dir, self.is_main,
                               resume_id=continuation.run_id if continuation else None,
                               step_offset=continuation.step_offset if continuation else 0)
        self.state.wandb_run_id = self.tracker.run_id  # what a training state saved from now on records
        self.progress = ProgressBar(self.total_steps, cfg.trainer.batch_size, enabled=self.is_main,
                                    first_step=self.first_step)
        split = f" ({layout.describe()})" if layout.split else ""
        self.log(f"training {self.total_steps} steps of {cfg.trainer.batch_size} tokens on "
                 f"{self.accelerator.num_processes} rank(s){split}, ZeRO-{self.zero_stage}, "
                 f"output in {self.output_dir}")
        warning = slow_precision_warning(cfg.trainer.precision, self.accelerator.device)
        if warning:
            self.log(warning)


def _resumable_state(
    accelerator, resume: str, output_dir: Path, cfg: RunConfig, log: Callable[[str], None]  # noqa: ANN001
) -> TrainingState | None:
    path = select_training_state(accelerator, resume, states_root(output_dir), log)
    if path is None:
        return None
    resumed = load_training_state(path, accelerator.process_index, accelerator.num_processes)
    _keep_saved_recipe(cfg, resumed.config, log)
    check_same_run(resumed.config, OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), path)
    check_same_zero_stage(resumed.zero_stage, accelerator.state.deepspeed_plugin.zero_stage, path)
    return resumed


def _keep_saved_recipe(cfg: RunConfig, saved: dict[str, Any], log: Callable[[str], None]) -> None:
    """A resumed run continues under the settings it was saved with: a key this run left to the recipe takes the
    state's value (a state saved before the recipe changed, or before recipes existed, still resumes)."""
    for key in getattr(cfg, "recipe_filled", {}):
        node: Any = saved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != get_setting(cfg, key):
            log(f"resuming with the saved {key}={node} (the recipe for {cfg.crosscoder.activation} now says "
                f"{get_setting(cfg, key)})")
            set_setting(cfg, key, node)


def _check_enough_tokens(stream: ActivationStream, cfg: RunConfig, needed_per_rank: int) -> None:
    """A cache or an activation folder is finite: refuse up front a run it cannot feed, rather than stop half-way,
    naming what holds too few rows."""
    available = stream.available_tokens
    if available is None:
        return
    # The shuffle buffer can leave up to one batch unserved at the end of a finite stream.
    if available - stream.buffer.batch_size < needed_per_rank:
        if cfg.data.cache.dir:
            origin, remedy = f"data.cache.dir={cfg.data.cache.dir!r}", "build a larger cache (data.cache.tokens)"
        else:
            origin, remedy = source_kind(cfg.sources.kind).finite_origin(cfg.sources)
        estimation = cfg.crosscoder.norm_estimation_batches * stream.buffer.batch_size
        needs = (f"trainer.total_tokens={cfg.trainer.total_tokens} needs {needed_per_rank} per rank (+ one batch)"
                 if needed_per_rank > estimation else
                 f"the input-scale estimation needs crosscoder.norm_estimation_batches="
                 f"{cfg.crosscoder.norm_estimation_batches} batches of {stream.buffer.batch_size} (+ one batch)")
        raise ConfigError(f"{origin} holds {available} tokens for this rank, but {needs}; {remedy}, or train on "
                          "fewer tokens")


def _shared_output_dir(configured: str) -> Path:
    """Rank 0's output directory, for every rank (ranks can compose different timestamped Hydra dirs)."""

    chosen = [str(Path(configured).resolve())]
    broadcast_object_list(chosen, from_process=0)
    path = Path(chosen[0])
    with writing("the run directory", path):  # a read-only folder is refused now, not at the first save
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    return path
