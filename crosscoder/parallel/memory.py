"""What one rank holds for the crosscoder's training state: parameters, gradients and Adam's state under a ZeRO
stage, from formulas that bench/memory_bench.py checks against measured allocations. bench/scale_plan.py projects
layouts with them; the trainer refuses at start-up a dictionary whose state cannot fit the rank's device."""

from __future__ import annotations

import os

import torch

from crosscoder.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}
# Bytes per parameter held before ZeRO partitioning: (params, grads, optimizer). bf16 keeps an fp32 master
# plus two fp32 Adam moments (12). In fp32 DeepSpeed's ZeRO-1/2 optimizer still keeps its own fp32 copy of the
# flat partition as the master (12, measured by bench/memory_bench.py: 12 Psi/N); ZeRO-3 (its partition is its
# own master) and plain Adam (stage 0) update the parameters themselves, so the optimizer is the 2 moments (8).
BYTES_PER_PARAM = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
FP32_MASTER_COPY = {0: False, 1: True, 2: True, 3: False}
MASTER_BYTES = 4
# Which of (params, grads, optimizer) each ZeRO stage partitions over the data group.
PARTITIONED = {0: (False, False, False), 1: (False, False, True), 2: (False, True, True), 3: (True, True, True)}


def crosscoder_params(n_snapshots: int, d_model: int, dict_size: int) -> int:
    """Psi for `n_snapshots` snapshots: W_enc + W_dec (S*d*F each), b_enc [F], b_dec [S, d]."""
    return 2 * n_snapshots * d_model * dict_size + dict_size + n_snapshots * d_model


def zero_bytes_per_rank(params: int, data_parallel: int, zero_stage: int, precision: str) -> dict[str, int]:
    """Bytes of params / grads / optimizer state one rank holds for `params` parameters under a ZeRO stage
    (`precision` fp16 counts as bf16: both 2 bytes).

    Partitions are ceil(params / dp) long (DeepSpeed pads the flat buffer to a multiple of dp). ZeRO-1 holds
    all the gradients until the step boundary. Not counted: DeepSpeed's gradient reduction bucket
    (reduce_bucket_size elements, 5e8 by default, allocated whatever the model's size), where ZeRO-2/3 hold every
    gradient not yet reduced: all of them, on top of the partition, while params < reduce_bucket_size
    (bench/memory_bench.py measures both)."""
    precision = "bf16" if precision == "fp16" else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if zero_stage not in PARTITIONED:
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if data_parallel < 1:
        raise ValueError(f"data_parallel must be >= 1, got {data_parallel}")
    shard = -(-params // data_parallel)
    held = [shard if part else params for part in PARTITIONED[zero_stage]]
    per_param = BYTES_PER_PARAM[precision]
    if precision == "fp32" and FP32_MASTER_COPY[zero_stage]:
        per_param = (per_param[0], per_param[1], per_param[2] + MASTER_BYTES)
    return {key: n * b for key, n, b in zip(("params", "grads", "optimizer"), held, per_param, strict=True)}


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes one rank can use on `device`, what that is): a GPU's total memory; on the CPU the machine's
    physical memory shared by the ranks on this node (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return properties.total_memory, f"{device} ({properties.name}) has {properties.total_memory / 2**30:.1f} GiB"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    shared = f", shared by {ranks} ranks" if ranks > 1 else ""
    return total // ranks, f"this machine has {total / 2**30:.1f} GiB of memory{shared}"


def check_state_fits(n_sources: int, d_model: int, dict_size: int, data_parallel: int, zero_stage: int,
                     precision: str, device: torch.device, snapshot_models: tuple[int, str] | None = None) -> None:
    """Refuse at start-up, before anything is allocated, a dictionary whose weights, gradients and Adam state
    (a lower bound: activations and buffers come on top), with the snapshot models the rank's activation workers
    load on the same device (`snapshot_models`: bytes, and what they are), exceed this rank's memory."""
    params = crosscoder_params(n_sources, d_model, dict_size)
    held = sum(zero_bytes_per_rank(params, data_parallel, zero_stage, precision).values())
    available, what = device_memory(device)
    models, models_what = snapshot_models or (0, "")
    if held <= available < held + models:
        raise ConfigError(
            f"the crosscoder's state ({held / 2**30:.2f} GiB per rank) and {models_what} ({models / 2**30:.2f} GiB) "
            f"do not fit: {what}; lower data.workers.num_workers, run the workers elsewhere (data.workers.device), "
            "spread the snapshots over more ranks (parallel.snapshot_parallel) or read an activation cache "
            "(data.cache.dir)")
    if held > available:
        raise ConfigError(
            f"crosscoder.dict_size={dict_size} over this rank's {n_sources} sources of width {d_model} is "
            f"{params:,} parameters: their weights, gradients and Adam state need {held / 2**30:.1f} GiB per rank "
            f"(ZeRO-{zero_stage} over {data_parallel} data-parallel rank(s), {precision}), but {what}; lower "
            "crosscoder.dict_size, or spread the state over more ranks (deepspeed=zero3, more GPUs, "
            "parallel.snapshot_parallel)")
