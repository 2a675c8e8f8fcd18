"""The parallelism plan: accelerate + DeepSpeed set-up, kept apart from the model and from the loop.

Under `accelerate launch` the launcher provides the process group; started as a plain script (the embedded
default) we make a one-rank group ourselves, so the same DeepSpeed engine path runs everywhere. The 2-D
(data x snapshot) layout lives in `crosscoder.parallel.layout`; this module hands it to DeepSpeed.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from crosscoder.config import RunConfig
from crosscoder.dictionary.crosscoder import SNAPSHOT_DIMS
from crosscoder.errors import ConfigError
from crosscoder.parallel.layout import Layout, SnapshotParallelUnit

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def free_port() -> int:
    """A TCP port nobody listens on now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_group_env() -> None:
    """Started without a launcher: describe a one-process group so DeepSpeed can initialise."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )


def slow_precision_warning(precision: str, device: torch.device) -> str | None:
    """A warning line when 16-bit training would run on a CPU without matrix units for it: there torch falls back
    to slow generic code (2-core AMD EPYC: bf16 and fp16 GEMMs at 0.3-1.3 GFLOP/s against 152-162 in float32)."""
    if device.type != "cpu" or precision == "fp32":
        return None
    supported = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
    if supported[precision]():
        return None
    return (f"warning: trainer.precision={precision} on a CPU without {precision} matrix units: its matmuls run "
            f"100-500x slower than in float32 (bench/RESULTS.md); use trainer.precision=fp32 on this machine")


def resolve_zero_stage(configured: int | None, data_parallel: int) -> int:
    """Hydra's `deepspeed.zero_stage` if set, else the accelerate launch config's (both set must agree), else 2
    over several data-parallel ranks and 0 over one: ZeRO shards over the data group only, so with one rank in
    it a stage above 0 shards nothing and only adds its gradient copies (bench/step_bench.py)."""
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    launcher_stage = int(launcher) if launcher is not None else None
    if configured is not None and launcher_stage is not None and configured != launcher_stage:
        raise ConfigError(
            f"deepspeed.zero_stage={configured} but the accelerate launch config sets zero_stage={launcher_stage}; "
            "drop one of them"
        )
    for stage in (configured, launcher_stage):
        if stage is not None:
            return stage
    return 2 if data_parallel > 1 else 0


def deepspeed_config(cfg: RunConfig, micro_batch_size: int, zero_stage: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run. The optimizer stays a torch one (no fused-Adam JIT build)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if cfg.deepspeed.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.deepspeed.offload_optimizer}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.trainer.precision == "bf16"},
        "fp16": {"enabled": cfg.trainer.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
    }
    if cfg.trainer.grad_clip > 0:
        config["gradient_clipping"] = cfg.trainer.grad_clip
    return _merged(config, cfg.deepspeed.extra)


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` laid over `base` key by key, so `zero_optimization: {reduce_bucket_size: ...}` keeps the stage."""
    merged = dict(base)
    for key, value in extra.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_dicts else value
    return merged


def build_accelerator(cfg: RunConfig, micro_batch_size: int, data_parallel: int):  # noqa: ANN201
    """An accelerate.Accelerator whose engine is DeepSpeed with the configured ZeRO stage (`resolve_zero_stage`)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    ensure_process_group_env()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    zero_stage = resolve_zero_stage(cfg.deepspeed.zero_stage, data_parallel)
    # The launcher's DeepSpeed fields are merged above; accelerate refuses a dict config while they are set.
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, micro_batch_size, zero_stage), zero_stage=zero_stage)
    # Without CUDA, accelerate must be told to use gloo, or it believes it has one process while DeepSpeed
    # sees all of them.
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(
        deepspeed_plugin=plugin,
        mixed_precision=MIXED_PRECISION[cfg.trainer.precision],
        kwargs_handlers=handlers,
        # Our schedule counts optimiser steps of the global batch. Linked to the optimizer, accelerate would step
        # it once per process per step: on N ranks warm-up and decay would run N times too fast.
        step_scheduler_with_optimizer=False,
    )


@contextlib.contextmanager
def full_parameters(model: nn.Module, only: list[nn.Parameter] | None = None, modify: bool = False
                    ) -> Iterator[nn.Module]:
    """The unwrapped module with whole (un-partitioned) parameters (all, or `only` these), for reading weights
    outside forward (`modify`: rank 0's changes are kept, partitioned again). Collective under ZeRO-3."""
    module = getattr(model, "module", model)
    params = [p for p in (module.parameters() if only is None else only) if hasattr(p, "ds_id")]
    if not params:
        yield module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield module


def partitioned_init(accelerator, layout: Layout) -> contextlib.AbstractContextManager:  # noqa: ANN001
    """Under ZeRO-3, build the model inside deepspeed.zero.Init: each parameter is partitioned (over the data
    group) as soon as it is made, so no rank holds even its whole share of the crosscoder."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    if not layout.split:
        return deepspeed.zero.Init(config_dict_or_path=plugin.deepspeed_config)
    return deepspeed.zero.Init(config_dict_or_path=plugin.deepspeed_config, data_parallel_group=layout.data_group,
                               mpu=SnapshotParallelUnit(layout))


@contextlib.contextmanager
def with_model_parallel_unit(layout: Layout) -> Iterator[None]:
    """Inside, `accelerator.prepare` builds the DeepSpeed engine with this layout's model-parallel unit.

    accelerate 1.15 passes an `mpu` to deepspeed.initialize only for its Ulysses sequence parallelism (HF
    models); its `_prepare_deepspeed` looks `deepspeed.initialize` up when called, so we wrap that one call
    rather than copy accelerate's engine set-up. Everything else (config, optimizer and scheduler wrappers,
    save/load) stays accelerate's. With one snapshot rank there is nothing to pass."""
    if not layout.split:
        yield
        return
    import deepspeed

    original = deepspeed.initialize

    def initialize(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        kwargs.setdefault("mpu", SnapshotParallelUnit(layout))
        return original(*args, **kwargs)

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = original


def full_state_dict(accelerator, engine, layout: Layout) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The whole state dict with full-precision parameters on rank 0, {} elsewhere. Collective: every rank calls it.

    Parameters are gathered one at a time within each data group (the transient peak is the largest parameter,
    not the model); the data-index-0 rank of each snapshot share keeps its share, and rank 0 concatenates the
    shares in snapshot order. Under bf16/fp16 the module holds 16-bit copies; the fp32 master weights live
    (sharded) in the ZeRO optimizer, and those are what an exported dictionary should carry.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    keep = layout.data_rank == 0
    module = accelerator.unwrap_model(engine)
    state = {name: buffer.detach().cpu().clone() for name, buffer in module.named_buffers()} if keep else {}
    for name, param in module.named_parameters():
        master = safe_get_full_fp32_param(param)  # a collective under ZeRO; None without a ZeRO optimizer
        if master is None:
            with full_parameters(module, [param]):
                master = param.detach().float()
        if keep:
            state[name] = master.detach().cpu().clone()
    if module.dictionaries_per_snapshot:  # whole dictionaries per rank: named globally, nothing to concatenate
        return layout.merge(module.global_state(state) if keep else {})
    return layout.assemble(state, SNAPSHOT_DIMS)


def teardown(accelerator, synchronize: bool = False) -> None:  # noqa: ANN001
    """Leave the process clean for the next job of a Hydra multirun in the same process. `synchronize` (a run that
    finished on every rank): meet at a barrier first, so no rank takes its process groups down while a peer's
    last collective may still be in flight (a 4-rank CPU run once aborted in teardown under load); a failed run
    skips it, since a dead peer would hold the others there until the gloo timeout."""
    import gc

    import deepspeed.comm
    import deepspeed.utils.groups
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState, PartialState

    initialized = dist.is_available() and dist.is_initialized()
    if synchronize and initialized:
        dist.barrier()
    accelerator.free_memory()  # destroys the DeepSpeed engine, which still needs the process group
    if initialized:
        # Through DeepSpeed, so it also forgets its cached groups (the next job makes new ones).
        deepspeed.comm.destroy_process_group()
        gc.collect()  # the groups' last references go now, not in the interpreter's shutdown
    deepspeed.utils.groups.mpu = None  # DeepSpeed keeps the last engine's model-parallel unit module-wide
    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()
