"""The training loop: paired activations in, a DeepSpeed-engine crosscoder step, metrics and exports out.

The loop reads a plain iterator of [batch, S_j, d] tensors; where they come from is the data package's concern,
how the model is sharded is `parallel`'s and `layout`'s (S_j: this rank's snapshots, all of them unless the
run is split by snapshot).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object
from omegaconf import OmegaConf

from crosscoder.config import MODEL_KINDS, RunConfig
from crosscoder.constants import (
    CHECKPOINTS_DIR,
    DICTIONARY_DIR,
    RUN_SUMMARY_FILE,
    STREAM_POSITION_FILE,
    TRAINING_STATE_PATTERN,
)
from crosscoder.data.checks import check_inputs
from crosscoder.data.kinds import count_sources, describe_sources
from crosscoder.data.stream import ActivationStream, build_activation_stream
from crosscoder.data.workers import resolve_worker_device
from crosscoder.dictionary.independent import split_dictionary_states
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary
from crosscoder.dictionary.stack import export_stack
from crosscoder.errors import EXIT_BAD_INPUT, EXIT_FAULT, ConfigError, RunFault, TrainingInterrupted, WorkerError
from crosscoder.evaluation.spliced import export_eval
from crosscoder.parallel.engine import (
    build_accelerator,
    ensure_process_group_env,
    full_parameters,
    full_state_dict,
    partitioned_init,
    slow_precision_warning,
    teardown,
    with_model_parallel_unit,
)
from crosscoder.parallel.layout import build_layout, check_layout
from crosscoder.sources.fingerprint import check_same_snapshots
from crosscoder.sources.spec import SourceInfo
from crosscoder.storage import write_text_atomic, writing
from crosscoder.training.health import StepHealth, local_health, nonfinite_message, read_health
from crosscoder.training.methods import (
    build_module,
    dead_mask_for,
    dead_shape,
    independent_manifest,
    restrict_sources,
    snapshot_window,
)
from crosscoder.training.metrics import (
    DeadLatentTracker,
    FiringFrequency,
    fired_latents,
    fired_per_snapshot,
    step_metrics,
)
from crosscoder.training.normalization import estimate_input_scale
from crosscoder.training.preemption import StopRequest
from crosscoder.training.schedules import adam, l1_coefficient, lr_multiplier
from crosscoder.training.state import (
    TrainingState,
    check_same_run,
    check_same_zero_stage,
    load_engine_state,
    load_training_state,
    restore_rng,
    resume_target,
    rng_tensors,
    save_training_state,
    select_training_state,
    states_root,
)
from crosscoder.training.tracking import AnalysisSummary, ProgressBar, RunContinuation, Tracker
from crosscoder.training.warm_start import check_warm_start, warm_start


@dataclass
class TrainResult:
    output_dir: Path
    dictionary_dir: Path
    steps: int
    tokens_seen: int
    wall_seconds: float
    final_metrics: dict[str, Any]


AnalyzeExport = Callable[[Path, torch.Tensor], AnalysisSummary]
"""What the loop calls on each exported dictionary when tracking.log_analysis is on: (dictionary folder, dead
mask [F]) -> its analysis, logged to W&B. The loop imports no analysis; the entry point passes this in."""


def train(cfg: RunConfig, continuation: RunContinuation | None = None,
          analyze: AnalyzeExport | None = None) -> TrainResult:
    """Train one crosscoder as the config says (every rank of a launch calls this); see `TrainingRun`.
    `continuation`: log into that W&B run after its steps (a chain of runs, crosscoder.training.sae_track).
    `analyze`: see AnalyzeExport (None: no analysis at export)."""
    check_inputs(cfg)
    started = time.perf_counter()
    # DeepSpeed needs the per-rank micro batch in its config, before the process group is up: read the
    # world size from the launcher's environment. The ranks of one snapshot group share their tokens, so the
    # global batch is split over the data-parallel ranks only.
    ensure_process_group_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data_parallel = check_layout(world_size, cfg.parallel.snapshot_parallel, count_sources(cfg), cfg.trainer.batch_size)
    accelerator = build_accelerator(cfg, cfg.trainer.batch_size // data_parallel, data_parallel)
    stop = StopRequest()
    run = TrainingRun(cfg, accelerator, cfg.trainer.batch_size // data_parallel, stop, continuation, analyze)
    finished = False
    try:
        run.start()
        result = run.train(started)
        finished = True
        return result
    except BaseException as error:
        run.stopped_by = f"{type(error).__name__}: {error}"
        raise
    finally:
        stop.restore()
        run.close()
        teardown(accelerator, synchronize=finished)


class TrainingRun:
    """One run on this rank, from start-up to the export: the stream, the engine, the tracker, and the training
    state it can resume from. Every method is collective (all ranks call it, in the same order) unless it says
    otherwise."""

    def __init__(self, cfg: RunConfig, accelerator, micro_batch: int, stop: StopRequest,  # noqa: ANN001
                 continuation: RunContinuation | None = None, analyze: AnalyzeExport | None = None) -> None:
        self.cfg, self.accelerator, self.micro_batch, self.stop = cfg, accelerator, micro_batch, stop
        self.continuation = continuation
        self.analyze = analyze
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

    # ---- start-up ------------------------------------------------------------------------------------
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
        self.run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        self.resumed = _resumable_state(self.accelerator, resume, self.output_dir, self.run_config, log)
        # Rank 0 first: it builds the embedded snapshots (or fills the hub cache) while the others wait.
        with self.accelerator.main_process_first():
            self.stream_sources = describe_sources(cfg.sources, log=log)  # what the stream reads from
        self.window = snapshot_window(cfg, self.stream_sources)  # what this run trains (method.snapshot: one)
        self.sources = restrict_sources(self.stream_sources, self.window)
        check_warm_start(cfg, len(self.sources.specs), self.sources.d_model)
        if self.resumed is not None:  # the same snapshot names may hold other weights now
            check_same_snapshots(self.resumed.trainer["sources"], self.sources.specs,
                                 f"the training state {self.resumed.path}")
            self.last_state = self.resumed.path
        self.source_names = [spec.name for spec in self.sources.specs]
        self.layout = build_layout(cfg.parallel.snapshot_parallel, len(self.sources.specs),
                                   cfg.parallel.sparse_topk_gradient)
        self.total_steps = cfg.trainer.total_tokens // cfg.trainer.batch_size

    def _open_stream(self) -> None:
        resumed, layout, offset = self.resumed, self.layout, self.window.start
        self.stream = build_activation_stream(
            self.cfg, self.stream_sources, layout.data_rank, layout.data_parallel, self.micro_batch, log=self.log,
            state=None if resumed is None else (resumed.rank, resumed.tensors),
            share=range(offset + layout.share.start, offset + layout.share.stop))
        if resumed is None:
            _check_enough_tokens(self.stream, self.cfg, self.total_steps * self.micro_batch)

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
        self.first_step = 0
        resumed = self.resumed
        if resumed is None:
            return
        load_engine_state(self.engine, resumed.path)
        self.scheduler.load_state_dict(resumed.trainer["scheduler"])
        self.dead.tokens_since_fired.copy_(resumed.tensors["tokens_since_fired"])
        if "firing_counts" in resumed.tensors:  # states from before the firing frequency start it afresh
            self.firing.add(resumed.tensors["firing_counts"], resumed.trainer["firing_tokens"])
        restore_rng(resumed.tensors)
        self.first_step = resumed.step
        self.log(f"resumed from {resumed.path} at step {self.first_step}")

    def _start_tracking(self) -> None:
        cfg, layout = self.cfg, self.layout
        resume_id = None if self.resumed is None else self.resumed.trainer.get("wandb_run_id")
        continuation = self.continuation  # a chain's run (with its step offset) wins over the state's own id
        if continuation is None and resume_id:
            continuation = RunContinuation(resume_id)
        self.tracker = Tracker(cfg.tracking, self.run_config, self.output_dir, self.is_main,
                               resume_id=continuation.run_id if continuation else None,
                               step_offset=continuation.step_offset if continuation else 0)
        self.progress = ProgressBar(self.total_steps - self.first_step, cfg.trainer.batch_size, enabled=self.is_main)
        split = f" ({layout.describe()})" if layout.split else ""
        self.log(f"training {self.total_steps} steps of {cfg.trainer.batch_size} tokens on "
                 f"{self.accelerator.num_processes} rank(s){split}, ZeRO-{self.zero_stage}, "
                 f"output in {self.output_dir}")
        warning = slow_precision_warning(cfg.trainer.precision, self.accelerator.device)
        if warning:
            self.log(warning)

    # ---- the loop ------------------------------------------------------------------------------------
    def train(self, started: float) -> TrainResult:
        loop_started, waited_before = time.perf_counter(), self.stream.wait_seconds
        self._window = (loop_started, waited_before)  # (time, stream wait) at the last log step
        for step in range(self.first_step, self.total_steps):
            self._step(step)
        if self.first_step < self.total_steps:  # a full disk at the export must not lose the run: resuming
            self.save_state(self.total_steps)  # re-exports
        return self._finish(started, loop_started, waited_before)

    def _step(self, step: int) -> None:
        cfg, crosscoder_cfg, layout, device = self.cfg, self.cfg.crosscoder, self.layout, self.accelerator.device
        batch, data_error = _next_batch(self.stream, (self.micro_batch, len(layout.share), self.sources.d_model))
        x = batch.to(device, dtype=self.param_dtype)
        if cfg.parallel.token_check_every and step % cfg.parallel.token_check_every == 0:
            # Snapshot groups pair the same tokens.
            layout.check_same_tokens(None if data_error else self.stream.last_token_ids, step, device)
        l1_coeff = l1_coefficient(step, crosscoder_cfg.l1_coeff, crosscoder_cfg.l1_warmup_steps)
        module = self.accelerator.unwrap_model(self.engine)
        output = self.engine(x, l1_coeff, dead_mask_for(module, self.dead.dead_mask, layout))
        # One reduction per step, before the update: which latents fired, and the health flags (NaN/inf in the
        # batch or the loss, a failed stream, a stop signal) that stop every rank together.
        # The loss rides along (summed over the world: each rank's share of its data rank's loss), so the
        # progress line needs no transfer of its own after the update.
        # One dictionary per snapshot: each rank's snapshots' rows, in their place among all the snapshots.
        fired = layout.scatter(fired_per_snapshot(output.codes).t()).t() if self.per_dictionary else \
            fired_latents(output.codes)
        local = torch.cat([fired.float().flatten(),
                           local_health(layout, x, output.loss, data_error is not None, self.stop.signum),
                           output.loss.detach().float().reshape(1)])
        reduced = self.accelerator.reduce(local, "sum")
        *flags, loss_sum = reduced[fired.numel() :].tolist()  # the step's one host transfer
        health = read_health(flags, self.source_names)
        self.step_loss = loss_sum / layout.data_parallel
        if not health.healthy:
            self._halt(step, health, data_error, batch)
        self.accelerator.backward(output.loss)  # under DeepSpeed this also steps the engine
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.dead.update(reduced[: fired.numel()] > 0, cfg.trainer.batch_size)
        self._report(step + 1, output, l1_coeff)
        self._after_step(step + 1, health)

    def _report(self, done: int, output, l1_coeff: float) -> None:  # noqa: ANN001
        """Metrics and decoder norms every log step; the progress line (main process) every step."""
        trainer_cfg = self.cfg.trainer
        if done % trainer_cfg.log_every == 0 or done == self.total_steps:
            metrics = step_metrics(self.accelerator, self.layout, output, l1_coeff, self.scheduler, self.dead,
                                    self.source_names, self.progress.tokens_per_second(done - self.first_step),
                                    self.firing)
            now, (window_started, window_waited) = time.perf_counter(), self._window
            # The share of loop time spent waiting on the activation stream (0 when data is never late).
            waited = self.stream.wait_seconds - window_waited
            metrics["data_wait_fraction"] = waited / max(now - window_started, 1e-9)
            self._window = (now, self.stream.wait_seconds)
            decoders = self.accelerator.unwrap_model(self.engine).decoder_parameters()
            with full_parameters(self.engine, decoders) as module:
                local_norms = module.decoder_norms().detach().cpu()
            decoder_norms = self.layout.assemble({"norms": local_norms}, {"norms": 1}).get("norms")  # [F, S], rank 0
            self.tracker.log(metrics, step=done)
            if decoder_norms is not None:
                self.tracker.log_decoder_norms(decoder_norms, self.source_names, step=done)
                self.tracker.log_firing_frequency(self.firing.frequency(), step=done, source_names=self.source_names)
            self.metrics = metrics
        shown = {"loss": self.step_loss}
        if self.metrics:  # quality figures from the last log step
            shown.update(ev=self.metrics["explained_variance/mean"], l0=self.metrics["l0"])
        self.progress.update(done - self.first_step, shown, force=done == self.total_steps)

    def _after_step(self, done: int, health: StepHealth) -> None:
        """Intermediate exports, a stop asked by a signal, periodic training states."""
        trainer_cfg, more = self.cfg.trainer, done < self.total_steps
        if trainer_cfg.checkpoint_every and done % trainer_cfg.checkpoint_every == 0 and more:
            self.export(done, self.output_dir / CHECKPOINTS_DIR / f"step_{done:07d}", aliases=[])
        if health.stop_signal is not None and more:
            raise TrainingInterrupted(done, self.save_state(done), health.stop_signal)
        if trainer_cfg.state_every and done % trainer_cfg.state_every == 0 and more:
            self.save_state(done)

    def _halt(self, step: int, health: StepHealth, data_error: Exception | None, batch: torch.Tensor) -> None:
        """Stop every rank together before the update of a step that met a fault; save what can resume."""
        if not health.data_failed:
            raise RunFault(nonfinite_message(health, step, self.cfg.crosscoder.normalize_inputs), self.last_state)
        if data_error is None:  # this rank's batch was fine: keep it for the resumed run
            self.stream.unread(batch, self.stream.last_token_ids)
        saved = step > self.first_step  # else the state resumed from (or nothing) is already this point
        state_dir = self.save_state(step) if saved else self.last_state
        where = f"; the training state of step {step} is saved in {state_dir}" if saved else ""
        if data_error is None:
            raise RunFault(f"another rank's activation stream failed at step {step}{where}", state_dir)
        status = EXIT_BAD_INPUT if isinstance(data_error, ConfigError) else EXIT_FAULT
        raise RunFault(f"{data_error} (at step {step}){where}", state_dir, status)

    # ---- what a run writes ---------------------------------------------------------------------------
    def save_state(self, step: int) -> Path:
        stream_scalars, stream_tensors = self.stream.full_state()
        trainer_state = {"scheduler": self.scheduler.state_dict(), "wandb_run_id": self.tracker.run_id,
                         "sources": [asdict(spec) for spec in self.sources.specs],
                         "input_scale": self.input_scale.tolist(), "zero_stage": self.zero_stage,
                         "config": self.run_config, "firing_tokens": self.firing.tokens}
        tensors = {**stream_tensors, **rng_tensors(), "tokens_since_fired": self.dead.tokens_since_fired,
                   "firing_counts": self.firing.counts}
        root = states_root(self.output_dir)
        with writing("the training state", root / TRAINING_STATE_PATTERN.format(step=step), self.last_state,
                     _last_state_hint(self.last_state)):
            path = save_training_state(self.accelerator, self.engine, root, step, trainer_state, stream_scalars,
                                       tensors, self.cfg.trainer.keep_states)
        self.log(f"saved training state at step {step} to {path}")
        self.last_state = path
        return path

    def export(self, step: int, out_dir: Path, aliases: list[str]) -> Path:
        state_dict = full_state_dict(self.accelerator, self.engine, self.layout)  # whole only on rank 0
        positions = gather_object([self.stream.state_dict()])  # collective too: where each rank's stream stands
        if self.is_main and self.per_dictionary:
            self._export_stack(state_dict, step, out_dir, aliases)
        elif self.is_main:
            meta = _dictionary_meta(self.sources.specs, self.sources, self.cfg, self.aux_k, step, self.run_config)
            with writing("the dictionary", out_dir, self.last_state, _last_state_hint(self.last_state)):
                export_dictionary(state_dict, meta, out_dir,
                                  extra_files={STREAM_POSITION_FILE: json.dumps(positions, indent=2)},
                                  firing_frequency=self.firing.frequency() if self.firing.tokens else None)
            self.eval_metrics = self._evaluate(out_dir, step)  # before the analysis, which reports its eval.json
            if self.cfg.tracking.log_analysis and self.analyze is not None:  # before the artifact: the report
                self.tracker.log_analysis(self.analyze(out_dir, self.dead.dead_mask.cpu()), step)  # travels with it
            self.tracker.log_dictionary(out_dir, step, {"train_step": step, "tokens_seen": meta.tokens_seen}, aliases)
            self.log(f"exported dictionary at step {step} to {out_dir}")
        self.accelerator.wait_for_everyone()
        return out_dir

    def _export_stack(self, state_dict: dict[str, torch.Tensor], step: int, out_dir: Path, aliases: list[str]) -> None:
        """Main process: one dictionary per snapshot and the stack manifest (dictionary.stack), one W&B artifact.
        Its latents are unaligned: the analysis waits for crosscoder-match, and the spliced-in evaluation reads
        crosscoders only for now."""
        specs = self.sources.specs
        metas = [_dictionary_meta([spec], self.sources, self.cfg, self.aux_k, step, self.run_config) for spec in specs]
        frequencies = list(self.firing.frequency()) if self.firing.tokens else None  # [F] per dictionary
        manifest = independent_manifest(self.sources, step)
        with writing("the stack", out_dir, self.last_state, _last_state_hint(self.last_state)):
            export_stack(split_dictionary_states(state_dict, len(specs)), metas, out_dir, manifest, frequencies)
        self.tracker.log_dictionary(out_dir, step, {"train_step": step, "method": manifest.method,
                                                    "tokens_seen": step * self.cfg.trainer.batch_size}, aliases,
                                    kind="stack")
        self.log(f"exported a stack of {len(specs)} dictionaries at step {step} to {out_dir} (unaligned: "
                 f"crosscoder-match {out_dir} aligns them)")

    def _evaluate(self, out_dir: Path, step: int) -> dict[str, float]:
        """Main process only, outside the training step: the spliced-in LM loss of an export (eval.json in it, the
        figures to W&B). The other ranks wait at the export's barrier meanwhile (seconds for the default tokens)."""
        trainer_cfg, sources_cfg = self.cfg.trainer, self.cfg.sources
        if not trainer_cfg.eval_tokens or sources_cfg.kind not in MODEL_KINDS:  # planted: no LM
            return {}
        metrics = export_eval(out_dir, trainer_cfg.eval_tokens, resolve_worker_device(self.cfg.data.workers.device),
                              self.log)
        if metrics:
            self.tracker.log(metrics, step=step)
        return metrics

    def _finish(self, started: float, loop_started: float, waited_before: float) -> TrainResult:
        total_steps, batch_size, layout = self.total_steps, self.cfg.trainer.batch_size, self.layout
        dictionary_dir = self.export(total_steps, self.output_dir / DICTIONARY_DIR, aliases=["latest"])
        loaded = gather_object([self.stream.snapshots_loaded])  # what each rank's workers actually loaded
        wall = time.perf_counter() - started
        loop_seconds = time.perf_counter() - loop_started
        summary = {
            **self.metrics, **self.eval_metrics, "wall_seconds": wall, "steps": total_steps,
            "loop_seconds": loop_seconds,
            "data_wait_fraction_total": (self.stream.wait_seconds - waited_before) / max(loop_seconds, 1e-9),
            "tokens_seen": total_steps * batch_size, "dictionary_dir": str(dictionary_dir),
            "resumed_from_step": self.first_step, "wandb_run_dir": self.tracker.run_dir,
            "layout": {"data_parallel": layout.data_parallel, "snapshot_parallel": layout.snapshot_parallel,
                       "shares": [self.source_names[share.start : share.stop] for share in layout.shares]},
            "snapshots_loaded_per_rank": loaded,
        }
        if self.is_main:
            summary_file = self.output_dir / RUN_SUMMARY_FILE
            with writing("the run summary", summary_file):
                write_text_atomic(summary_file, json.dumps(summary, indent=2))
        self.tracker.finish(summary)
        self.log(f"done in {wall:.1f}s: dictionary in {dictionary_dir}")
        return TrainResult(self.output_dir, dictionary_dir, total_steps, total_steps * batch_size, wall, self.metrics)

    def close(self) -> None:
        """Stop the workers and close the W&B run (not collective): after a normal finish only the workers are
        left; a stopped run is marked failed in W&B, with the cause."""
        if self.stream is not None:
            self.stream.close()
        if self.tracker is not None:
            stopped = self.stopped_by is not None
            self.tracker.finish({"stopped_by": self.stopped_by} if stopped else None, exit_code=1 if stopped else 0)


def _next_batch(stream: ActivationStream, shape: tuple[int, ...]) -> tuple[torch.Tensor, Exception | None]:
    """The stream's next batch, or zeros and the error when the stream failed (a dead worker, a corrupt shard):
    the rank still takes part in the step's collectives, whose health flags then stop every rank together."""
    try:
        return next(stream), None
    except (WorkerError, ConfigError) as error:
        return torch.zeros(shape), error


def _last_state_hint(last_state: Path | None) -> str:
    if last_state is None:
        return "; no training state had been saved yet"
    return f"; the last complete training state is {last_state}"


def _resumable_state(
    accelerator, resume: str, output_dir: Path, run_config: dict[str, Any], log: Callable[[str], None]  # noqa: ANN001
) -> TrainingState | None:
    path = select_training_state(accelerator, resume, states_root(output_dir), log)
    if path is None:
        return None
    resumed = load_training_state(path, accelerator.process_index, accelerator.num_processes)
    check_same_run(resumed.trainer["config"], run_config, path)
    check_same_zero_stage(resumed.trainer["zero_stage"], accelerator.state.deepspeed_plugin.zero_stage, path)
    return resumed


def _dictionary_meta(
    specs: list, sources: SourceInfo, cfg: RunConfig, aux_k: int, step: int, run_config: dict[str, Any]
) -> DictionaryMeta:
    """The config.json of a dictionary over `specs` (all the run's snapshots, or one of a stack's)."""
    crosscoder_cfg = cfg.crosscoder
    return DictionaryMeta(
        sources=[asdict(spec) for spec in specs], hook=sources.hook, d_model=sources.d_model,
        dict_size=crosscoder_cfg.dict_size, activation=crosscoder_cfg.activation, k=crosscoder_cfg.k,
        aux_k=aux_k, tokens_seen=step * cfg.trainer.batch_size, train_step=step,
        input_scale=[],  # filled in by export_dictionary from the model's buffer
        training=run_config, source_axis=sources.axis,
    )


def _check_enough_tokens(stream: ActivationStream, cfg: RunConfig, needed_per_rank: int) -> None:
    """A cache is finite: refuse up front a run it cannot feed, rather than stop half-way."""
    available = stream.available_tokens
    if available is None:
        return
    # The shuffle buffer can leave up to one batch unserved at the end of a finite stream.
    if available - stream.buffer.batch_size < needed_per_rank:
        raise ConfigError(
            f"data.cache.dir={cfg.data.cache.dir!r} holds {available} tokens for this rank, but "
            f"trainer.total_tokens={cfg.trainer.total_tokens} needs {needed_per_rank} per rank (+ one batch); "
            "build a larger cache (data.cache.tokens) or train on fewer tokens"
        )


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
