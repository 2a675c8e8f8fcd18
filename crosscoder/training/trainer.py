"""The training loop: paired activations in, a DeepSpeed-engine crosscoder step, metrics and exports out (the
run's parts are assembled before it by crosscoder.training.build).

The loop reads a plain iterator of [batch, S_j, d] tensors; where they come from is the data package's concern,
how the model is sharded is `parallel`'s and `layout`'s (S_j: this rank's snapshots, all of them unless the
run is split by snapshot).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from crosscoder.config import RunConfig
from crosscoder.constants import (
    CHECKPOINTS_DIR,
    DICTIONARY_DIR,
    RUN_SUMMARY_FILE,
    STREAM_POSITION_FILE,
    TRAINING_STATE_PATTERN,
)
from crosscoder.data.checks import check_inputs
from crosscoder.data.kinds import count_sources
from crosscoder.data.stream import ActivationStream
from crosscoder.data.workers import resolve_worker_device
from crosscoder.dictionary.independent import split_dictionary_states
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary
from crosscoder.dictionary.stack import export_stack
from crosscoder.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAULT,
    ConfigError,
    RunFault,
    TrainingInterrupted,
    WorkerError,
    same_on_every_rank,
)
from crosscoder.parallel.engine import (
    build_accelerator,
    ensure_process_group_env,
    full_parameters,
    full_state_dict,
    teardown,
)
from crosscoder.parallel.layout import check_layout
from crosscoder.sources.spec import SourceInfo
from crosscoder.storage import write_text_atomic, writing
from crosscoder.training.build import AfterExport, RunAssembly
from crosscoder.training.health import StepHealth, local_health, nonfinite_message, read_health
from crosscoder.training.methods import (
    dead_mask_for,
    independent_manifest,
)
from crosscoder.training.metrics import (
    fired_latents,
    fired_per_snapshot,
    step_metrics,
)
from crosscoder.training.preemption import StopRequest
from crosscoder.training.schedules import l1_coefficient
from crosscoder.training.state import save_training_state, states_root
from crosscoder.training.tracking import RunContinuation, check_credentials


@dataclass
class TrainResult:
    output_dir: Path
    dictionary_dir: Path
    steps: int
    tokens_seen: int
    wall_seconds: float
    """This session's wall time (a resumed run's: since its resume)."""
    final_metrics: dict[str, Any]
    resumed_from_step: int = 0
    run_seconds: float | None = None
    """The run's wall time, all sessions together (None when a resumed state did not record its earlier time)."""

    def timing(self) -> str:
        """How long the run took, in words (a resumed run's names this session's share and the whole's)."""
        return timing_phrase(self.wall_seconds, self.resumed_from_step, self.steps, self.run_seconds)


def train(cfg: RunConfig, continuation: RunContinuation | None = None,
          after_export: AfterExport | None = None) -> TrainResult:
    """Train one crosscoder as the config says (every rank of a launch calls this); see `TrainingRun`.
    `continuation`: log into that W&B run after its steps (a chain of runs, crosscoder.training.sae_track).
    `after_export`: the spliced-in evaluation and the analysis of each export (None: neither; the entry point,
    crosscoder.cli.train, passes both)."""
    with same_on_every_rank():
        check_inputs(cfg)
        check_credentials(cfg.tracking)
    started = time.perf_counter()
    # DeepSpeed needs the per-rank micro batch in its config, before the process group is up: read the
    # world size from the launcher's environment. The ranks of one snapshot group share their tokens, so the
    # global batch is split over the data-parallel ranks only.
    ensure_process_group_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    with same_on_every_rank():
        data_parallel = check_layout(world_size, cfg.parallel.snapshot_parallel, count_sources(cfg.sources),
                                     cfg.trainer.batch_size)
    accelerator = build_accelerator(cfg, cfg.trainer.batch_size // data_parallel, data_parallel)
    stop = StopRequest()
    run = TrainingRun(cfg, accelerator, cfg.trainer.batch_size // data_parallel, stop, continuation, after_export)
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


class TrainingRun(RunAssembly):
    """One run on this rank, from start-up to the export: the stream, the engine, the tracker, and the training
    state it can resume from. Every method is collective (all ranks call it, in the same order) unless it says
    otherwise."""

    # ---- the loop ------------------------------------------------------------------------------------
    def train(self, started: float) -> TrainResult:
        self.state.session_started = started  # the run's time counts this session from its start-up
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
                                    self.source_names, self.progress.tokens_per_second(done),
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
        self.progress.update(done, shown, force=done == self.total_steps)

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
        """The engine's partitions and the run state (RunState.state_dict) at `step`, as a training state."""
        self.state.step = step
        saved = self.state.state_dict()
        root = states_root(self.output_dir)
        with writing("the training state", root / TRAINING_STATE_PATTERN.format(step=step), self.last_state,
                     _last_state_hint(self.last_state)):
            path = save_training_state(self.accelerator, self.engine, root, saved.step, saved.trainer, saved.rank,
                                       saved.tensors, self.cfg.trainer.keep_states)
        self.log(f"saved training state at step {step} to {path}")
        self.last_state = path
        return path

    def export(self, step: int, out_dir: Path, aliases: list[str]) -> Path:
        state_dict = full_state_dict(self.accelerator, self.engine, self.layout)  # whole only on rank 0
        positions = gather_object([self.stream.state_dict()])  # collective too: where each rank's stream stands
        if self.is_main and self.per_dictionary:
            self._export_stack(state_dict, step, out_dir, aliases, json.dumps(positions, indent=2))
        elif self.is_main:
            meta = _dictionary_meta(self.sources.specs, self.sources, self.cfg, self.aux_k, step, self.run_config)
            with writing("the dictionary", out_dir, self.last_state, _last_state_hint(self.last_state)):
                export_dictionary(state_dict, meta, out_dir,
                                  extra_files={STREAM_POSITION_FILE: json.dumps(positions, indent=2)},
                                  firing_frequency=self.firing.frequency() if self.firing.tokens else None)
            self.eval_metrics = self._evaluate(out_dir, step)  # before the analysis, which reports its eval.json
            analyze = self.after_export.analyze
            if self.cfg.tracking.log_analysis and analyze is not None:  # before the artifact: the report
                self.tracker.log_analysis(analyze(out_dir, self.dead.dead_mask.cpu()), step)  # travels with it
            self.tracker.log_dictionary(out_dir, step, {"train_step": step, "tokens_seen": meta.tokens_seen}, aliases)
            self.log(f"exported dictionary at step {step} to {out_dir}")
        self.accelerator.wait_for_everyone()
        return out_dir

    def _export_stack(self, state_dict: dict[str, torch.Tensor], step: int, out_dir: Path, aliases: list[str],
                      positions: str) -> None:
        """Main process: one dictionary per snapshot and the stack manifest (dictionary.stack), one W&B artifact,
        each dictionary evaluated spliced in on its own snapshot (eval.json in its folder). Its latents are
        unaligned: the analysis waits for crosscoder-match."""
        specs = self.sources.specs
        metas = [_dictionary_meta([spec], self.sources, self.cfg, self.aux_k, step, self.run_config) for spec in specs]
        frequencies = list(self.firing.frequency()) if self.firing.tokens else None  # [F] per dictionary
        manifest = independent_manifest(self.sources, step)
        with writing("the stack", out_dir, self.last_state, _last_state_hint(self.last_state)):
            export_stack(split_dictionary_states(state_dict, len(specs)), metas, out_dir, manifest, frequencies,
                         extra_files={STREAM_POSITION_FILE: positions})
        self.eval_metrics = {}
        for entry in manifest.entries:  # before the artifact, which then carries each eval.json
            self.eval_metrics.update(self._evaluate(out_dir / entry.dictionary, step))
        self.tracker.log_dictionary(out_dir, step, {"train_step": step, "method": manifest.method,
                                                    "tokens_seen": step * self.cfg.trainer.batch_size}, aliases,
                                    kind="stack")
        self.log(f"exported a stack of {len(specs)} dictionaries at step {step} to {out_dir} (unaligned: "
                 f"crosscoder-match {out_dir} aligns them)")

    def _evaluate(self, out_dir: Path, step: int) -> dict[str, float]:
        """Main process only, outside the training step: the spliced-in LM loss of an export (eval.json in it, the
        figures to W&B). The other ranks wait at the export's barrier meanwhile (seconds for the default tokens)."""
        trainer_cfg, sources_cfg, evaluate = self.cfg.trainer, self.cfg.sources, self.after_export.evaluate
        if evaluate is None or not trainer_cfg.eval_tokens or not sources_cfg.has_model():  # planted: no LM
            return {}
        metrics = evaluate(out_dir, trainer_cfg.eval_tokens, resolve_worker_device(self.cfg.data.workers.device),
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
        run_seconds = self.state.run_seconds()
        summary = {
            # wall_seconds is the run's cost (all its sessions; this session's alone when an earlier one's is
            # unknown): crosscoder-compare reads it
            **self.metrics, **self.eval_metrics, "wall_seconds": wall if run_seconds is None else run_seconds,
            "session_seconds": wall, "run_seconds_known": run_seconds is not None, "steps": total_steps,
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
        self.log(f"done: {timing_phrase(wall, self.first_step, total_steps, run_seconds)}; dictionary in "
                 f"{dictionary_dir}")
        return TrainResult(self.output_dir, dictionary_dir, total_steps, total_steps * batch_size, wall, self.metrics,
                           self.first_step, run_seconds)

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


def timing_phrase(session_seconds: float, resumed_from_step: int, total_steps: int,
                  run_seconds: float | None) -> str:
    """How long a run took, in words: a resumed run names its session's share and the whole run's time."""
    if resumed_from_step == 0:
        return f"{total_steps} steps in {session_seconds:.1f}s"
    whole = (f"{run_seconds:.1f}s in all" if run_seconds is not None
             else "the earlier sessions' time is unknown (their state predates run times)")
    return (f"{total_steps} steps; this session resumed at step {resumed_from_step} and trained "
            f"{total_steps - resumed_from_step} in {session_seconds:.1f}s, {whole}")
