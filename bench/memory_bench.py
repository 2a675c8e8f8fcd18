"""Per-rank memory and communication of the crosscoder under ZeRO-1/2/3 and the data x snapshot layout.

    python bench/memory_bench.py                        # layouts 1x1, 2x1, 1x2, 2x2 (dp x sp), ZeRO-1/2/3, fp32
    python bench/memory_bench.py --layouts 1x1,2x1      # the old table: 1 and 2 ranks, no snapshot split
    python bench/memory_bench.py --stages 2,3 --dict-size 4096 --no-models

The driver starts one `accelerate launch` (CPU, gloo) per layout. Its ranks run one job per ZeRO stage (relu),
plus, when the snapshots are split, one BatchTopK job, one after another in the same processes and torn down in
between as the jobs of a Hydra multirun are. Each job builds the crosscoder as the trainer does (check_layout,
build_accelerator, build_layout, the model inside partitioned_init, the engine prepared inside
with_model_parallel_unit), feeds it x [global batch / dp, |S_j|, d] (one draw per data shard, cut to the rank's
snapshots), runs one training step (forward, backward, step) and counts the distinct bytes each rank holds:

  parameters   the module's parameters (under ZeRO-3, this rank's partition)
  gradients    the larger of: the gradient values held just before ZeRO's end-of-backward reduction (in p.grad,
               in its reduction bucket, in reduced partitions), and the distinct gradient storages at the step
               (reduced partitions; [at step] in the table)
  optimizer    the fp32 master partition the optimizer updates, plus Adam's two moments
  bucket       the storage DeepSpeed allocates for its gradient reduction bucket: reduce_bucket_size elements
               (5e8 by default) whatever the model's size; on CPU only the touched part becomes resident, a GPU
               allocator reserves it whole. Not in the formula, not in the total.

against bench/scale_plan.py for rank (i, j): Psi_j = crosscoder_params(|S_j|, d, F) = 2 |S_j| d F + F + |S_j| d
parameters and zero_bytes_per_rank(Psi_j, dp, stage, "fp32") bytes (ZeRO partitions over the data group only);
`/(Psi/sp)` divides by the same formula for Psi/sp parameters (the ideal share, b_enc not replicated).

Per rank and step it also counts:
  snapshot group   layout.reduction.bytes_reduced across the step, against scale_plan.snapshot_allreduce_bytes;
                   a second step with every latent that did not fire in the first marked dead (AuxK)
  data group       DeepSpeed's comms logger (deepspeed.comm; the snapshot reduction uses torch.distributed and
                   is not in it): message bytes per collective, the gradient reduction against
                   scale_plan.data_parallel_grad_bytes, the ring link bytes against scale_plan.data_group_link_bytes
  snapshot models  the parameter bytes of the snapshots sources.models.load_runners loads for the rank's share
                   (what each activation worker loads; the embedded toy GPT-NeoX, d=64, built here in seconds),
                   against |S_j| x scale_plan.BaseModel.params() x 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_plan  # noqa: E402 (bench/ is not a package)

ELEMENT_BYTES = 4  # fp32
SMALL_MESSAGE = 1024  # data-group collectives of fewer bytes are bookkeeping (gradient norm, overflow checks)
GATHERS = ("all_gather_into_tensor", "all_gather", "broadcast")  # the logger's message: this rank's input
TOY = dict(hidden_size=64, num_layers=2, train_steps=7, snapshot_steps=list(range(8)))  # 8 snapshots
TOY_VOCAB = 512  # ToyLMConfig's default vocabulary
TOY_HOOK = "blocks.1.hook_resid_pre"


def _distinct_bytes(tensors: list) -> int:  # noqa: ANN001 (torch tensors)
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer are counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def _tensors_in(value: object) -> list:
    """Every tensor inside nested dicts / lists / tuples."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_in(item)]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors_in(item)]
    return []


def _gradient_bytes(zero: object, params: list) -> tuple[int, int]:
    """(gradient values held: in p.grad outside ZeRO's bucket, in the bucket, in reduced partitions; the bucket
    storage). ZeRO-1/2 point p.grad into the bucket; ZeRO-3 drops p.grad and the bucket counts its elements."""
    buckets = list(getattr(zero, "ipg_buckets", {}).values())
    bucket_storages = [t for bucket in buckets for t in _tensors_in(bucket.buffer)]
    in_bucket_storage = {t.untyped_storage().data_ptr() for t in bucket_storages}
    grads = [p.grad for p in params if p.grad is not None]
    loose = [g for g in grads if g.untyped_storage().data_ptr() not in in_bucket_storage]
    in_bucket = sum(g.numel() * g.element_size() for g in grads if g.untyped_storage().data_ptr() in in_bucket_storage)
    in_bucket = in_bucket or sum(bucket.elements for bucket in buckets) * ELEMENT_BYTES
    partitions = [*_tensors_in(getattr(zero, "averaged_gradients", None)), getattr(zero, "grads_in_partition", None),
                  getattr(zero, "grad_partitions_flat_buffer", None)]
    return _distinct_bytes(loose + partitions) + in_bucket, _distinct_bytes(bucket_storages)


def _model_bytes(args: argparse.Namespace, share: range) -> dict[str, int]:
    """Load the rank's share of the toy snapshots as an activation worker does; count their parameter bytes."""
    import torch

    from crosscoder.data.kinds import resolve_snapshots
    from crosscoder.sources.models import load_runners

    specs = resolve_snapshots(_toy_sources(args.toy_cache), log=lambda *_: None)  # the driver built them
    runners = load_runners(_toy_sources(args.toy_cache), specs[share.start : share.stop], torch.device("cpu"))
    return {"models": len(runners), "model_bytes": _distinct_bytes([p for r in runners for p in r.model.parameters()]),
            "one_model_params": sum(p.numel() for p in runners[0].model.parameters())}


def _toy_sources(cache_dir: str):  # noqa: ANN202 (crosscoder.config.SourcesConfig)
    from crosscoder.config import RunConfig

    sources = RunConfig().sources
    sources.kind, sources.hook, sources.toy.cache_dir = "toy", TOY_HOOK, cache_dir
    for key, value in TOY.items():
        setattr(sources.toy, key, value)
    return sources


def measure(args: argparse.Namespace) -> None:
    """One rank: the jobs in turn, then the snapshot models; one json per job (and one for the models)."""
    share = None
    ports = args.ports.split(",")
    for n, job in enumerate(args.jobs.split(",")):
        stage, _, activation = job.partition(":")
        # The launcher's ZeRO stage is the first job's; resolve_zero_stage refuses a configured one that differs.
        os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = stage
        if n:  # a fresh rendezvous: the launcher's store keeps the last group's keys, so rank 0 hosts a new one
            os.environ.update(MASTER_PORT=ports[n - 1], TORCHELASTIC_USE_AGENT_STORE="False")
        rank, row, share = measure_job(args, int(stage), activation)
        Path(args.out, f"rank{rank}-zero{stage}-{activation}.json").write_text(json.dumps(row))
    if args.models and share is not None:
        Path(args.out, f"models{rank}.json").write_text(json.dumps(_model_bytes(args, share)))


def measure_job(args: argparse.Namespace, stage: int, activation: str) -> tuple[int, dict, range]:
    """Build as the trainer does, train one step and count; one more step with the unfired latents dead."""
    import deepspeed.comm.comm as ds_comm
    import torch

    from crosscoder.config import RunConfig
    from crosscoder.dictionary.crosscoder import Crosscoder
    from crosscoder.parallel.engine import (
        build_accelerator,
        ensure_process_group_env,
        partitioned_init,
        teardown,
        with_model_parallel_unit,
    )
    from crosscoder.parallel.layout import build_layout, check_layout

    ensure_process_group_env()
    world_size = int(os.environ["WORLD_SIZE"])
    cfg = RunConfig(output_dir=args.out)
    cfg.deepspeed.zero_stage = stage
    cfg.deepspeed.extra = {"comms_logger": {"enabled": True, "prof_all": True}}
    cfg.parallel.snapshot_parallel = args.sp
    cfg.trainer.batch_size = args.batch
    cc = cfg.crosscoder
    cc.dict_size, cc.activation = args.dict_size, activation
    data_parallel = check_layout(world_size, args.sp, args.sources, args.batch)
    micro_batch = args.batch // data_parallel
    accelerator = build_accelerator(cfg, micro_batch, data_parallel)
    layout = build_layout(args.sp, args.sources, cfg.parallel.sparse_topk_gradient)
    share = layout.share
    torch.manual_seed(0)
    with partitioned_init(accelerator, layout):
        model = Crosscoder(n_sources=args.sources, d_model=args.d_model, dict_size=args.dict_size,
                           activation=activation, k=cc.k, aux_k=cc.aux_k, aux_coeff=cc.aux_coeff,
                           init_decoder_norm=cc.init_decoder_norm, snapshot_share=share, reduction=layout.reduction)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    aux_k = model.aux_k
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.trainer.lr, betas=tuple(cfg.trainer.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with with_model_parallel_unit(layout):
        engine, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    zero = engine.optimizer  # DeepSpeed's ZeRO optimizer around the torch Adam
    params = list(engine.module.parameters())
    generator = torch.Generator().manual_seed(1 + layout.data_rank)  # a snapshot group pairs the same tokens
    x = torch.randn(micro_batch, args.sources, args.d_model, generator=generator)[:, share.start : share.stop]
    x = x.contiguous()

    before_reduction: dict[str, int] = {}
    allreduce_gradients = engine.allreduce_gradients

    def count_then_reduce(*a: object, **kw: object) -> object:
        before_reduction["values"], before_reduction["bucket"] = _gradient_bytes(zero, params)
        return allreduce_gradients(*a, **kw)

    engine.allreduce_gradients = count_then_reduce
    logger = ds_comm.comms_logger
    logger.reset_data()
    reduced = layout.reduction.bytes_reduced
    output = engine(x, 1.0, None)
    engine.backward(output.loss)  # the engine's own: accelerator.backward also steps, freeing the gradients
    at_step, bucket_at_step = _gradient_bytes(zero, params)
    engine.step()
    snapshot_bytes = layout.reduction.bytes_reduced - reduced
    comms = {name: {int(size): record[0] for size, record in sizes.items()}
             for name, sizes in logger.get_raw_data().items()}
    param_bytes = _distinct_bytes([getattr(p, "ds_tensor", p) for p in params])
    masters = [p for group in zero.optimizer.param_groups for p in group["params"]]
    moments = [t for state in zero.optimizer.state.values() for key, t in state.items() if key != "step"]
    optimizer_bytes = _distinct_bytes(masters + moments)

    # The latents that did not fire are dead (the same on every rank of a snapshot group): TopK/BatchTopK add the
    # AuxK loss, its latents join the sparse gradient, and its residual variance is one more scalar.
    dead = ~(output.codes > 0).any(dim=0)
    reduced = layout.reduction.bytes_reduced
    output = engine(x, 1.0, dead)
    engine.backward(output.loss)
    engine.step()
    snapshot_bytes_dead = layout.reduction.bytes_reduced - reduced
    logger.reset_data()

    rank = accelerator.process_index
    row = {
        "rank": rank, "dp": data_parallel, "sp": args.sp, "i": layout.data_rank, "j": layout.snapshot_rank,
        "share": [share.start, share.stop], "stage": stage, "activation": activation, "micro_batch": micro_batch,
        "k": cc.k, "aux_k": aux_k, "sparse": cfg.parallel.sparse_topk_gradient, "dead": int(dead.sum()),
        "n_params": n_params, "param_bytes": param_bytes, "grad_bytes_before_reduction": before_reduction["values"],
        "grad_bytes_at_step": at_step, "bucket_bytes": max(before_reduction["bucket"], bucket_at_step),
        "optimizer_bytes": optimizer_bytes, "snapshot_bytes": snapshot_bytes,
        "snapshot_bytes_dead": snapshot_bytes_dead, "comms": comms,
    }
    engine.allreduce_gradients = allreduce_gradients
    teardown(accelerator)
    return rank, row, share


# ------------------------------------------------------------------------------------------------- driver


def _launch(args: argparse.Namespace, scratch: Path, dp: int, sp: int, jobs: list[tuple[int, str]],
            models: bool) -> tuple[list[dict], list[dict]]:
    """One `accelerate launch` of dp x sp ranks running `jobs` in turn: (job rows, model rows)."""
    from crosscoder.parallel.engine import free_port

    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = scratch / f"{dp}x{sp}"
    out.mkdir()
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(dp * sp),
        "--num_machines", "1", "--use_deepspeed", "--zero_stage", str(jobs[0][0]),
        "--main_process_port", str(free_port()), str(Path(__file__).resolve()), "--measure",
        "--jobs", ",".join(f"{stage}:{activation}" for stage, activation in jobs), "--sp", str(sp),
        "--ports", ",".join(str(free_port()) for _ in jobs[1:]),
        "--out", str(out), "--sources", str(args.sources), "--d-model", str(args.d_model),
        "--dict-size", str(args.dict_size), "--batch", str(args.batch), "--toy-cache", args.toy_cache,
        *(["--models"] if models else []),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"layout {dp}x{sp}, jobs {jobs} failed:\n{result.stderr[-6000:]}")
    rows = []
    for stage, activation in jobs:
        for rank in range(dp * sp):
            row = json.loads((out / f"rank{rank}-zero{stage}-{activation}.json").read_text())
            row["comms"] = {name: {int(size): n for size, n in sizes.items()} for name, sizes in row["comms"].items()}
            rows.append(row)
    shares = {row["rank"]: row["share"] for row in rows}
    model_rows = [{"rank": rank, "dp": dp, "sp": sp, "share": shares[rank],
                   **json.loads((out / f"models{rank}.json").read_text())} for rank in range(dp * sp) if models]
    return rows, model_rows


def _mib(n: float) -> str:
    return f"{n / 2**20:8.2f}"


def _psi_j(row: dict, args: argparse.Namespace) -> int:
    return scale_plan.crosscoder_params(row["share"][1] - row["share"][0], args.d_model, args.dict_size)


def _where(row: dict) -> str:
    start, stop = row["share"]
    return f"{row['dp']:>3} x {row['sp']:<1} {row['rank']:>4} ({row['i']},{row['j']}) {start}-{stop - 1}"


def memory_table(rows: list[dict], args: argparse.Namespace) -> list[str]:
    psi = scale_plan.crosscoder_params(args.sources, args.d_model, args.dict_size)
    lines = [
        f"crosscoder S={args.sources}, d={args.d_model}, F={args.dict_size}: Psi = {psi:,} parameters, fp32, global "
        f"batch {args.batch}. MiB held by each rank, measured (formula: scale_plan.zero_bytes_per_rank(Psi_j, dp, "
        "stage, 'fp32')); gradients at their peak, [at the step]; total/formula with the peak, [at the step]",
        f"{'ZeRO':>4} {'dp x sp':>7} {'rank (i,j)':>10} {'S_j':>3} {'Psi_j':>11}  {'parameters':>19}  "
        f"{'gradients':>19} {'[at step]':>10}  {'optimizer':>19}  {'total/formula':>13} {'[at step]':>9} "
        f"{'/(Psi/sp)':>9} {'bucket':>8}",
    ]
    for row in rows:
        psi_j = _psi_j(row, args)
        formula = scale_plan.zero_bytes_per_rank(psi_j, row["dp"], row["stage"], "fp32")
        ideal = scale_plan.zero_bytes_per_rank(-(-psi // row["sp"]), row["dp"], row["stage"], "fp32")
        grads = max(row["grad_bytes_before_reduction"], row["grad_bytes_at_step"])
        measured = {"params": row["param_bytes"], "grads": grads, "optimizer": row["optimizer_bytes"]}
        total = sum(measured.values())
        at_step = total - grads + row["grad_bytes_at_step"]
        cell = {key: f"{_mib(measured[key])} ({_mib(formula[key])})" for key in measured}
        lines.append(
            f"{row['stage']:>4} {_where(row)} {psi_j:>11,}  {cell['params']}  {cell['grads']} "
            f"[{_mib(row['grad_bytes_at_step'])}]  {cell['optimizer']}  {total / sum(formula.values()):>13.3f} "
            f"{at_step / sum(formula.values()):>9.3f} {total / sum(ideal.values()):>9.3f} {_mib(row['bucket_bytes'])}")
        if row["n_params"] != psi_j:
            lines.append(f"  !! rank {row['rank']} holds {row['n_params']:,} parameters, the formula {psi_j:,}")
    return lines


def snapshot_comm_table(rows: list[dict], args: argparse.Namespace) -> list[str]:
    from crosscoder.dictionary.families import family

    lines = ["snapshot-group all-reduce per rank per step: layout.reduction.bytes_reduced, measured (formula: "
             "scale_plan.snapshot_allreduce_bytes(b, F, 4, ranks_by_decoder_norm, sp, active_per_token=k "
             "[+ min(aux_k, dead)], aux_scalar=dead); for TopK an upper bound)",
             f"{'activation':>10} {'ZeRO':>4} {'dp x sp':>7} {'rank (i,j)':>10} {'S_j':>3} {'b':>4}  "
             f"{'no dead latents':>27}  {'dead':>5}  {'unfired latents dead':>27}  ratio"]
    shown: dict[tuple, tuple] = {}
    for row in rows:
        activation = family(row["activation"]).activation
        topk = activation.ranks_by_decoder_norm
        sparse = topk and row["sparse"]
        formula = scale_plan.snapshot_allreduce_bytes(row["micro_batch"], args.dict_size, ELEMENT_BYTES, topk,
                                                      row["sp"], active_per_token=row["k"] if sparse else None)
        dead = activation.uses_aux_loss and row["dead"] > 0
        formula_dead = scale_plan.snapshot_allreduce_bytes(
            row["micro_batch"], args.dict_size, ELEMENT_BYTES, topk, row["sp"],
            active_per_token=row["k"] + (min(row["aux_k"], row["dead"]) if dead else 0) if sparse else None,
            aux_scalar=dead)
        measured = (row["snapshot_bytes"], row["snapshot_bytes_dead"])
        key = (row["activation"], row["dp"], row["sp"], row["rank"])
        if key in shown and shown[key] == measured:  # the same on every ZeRO stage: one row
            continue
        shown[key] = measured
        ratio = f"{sum(measured) / (formula + formula_dead):5.3f}" if formula + formula_dead else "    -"
        lines.append(f"{row['activation']:>10} {row['stage']:>4} {_where(row)} {row['micro_batch']:>4}  "
                     f"{measured[0]:>13,} ({formula:>11,})  {row['dead']:>5}  "
                     f"{measured[1]:>13,} ({formula_dead:>11,})  {ratio}")
    return lines


def _op_link_bytes(name: str, size: int, group: int) -> float:
    """Bytes a rank sends for one ring collective whose logged message (the input tensor) is `size` bytes."""
    if name in GATHERS:
        return scale_plan.ring_link_bytes(size * group, group, "all_gather")
    if name.startswith("reduce_scatter"):
        return scale_plan.ring_link_bytes(size, group, "reduce_scatter")
    return scale_plan.ring_link_bytes(size, group, "all_reduce")


def data_comm_table(rows: list[dict], args: argparse.Namespace) -> list[str]:
    lines = ["data-group (ZeRO) collectives per rank in one step, DeepSpeed's comms logger: message bytes (the input "
             f"tensor) x count; under {SMALL_MESSAGE} B apart. Gradient reduction against "
             "scale_plan.data_parallel_grad_bytes(Psi_j, 4, dp); ring bytes sent per rank against "
             "scale_plan.data_group_link_bytes(Psi_j, 4, dp, stage)",
             f"{'ZeRO':>4} {'dp x sp':>7} {'rank (i,j)':>10} {'S_j':>3}  {'gradient reduction':>27} {'ratio':>5}  "
             f"{'sent':>21} {'ratio':>5}  {'small':>9}  collectives >= {SMALL_MESSAGE} B"]
    for row in rows:
        psi_j = _psi_j(row, args)
        grad = sent = small = small_count = 0
        ops = []
        for name, sizes in sorted(row["comms"].items()):
            for size, count in sorted(sizes.items()):
                if size < SMALL_MESSAGE:
                    small, small_count = small + size * count, small_count + count
                    continue
                ops.append(f"{name} {size:,} x{count}")
                sent += count * _op_link_bytes(name, size, row["dp"])
                if name not in GATHERS:
                    grad += size * count
        formula = scale_plan.data_parallel_grad_bytes(psi_j, ELEMENT_BYTES, row["dp"])
        link = scale_plan.data_group_link_bytes(psi_j, ELEMENT_BYTES, row["dp"], row["stage"])
        grad_ratio = f"{grad / formula:5.3f}" if formula else "    -"
        link_ratio = f"{sent / link:5.3f}" if link else "    -"
        lines.append(f"{row['stage']:>4} {_where(row)}  {grad:>11,} ({formula:>11,}) {grad_ratio}  "
                     f"{sent:>9,.0f} ({link:>9,.0f}) {link_ratio}  {small:>4} ({small_count:>2})  {'; '.join(ops)}")
    return lines


def model_table(rows: list[dict]) -> list[str]:
    toy = scale_plan.BaseModel("toy", d_model=TOY["hidden_size"], n_layers=TOY["num_layers"], vocab=TOY_VOCAB,
                               hook_layer=1, context=64)
    one = toy.params() * ELEMENT_BYTES
    lines = [f"snapshot models per activation worker: load_runners on the rank's share, toy GPT-NeoX "
             f"d={TOY['hidden_size']}, {TOY['num_layers']} blocks, vocab {TOY_VOCAB}, fp32; parameter bytes, measured "
             f"(formula |S_j| x scale_plan.BaseModel.params() x 4 = |S_j| x {one:,})",
             f"{'dp x sp':>7} {'rank':>4} {'S_j':>5} {'models':>6}  {'bytes':>21}  {'ratio':>5}  one model"]
    for row in rows:
        size = row["share"][1] - row["share"][0]
        lines.append(f"{row['dp']:>3} x {row['sp']:<1} {row['rank']:>4} {row['share'][0]:>3}-{row['share'][1] - 1} "
                     f"{row['models']:>6}  {row['model_bytes']:>9,} ({size * one:>9,})  "
                     f"{row['model_bytes'] / (size * one):5.3f}  {row['one_model_params']:,} parameters "
                     f"(formula {toy.params():,})")
    return lines


def drive(args: argparse.Namespace) -> None:
    from crosscoder.data.kinds import resolve_snapshots

    layouts = [tuple(int(n) for n in item.strip().split("x")) for item in args.layouts.split(",")]
    stages = [int(stage) for stage in args.stages.split(",")]
    started = time.perf_counter()
    rows: list[dict] = []
    model_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="crosscoder-memory-") as scratch:
        args.toy_cache = args.toy_cache or str(Path(scratch) / "toy")
        if not args.no_models:
            resolve_snapshots(_toy_sources(args.toy_cache), log=lambda *_: None)  # build once, ranks read it
        for dp, sp in layouts:
            jobs = [(stage, "relu") for stage in stages]
            if args.topk_stage and sp > 1:  # TopK/BatchTopK also all-reduce the latent weights [F], the AuxK scalar
                jobs.append((args.topk_stage, "batchtopk"))
            launched = time.perf_counter()
            job_rows, launched_models = _launch(args, Path(scratch), dp, sp, jobs, not args.no_models)
            print(f"  [{dp}x{sp}: {len(jobs)} job(s) in {time.perf_counter() - launched:.1f} s]", file=sys.stderr)
            rows += job_rows
            model_rows += launched_models
    relu = sorted((row for row in rows if row["activation"] == "relu"),
                  key=lambda row: (row["stage"], row["dp"] * row["sp"], row["sp"], row["rank"]))
    split = [row for row in rows if row["sp"] > 1]
    parts = [memory_table(relu, args), snapshot_comm_table(split, args) if split else ["(no sp > 1 layout)"],
             data_comm_table(relu, args)]
    if model_rows:
        parts.append(model_table(model_rows))
    print("\n\n".join("\n".join(part) for part in parts))
    print(f"\n{len(layouts)} launches, {sum(1 for _ in rows)} rank-jobs in {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=8, help="snapshots S")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=256, help="global batch (tokens per step over all ranks)")
    parser.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="dp x sp layouts, comma-separated")
    parser.add_argument("--stages", default="1,2,3", help="ZeRO stages, comma-separated")
    parser.add_argument("--topk-stage", type=int, default=2,
                        help="ZeRO stage of the extra BatchTopK job of sp > 1 layouts (0: none)")
    parser.add_argument("--no-models", action="store_true", help="skip loading the snapshot models")
    parser.add_argument("--toy-cache", default="", help="toy snapshot cache (default: a temporary one)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", default="2:relu", help=argparse.SUPPRESS)
    parser.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--ports", default="", help=argparse.SUPPRESS)
    parser.add_argument("--models", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    measure(args) if args.measure else drive(args)


if __name__ == "__main__":
    main()
