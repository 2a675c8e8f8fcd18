"""The training loop: paired activations in, a DeepSpeed-engine crosscoder step, metrics and exports out.

The loop reads a plain iterator of [batch, S_j, d] tensors; where they come from is the data package's concern,
how the model is sharded is `parallel`'s and `layout`'s (S_j: this rank's snapshots, all of them unless the
run is split by snapshot).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from omegaconf import OmegaConf

from crosscoder.analysis.planted import planted_recovery
from crosscoder.analysis.report import analyze_dictionary
from crosscoder.checkpoint import DictionaryMeta, export_dictionary, write_text_atomic
from crosscoder.config import ConfigError, RunConfig
from crosscoder.constants import (
    CHECKPOINTS_DIR,
    DICTIONARY_DIR,
    RUN_SUMMARY_FILE,
    STREAM_POSITION_FILE,
    TRAINING_STATE_PATTERN,
)
from crosscoder.data.stream import ActivationStream, build_activation_stream
from crosscoder.data.workers import WorkerError
from crosscoder.faults import (
    EXIT_BAD_INPUT,
    EXIT_FAULT,
    RunFault,
    StepHealth,
    local_health,
    nonfinite_message,
    read_health,
    writing,
)
from crosscoder.fingerprint import check_same_snapshots
from crosscoder.layout import Layout, build_layout, check_layout
from crosscoder.metrics import DeadLatentTracker, reconstruction_metrics
from crosscoder.model import Crosscoder, input_scale_from, mean_squared_norms
from crosscoder.parallel import (
    build_accelerator,
    ensure_process_group_env,
    full_parameters,
    full_state_dict,
    partitioned_init,
    teardown,
    with_model_parallel_unit,
)
from crosscoder.preemption import StopRequest, TrainingInterrupted
from crosscoder.sources import SourceInfo, describe_sources
from crosscoder.tracking import ProgressBar, Tracker
from crosscoder.training_state import (
    TrainingState,
    check_same_run,
    load_engine_state,
    load_training_state,
    restore_rng,
    resume_target,
    rng_tensors,
    save_training_state,
    select_training_state,
    states_root,
)


@dataclass
class TrainResult:
    output_dir: Path
    dictionary_dir: Path
    steps: int
    tokens_seen: int
    wall_seconds: float
    final_metrics: dict[str, Any]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last `decay_fraction` of training."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = int(total_steps * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return 1.0


def l1_coefficient(step: int, l1_coeff: float, warmup_steps: int) -> float:
    """lambda rises linearly from 0 so early training can find directions before being pushed to be sparse."""
    return l1_coeff * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else l1_coeff


def train(cfg: RunConfig) -> TrainResult:
    cfg.validate()
    started = time.perf_counter()
    trainer_cfg, crosscoder_cfg = cfg.trainer, cfg.crosscoder

    # DeepSpeed needs the per-rank micro batch in its config, before the process group is up: read the
    # world size from the launcher's environment. The ranks of one snapshot group share their tokens, so the
    # global batch is split over the data-parallel ranks only.
    ensure_process_group_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data_parallel = check_layout(world_size, cfg.parallel.snapshot_parallel, cfg.n_snapshots(), trainer_cfg.batch_size)
    micro_batch = trainer_cfg.batch_size // data_parallel
    accelerator = build_accelerator(cfg, micro_batch)
    state = PartialState()
    is_main = accelerator.is_main_process
    log = print if is_main else (lambda *_: None)
    tracker: Tracker | None = None
    stream: ActivationStream | None = None
    stop = StopRequest()
    stopped_by: str | None = None
    try:
        torch.manual_seed(trainer_cfg.seed)
        configured_dir, resume = resume_target(trainer_cfg.resume, Path(cfg.output_dir))
        output_dir = _shared_output_dir(str(configured_dir))
        if output_dir != Path(cfg.output_dir).resolve():
            log(f"continuing the run in {output_dir}")
        run_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        resumed = _resumable_state(accelerator, resume, output_dir, run_config, log)
        # Rank 0 first: it builds the embedded snapshots (or fills the hub cache) while the others wait.
        with accelerator.main_process_first():
            sources = describe_sources(cfg.sources, log=log)
        if resumed is not None:  # the same snapshot names may hold other weights now
            check_same_snapshots(resumed.trainer["sources"], sources.specs, f"the training state {resumed.path}")
        layout = build_layout(cfg.parallel.snapshot_parallel, len(sources.specs), cfg.parallel.sparse_topk_gradient)
        share = layout.share
        total_steps = trainer_cfg.total_tokens // trainer_cfg.batch_size
        stream = build_activation_stream(cfg, sources, layout.data_rank, layout.data_parallel, micro_batch, log=log,
                                         state=None if resumed is None else (resumed.rank, resumed.tensors),
                                         share=share)
        if resumed is None:
            _check_enough_tokens(stream, cfg, total_steps * micro_batch)

        zero_stage = accelerator.state.deepspeed_plugin.zero_stage
        with partitioned_init(accelerator, layout):  # ZeRO-3: no rank ever holds even its whole share
            model = Crosscoder(
                n_sources=len(sources.specs), d_model=sources.d_model, dict_size=crosscoder_cfg.dict_size,
                activation=crosscoder_cfg.activation, k=crosscoder_cfg.k, aux_k=crosscoder_cfg.aux_k,
                aux_coeff=crosscoder_cfg.aux_coeff, init_decoder_norm=crosscoder_cfg.init_decoder_norm,
                snapshot_share=share, reduction=layout.reduction,
            )
        input_scale = _input_scale(cfg, accelerator, layout, stream, sources, resumed, log)  # every snapshot's
        model.set_input_scale(input_scale[share.start : share.stop])

        optimizer = torch.optim.Adam(model.parameters(), lr=trainer_cfg.lr, betas=tuple(trainer_cfg.adam_betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(step, total_steps, trainer_cfg.lr_warmup_steps, trainer_cfg.lr_decay_fraction),
        )
        with with_model_parallel_unit(layout):  # ZeRO over the data group only
            engine, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        param_dtype = next(engine.parameters()).dtype
        dead = DeadLatentTracker(crosscoder_cfg.dict_size, crosscoder_cfg.dead_after_tokens, accelerator.device)
        first_step = 0
        if resumed is not None:
            load_engine_state(engine, resumed.path)
            scheduler.load_state_dict(resumed.trainer["scheduler"])
            dead.tokens_since_fired.copy_(resumed.tensors["tokens_since_fired"])
            restore_rng(resumed.tensors)
            first_step = resumed.step
            log(f"resumed from {resumed.path} at step {first_step}")

        tracker = Tracker(cfg.tracking, run_config, output_dir, is_main,
                          resume_id=None if resumed is None else resumed.trainer.get("wandb_run_id"))
        progress = ProgressBar(total_steps - first_step, trainer_cfg.batch_size, enabled=is_main)
        source_names = [spec.name for spec in sources.specs]
        split = f" ({layout.describe()})" if layout.split else ""
        log(f"training {total_steps} steps of {trainer_cfg.batch_size} tokens on {state.num_processes} rank(s){split}, "
            f"ZeRO-{zero_stage}, output in {output_dir}")

        def export(step: int, out_dir: Path, aliases: list[str]) -> Path:
            state_dict = full_state_dict(accelerator, engine, layout)  # collective; whole only on rank 0
            positions = gather_object([stream.state_dict()])  # collective too: where each rank's stream stands
            if is_main:
                meta = _dictionary_meta(sources, cfg, model.aux_k, step, run_config)
                with writing("the dictionary", out_dir, last_state, _last_state_hint(last_state)):
                    export_dictionary(state_dict, meta, out_dir,
                                      extra_files={STREAM_POSITION_FILE: json.dumps(positions, indent=2)})
                if cfg.tracking.log_analysis:  # before the artifact, so the report travels with the dictionary
                    tracker.log_analysis(analyze_dictionary(out_dir, dead_mask=dead.dead_mask.cpu(),
                                                            recovery=planted_recovery(out_dir)), step)
                tracker.log_dictionary(out_dir, step, {"train_step": step, "tokens_seen": meta.tokens_seen},
                                       aliases)
                log(f"exported dictionary at step {step} to {out_dir}")
            accelerator.wait_for_everyone()
            return out_dir

        last_state = None if resumed is None else resumed.path  # where the run can resume from now

        def save_state(step: int) -> Path:
            nonlocal last_state
            stream_scalars, stream_tensors = stream.full_state()
            trainer_state = {"scheduler": scheduler.state_dict(), "wandb_run_id": tracker.run_id,
                             "sources": [asdict(spec) for spec in sources.specs],
                             "input_scale": input_scale.tolist(), "zero_stage": zero_stage,
                             "config": run_config}
            tensors = {**stream_tensors, **rng_tensors(), "tokens_since_fired": dead.tokens_since_fired}
            target = states_root(output_dir) / TRAINING_STATE_PATTERN.format(step=step)
            with writing("the training state", target, last_state, _last_state_hint(last_state)):
                path = save_training_state(accelerator, engine, states_root(output_dir), step, trainer_state,
                                           stream_scalars, tensors, trainer_cfg.keep_states)
            log(f"saved training state at step {step} to {path}")
            last_state = path
            return path

        def halt(step: int, health: StepHealth, data_error: Exception | None, batch: torch.Tensor) -> None:
            """Stop every rank together before the update of a step that met a fault; save what can resume."""
            if not health.data_failed:
                raise RunFault(nonfinite_message(health, step, crosscoder_cfg.normalize_inputs), last_state)
            if data_error is None:  # this rank's batch was fine: keep it for the resumed run
                stream.unread(batch, stream.last_token_ids)
            saved = step > first_step  # else the state resumed from (or nothing) is already this point
            state_dir = save_state(step) if saved else last_state
            where = f"; the training state of step {step} is saved in {state_dir}" if saved else ""
            if data_error is None:
                raise RunFault(f"another rank's activation stream failed at step {step}{where}", state_dir)
            status = EXIT_BAD_INPUT if isinstance(data_error, ConfigError) else EXIT_FAULT
            raise RunFault(f"{data_error} (at step {step}){where}", state_dir, status)

        metrics: dict[str, Any] = {}
        loop_started, waited_before = time.perf_counter(), stream.wait_seconds
        window_started, window_waited = loop_started, waited_before
        token_check_every = cfg.parallel.token_check_every
        batch_shape = (micro_batch, len(share), sources.d_model)
        for step in range(first_step, total_steps):
            batch, data_error = _next_batch(stream, batch_shape)
            x = batch.to(accelerator.device, dtype=param_dtype)
            if token_check_every and step % token_check_every == 0:  # snapshot groups pair the same tokens
                layout.check_same_tokens(None if data_error else stream.last_token_ids, step, accelerator.device)
            l1_coeff = l1_coefficient(step, crosscoder_cfg.l1_coeff, crosscoder_cfg.l1_warmup_steps)
            output = engine(x, l1_coeff, dead.dead_mask)
            # One reduction per step, before the update: which latents fired, and the health flags (NaN/inf in the
            # batch or the loss, a failed stream, a stop signal) that stop every rank together.
            local = torch.cat([(output.codes > 0).any(dim=0).float(),
                               local_health(layout, x, output.loss, data_error is not None, stop.signum)])
            reduced = accelerator.reduce(local, "sum")
            health = read_health(reduced[crosscoder_cfg.dict_size :], source_names)
            if not health.healthy:
                halt(step, health, data_error, batch)
            accelerator.backward(output.loss)  # under DeepSpeed this also steps the engine
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            dead.update(reduced[: crosscoder_cfg.dict_size] > 0, trainer_cfg.batch_size)
            done = step + 1
            if done % trainer_cfg.log_every == 0 or done == total_steps:
                metrics = _step_metrics(accelerator, layout, output, l1_coeff, scheduler, dead, source_names,
                                        progress.tokens_per_second(done - first_step))
                now = time.perf_counter()
                # The share of loop time spent waiting on the activation stream (0 when data is never late).
                metrics["data_wait_fraction"] = (stream.wait_seconds - window_waited) / max(now - window_started, 1e-9)
                window_started, window_waited = now, stream.wait_seconds
                with full_parameters(engine, [accelerator.unwrap_model(engine).W_dec]) as module:
                    local_norms = module.decoder_norms().detach().cpu()
                decoder_norms = layout.assemble({"norms": local_norms}, {"norms": 1}).get("norms")  # [F, S], rank 0
                tracker.log(metrics, step=done)
                if decoder_norms is not None:
                    tracker.log_decoder_norms(decoder_norms, source_names, step=done)
            shown = {"loss": output.loss.item()}
            if metrics:  # quality figures from the last log step
                shown.update(ev=metrics["explained_variance/mean"], l0=metrics["l0"])
            progress.update(done - first_step, shown, force=done == total_steps)
            if trainer_cfg.checkpoint_every and done % trainer_cfg.checkpoint_every == 0 and done < total_steps:
                export(done, output_dir / CHECKPOINTS_DIR / f"step_{done:07d}", aliases=[])
            if health.stop_signal is not None and done < total_steps:
                raise TrainingInterrupted(done, save_state(done), health.stop_signal)
            if trainer_cfg.state_every and done % trainer_cfg.state_every == 0 and done < total_steps:
                save_state(done)

        if first_step < total_steps:  # a full disk at the export must not lose the run: resuming re-exports
            save_state(total_steps)
        dictionary_dir = export(total_steps, output_dir / DICTIONARY_DIR, aliases=["latest"])
        loaded = gather_object([stream.snapshots_loaded])  # what each rank's workers actually loaded
        wall = time.perf_counter() - started
        loop_seconds = time.perf_counter() - loop_started
        summary = {**metrics, "wall_seconds": wall, "steps": total_steps, "loop_seconds": loop_seconds,
                   "data_wait_fraction_total": (stream.wait_seconds - waited_before) / max(loop_seconds, 1e-9),
                   "tokens_seen": total_steps * trainer_cfg.batch_size, "dictionary_dir": str(dictionary_dir),
                   "resumed_from_step": first_step, "wandb_run_dir": tracker.run_dir,
                   "layout": {"data_parallel": layout.data_parallel, "snapshot_parallel": layout.snapshot_parallel,
                              "shares": [source_names[share.start : share.stop] for share in layout.shares]},
                   "snapshots_loaded_per_rank": loaded}
        if is_main:
            with writing("the run summary", output_dir / RUN_SUMMARY_FILE):
                write_text_atomic(output_dir / RUN_SUMMARY_FILE, json.dumps(summary, indent=2))
        tracker.finish(summary)
        log(f"done in {wall:.1f}s: dictionary in {dictionary_dir}")
        return TrainResult(output_dir, dictionary_dir, total_steps, total_steps * trainer_cfg.batch_size, wall, metrics)
    except BaseException as error:
        stopped_by = f"{type(error).__name__}: {error}"
        raise
    finally:
        stop.restore()
        if stream is not None:
            stream.close()
        if tracker is not None:  # no-op after a normal finish; a stopped run is marked failed, with the cause
            tracker.finish({"stopped_by": stopped_by} if stopped_by else None, exit_code=1 if stopped_by else 0)
        teardown(accelerator)


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
    return resumed


def _input_scale(
    cfg: RunConfig, accelerator, layout: Layout, stream: ActivationStream, sources: SourceInfo,  # noqa: ANN001
    resumed: TrainingState | None, log: Callable[[str], None],
) -> torch.Tensor:
    """[S] c_s of every snapshot: the saved one when resuming, ones without normalisation, else estimated from
    the first batches. Mean squared norms, not scales, are averaged over the data ranks, so the result is the
    one-rank estimate; each rank measures its own snapshots, and summed over the world the others' are zeros."""
    if resumed is not None:
        return torch.tensor(resumed.trainer["input_scale"])
    if not cfg.crosscoder.normalize_inputs:
        return torch.ones(len(sources.specs))
    first = stream.peek(cfg.crosscoder.norm_estimation_batches)
    local = layout.scatter(mean_squared_norms(first)).to(accelerator.device)
    mean_sq = (accelerator.reduce(local, "sum") / layout.data_parallel).cpu()
    _check_measurable(mean_sq, cfg, sources)
    input_scale = input_scale_from(mean_sq, sources.d_model)
    scales = zip(sources.specs, input_scale.tolist(), strict=True)
    log("input scales: " + ", ".join(f"{spec.name}={value:.3g}" for spec, value in scales))
    return input_scale


def _check_measurable(mean_sq: torch.Tensor, cfg: RunConfig, sources: SourceInfo) -> None:
    """Refuse, naming the snapshot, activations whose scale cannot be measured: NaN/inf (bad weights, an
    overflow, a bad cache) or all zeros (a dead hook)."""
    for spec, value in zip(sources.specs, mean_sq.tolist(), strict=True):
        if math.isfinite(value) and value > 0:
            continue
        cause = "all-zero" if value == 0 else "NaN/inf"
        origin = f"the activation cache {cfg.data.cache.dir}" if cfg.data.cache.dir else "the snapshot's weights"
        raise ConfigError(
            f"snapshot {spec.name!r} gives {cause} activations at {sources.hook} in the first "
            f"{cfg.crosscoder.norm_estimation_batches} batches (mean squared norm {value}): check {origin}"
        )


def _dictionary_meta(
    sources: SourceInfo, cfg: RunConfig, aux_k: int, step: int, run_config: dict[str, Any]
) -> DictionaryMeta:
    crosscoder_cfg = cfg.crosscoder
    return DictionaryMeta(
        sources=[asdict(spec) for spec in sources.specs], hook=sources.hook, d_model=sources.d_model,
        dict_size=crosscoder_cfg.dict_size, activation=crosscoder_cfg.activation, k=crosscoder_cfg.k,
        aux_k=aux_k, tokens_seen=step * cfg.trainer.batch_size, train_step=step,
        input_scale=[],  # filled in by export_dictionary from the model's buffer
        training=run_config,
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


def _step_metrics(
    accelerator, layout: Layout, output, l1_coeff: float, scheduler, dead: DeadLatentTracker,  # noqa: ANN001
    source_names: list[str], tokens_per_second: float,
) -> dict[str, float]:
    """Loss parts and per-source quality, averaged over the data ranks. Split by snapshot, each rank's losses are
    its snapshots' share (summed over its group) and its per-source values sit in its own columns (zeros
    elsewhere), so one sum over the world divided by data_parallel gives them all; codes, and so L0, are the
    same on every rank of a group."""
    recon = reconstruction_metrics(output.normalized_input, output.normalized_reconstruction, output.codes)
    local = torch.cat([
        torch.stack([output.loss.detach(), output.mse_loss.detach(), output.sparsity_loss.detach(),
                     output.aux_loss.detach(), recon["l0"]]).float(),
        layout.scatter(recon["mse"].float()), layout.scatter(recon["explained_variance"].float()),
    ])
    summed = accelerator.reduce(local, "sum")
    values = (summed / layout.data_parallel).tolist()
    n = len(source_names)
    loss, mse_loss, sparsity_loss, aux_loss = values[:4]
    l0 = summed[4].item() / accelerator.num_processes
    mse, ev = values[5 : 5 + n], values[5 + n :]
    metrics = {
        "loss/total": loss, "loss/mse": mse_loss, "loss/sparsity": sparsity_loss, "loss/aux": aux_loss,
        "l0": l0, "dead_fraction": dead.dead_fraction, "lr": scheduler.get_last_lr()[0], "l1_coeff": l1_coeff,
        "tokens_per_second": tokens_per_second, "explained_variance/mean": sum(ev) / n,
    }
    for name, source_mse, source_ev in zip(source_names, mse, ev, strict=True):
        metrics[f"mse/{name}"] = source_mse
        metrics[f"explained_variance/{name}"] = source_ev
    return metrics
