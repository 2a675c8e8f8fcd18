"""Projected memory, traffic and throughput of the data x snapshot parallel layout, from formulas (no run).

    python bench/scale_plan.py                       # the two scenarios below, markdown tables
    python bench/scale_plan.py --efficiency 0.3 --inter-node-gbps 25

world = dp x sp. Rank r = i*sp + j has data index i and snapshot index j and owns the contiguous share S_j of the
S snapshots: its workers load only those snapshot models, it holds W_enc[S_j], W_dec[:, S_j], b_dec[S_j] and a
replicated b_enc, and ZeRO partitions over its data group (the ranks with the same j). Per step the snapshot
group all-reduces the partial pre-activations (forward) and their gradient (backward), [b, F] each, plus for
TopK/BatchTopK the per-latent decoder norm [F]. The data group reduces the gradients of the rank's parameters.

Everything here is a projection: step time = FLOP / (efficiency x peak) + bytes moved / link bandwidth, with no
overlap of communication and compute, ring collectives, and the bottleneck link of each group. The shares are
the trainer's own (`crosscoder.parallel.engine.layout.snapshot_shares`); other code imports the formula functions.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace

from crosscoder.parallel.layout import snapshot_shares
from crosscoder.parallel.memory import (  # noqa: F401 (bench/memory_bench.py reads them from here)
    BYTES_PER_PARAM,
    ELEMENT_BYTES,
    FP32_MASTER_COPY,
    MASTER_BYTES,
    PARTITIONED,
    PRECISIONS,
    crosscoder_params,
    zero_bytes_per_rank,
)

GB = 1e9  # decimal gigabytes, as GPU memory and link bandwidth are quoted


# --------------------------------------------------------------------------------------------- formulas
# crosscoder_params and zero_bytes_per_rank live in crosscoder.parallel.memory (the trainer's start-up memory
# check uses them too).


def snapshot_allreduce_bytes(micro_batch: int, dict_size: int, element_bytes: int, ranks_by_decoder_norm: bool,
                             snapshot_parallel: int, *, active_per_token: int | None = None,
                             aux_scalar: bool = False) -> int:
    """Message bytes per step per rank over the snapshot group: pre-activations and their gradient ([b, F]
    each), plus the fp32 per-latent decoder norm [F] when latents are ranked by it (TopK/BatchTopK).

    `active_per_token`: with the sparse TopK gradient (parallel.sparse_topk_gradient) the backward sums only the
    entries of d pre where some code is active, at most b x this many (k, plus aux_k while AuxK has dead
    latents), instead of b x F; the bound is reached when the AuxK latents differ from the selected ones.
    `aux_scalar`: AuxK with dead latents also sums one scalar (the residual variance over all snapshots)."""
    if snapshot_parallel == 1:
        return 0
    gradient = micro_batch * (dict_size if active_per_token is None else min(active_per_token, dict_size))
    return ((micro_batch * dict_size + gradient) * element_bytes + (4 * dict_size if ranks_by_decoder_norm else 0)
            + (element_bytes if aux_scalar else 0))


def data_parallel_grad_bytes(params: int, element_bytes: int, data_parallel: int) -> int:
    """Message bytes of the gradient reduction over the data group (the rank's whole gradient)."""
    return 0 if data_parallel == 1 else params * element_bytes


def ring_link_bytes(message_bytes: float, group_size: int, collective: str) -> float:
    """Bytes each rank sends over its link for a ring collective of `message_bytes` (the full tensor)."""
    if group_size == 1:
        return 0.0
    factor = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1}[collective]
    return factor * (group_size - 1) / group_size * message_bytes


def data_group_link_bytes(params: int, element_bytes: int, data_parallel: int, zero_stage: int) -> float:
    """Bytes each rank sends per step over the data group, as DeepSpeed does it by default (counted by
    bench/memory_bench.py with its comms logger): ZeRO-1/2 all-reduce the gradient bucket
    (zero_optimization.use_multi_rank_bucket_allreduce, on by default; each rank then keeps its partition) and
    all-gather the updated params; ZeRO-3 all-gathers the params in forward and again in backward, then
    reduce-scatters the gradients. Plain data parallel (stage 0) all-reduces the gradient."""
    message = data_parallel_grad_bytes(params, element_bytes, data_parallel)
    if zero_stage == 0:
        return ring_link_bytes(message, data_parallel, "all_reduce")
    if zero_stage == 3:
        return (ring_link_bytes(message, data_parallel, "reduce_scatter")
                + 2 * ring_link_bytes(message, data_parallel, "all_gather"))
    return ring_link_bytes(message, data_parallel, "all_reduce") + ring_link_bytes(message, data_parallel, "all_gather")


def group_is_intra_node(ranks: Sequence[int], gpus_per_node: int) -> bool:
    """Whether every rank of a process group sits on one node (ranks fill nodes in order)."""
    return len({rank // gpus_per_node for rank in ranks}) == 1


def snapshot_group(i: int, snapshot_parallel: int) -> list[int]:
    """The sp consecutive ranks i*sp .. i*sp+sp-1 that together hold all snapshots for data shard i."""
    return [i * snapshot_parallel + j for j in range(snapshot_parallel)]


def data_group(j: int, snapshot_parallel: int, data_parallel: int) -> list[int]:
    """The dp ranks holding snapshot share j (stride sp): the group ZeRO partitions over."""
    return [i * snapshot_parallel + j for i in range(data_parallel)]


# ----------------------------------------------------------------------------------------- model specs


@dataclass(frozen=True)
class BaseModel:
    """A GPT-NeoX snapshot, hooked at the residual stream entering block `hook_layer`."""

    name: str
    d_model: int
    n_layers: int
    vocab: int
    hook_layer: int
    context: int

    def params(self) -> int:
        """Parameters without the LM head: embedding + per block (QKV/out/MLP 12d^2, biases and norms 13d) + the
        final layer norm (2d), what transformers' AutoModel loads (the MLP is 4d wide)."""
        return self.vocab * self.d_model + self.n_layers * (12 * self.d_model**2 + 13 * self.d_model) + 2 * self.d_model

    def flop_per_token(self) -> float:
        """Forward FLOP per token up to the hook: dense 2*12d^2 per block plus attention 4*T*d per block."""
        return self.hook_layer * (2 * 12 * self.d_model**2 + 4 * self.context * self.d_model)


@dataclass(frozen=True)
class Hardware:
    peak_flops: float
    efficiency: float
    intra_node_bw: float  # bytes/s per GPU per direction (NVLink)
    inter_node_bw: float  # bytes/s per GPU per direction (network)
    gpus_per_node: int
    gpu_memory: float  # bytes


@dataclass(frozen=True)
class Run:
    model: BaseModel
    n_snapshots: int
    dict_size: int
    global_batch: int  # tokens per optimizer step over all ranks
    precision: str
    zero_stage: int
    workers: int  # activation worker processes per rank, each loading the rank's snapshot models
    tokens: float
    ranks_by_decoder_norm: bool  # TopK / BatchTopK
    model_bytes: int  # bytes per parameter of a loaded snapshot model
    active_per_token: int | None = None  # TopK k: the sparse backward sums b x k entries of d pre (no dead latents)


# ---------------------------------------------------------------------------------------------- one layout


@dataclass(frozen=True)
class Projection:
    dp: int
    sp: int
    snapshots: int  # |S_j| of the largest share
    micro_batch: int
    models_bytes: float
    shard_params: int
    zero: dict[str, int]
    zero3_bytes: float  # crosscoder state under ZeRO-3, with the transient gathered full-precision copy
    activation_bytes: float
    flop_models: float  # per token per rank
    flop_crosscoder: float
    snapshot_message: int
    data_message: int
    snapshot_link: float
    data_link: float
    snapshot_intra: bool
    data_intra: bool
    compute_s: float
    comm_s: float

    @property
    def total_bytes(self) -> float:
        return self.models_bytes + sum(self.zero.values()) + self.activation_bytes

    @property
    def total_zero3_bytes(self) -> float:
        return self.models_bytes + self.zero3_bytes + self.activation_bytes

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s


def activation_bytes(micro_batch: int, snapshots: int, d_model: int, dict_size: int, element_bytes: int) -> int:
    """Input [b, |S_j|, d] fp32, ~4 [b, F] tensors (pre-activations, codes, their grads), ~3 [b, |S_j|, d] fp32
    reconstruction/error tensors."""
    return 4 * micro_batch * snapshots * d_model * 4 + 4 * micro_batch * dict_size * element_bytes


def project(run: Run, hw: Hardware, dp: int, sp: int) -> Projection:
    """Memory, traffic and step time of the busiest rank (the largest snapshot share) for layout dp x sp."""
    model, e = run.model, ELEMENT_BYTES[run.precision]
    snapshots = len(snapshot_shares(run.n_snapshots, sp)[0])
    b = run.global_batch // dp
    shard = crosscoder_params(snapshots, model.d_model, run.dict_size)
    zero3 = zero_bytes_per_rank(shard, dp, 3, run.precision)
    snap_msg = snapshot_allreduce_bytes(b, run.dict_size, e, run.ranks_by_decoder_norm, sp,
                                        active_per_token=run.active_per_token)
    data_msg = data_parallel_grad_bytes(shard, e, dp)
    snap_link = ring_link_bytes(snap_msg, sp, "all_reduce")
    data_link = data_group_link_bytes(shard, e, dp, run.zero_stage)
    snap_intra = group_is_intra_node(snapshot_group(0, sp), hw.gpus_per_node)
    data_intra = group_is_intra_node(data_group(0, sp, dp), hw.gpus_per_node)
    flop_models = snapshots * model.flop_per_token()
    flop_cc = 10 * snapshots * model.d_model * run.dict_size  # enc fwd, dec fwd, dec grad, code grad, enc grad
    return Projection(
        dp=dp, sp=sp, snapshots=snapshots, micro_batch=b,
        models_bytes=run.workers * snapshots * model.params() * run.model_bytes,
        shard_params=shard,
        zero=zero_bytes_per_rank(shard, dp, run.zero_stage, run.precision),
        zero3_bytes=sum(zero3.values()) + shard * e,  # + the params gathered for forward/backward
        activation_bytes=activation_bytes(b, snapshots, model.d_model, run.dict_size, e),
        flop_models=flop_models, flop_crosscoder=flop_cc,
        snapshot_message=snap_msg, data_message=data_msg, snapshot_link=snap_link, data_link=data_link,
        snapshot_intra=snap_intra, data_intra=data_intra,
        compute_s=b * (flop_models + flop_cc) / (hw.efficiency * hw.peak_flops),
        comm_s=(snap_link / (hw.intra_node_bw if snap_intra else hw.inter_node_bw)
                + data_link / (hw.intra_node_bw if data_intra else hw.inter_node_bw)),
    )


# ------------------------------------------------------------------------------------------------ printing


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def _link(n: float, intra: bool) -> str:
    return "-" if n == 0 else f"{n / GB:.3f} ({'NVLink' if intra else 'inter-node'})"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def memory_table(projections: Sequence[Projection], run: Run, hw: Hardware) -> str:
    def fits(n: float) -> str:
        return "yes" if n <= hw.gpu_memory else "**no**"

    z = f"ZeRO-{run.zero_stage}"
    header = ["dp x sp", "snapshots/rank", "models in workers", "shard Psi_j", f"params {z}", f"grads {z}",
              f"optimizer {z}", "activations", f"total {z}", f"fits {hw.gpu_memory / GB:.0f} GB",
              "total ZeRO-3", "fits (ZeRO-3)"]
    rows = [[f"{p.dp} x {p.sp}", str(p.snapshots), _gb(p.models_bytes), f"{p.shard_params / 1e9:.3f} B",
             _gb(p.zero["params"]), _gb(p.zero["grads"]), _gb(p.zero["optimizer"]), _gb(p.activation_bytes),
             _gb(p.total_bytes), fits(p.total_bytes), _gb(p.total_zero3_bytes), fits(p.total_zero3_bytes)]
            for p in projections]
    return _table(header, rows)


def speed_table(projections: Sequence[Projection], run: Run) -> str:
    header = ["dp x sp", "b tokens/rank", "GFLOP/token models", "GFLOP/token crosscoder",
              "snapshot all-reduce msg GB", "sent/rank GB (link)", "data grad msg GB", "sent/rank GB (link)",
              "compute ms", "comm ms", "tokens/s", f"wall-clock {run.tokens / 1e6:.0f}M"]
    rows = []
    for p in projections:
        tokens_per_s = run.global_batch / p.step_s
        rows.append([f"{p.dp} x {p.sp}", str(p.micro_batch), f"{p.flop_models / 1e9:.2f}",
                     f"{p.flop_crosscoder / 1e9:.2f}", _gb(p.snapshot_message),
                     _link(p.snapshot_link, p.snapshot_intra), _gb(p.data_message), _link(p.data_link, p.data_intra),
                     f"{p.compute_s * 1e3:.1f}", f"{p.comm_s * 1e3:.1f}", f"{tokens_per_s:,.0f}",
                     _hours(run.tokens / tokens_per_s)])
    return _table(header, rows)


def scenario(title: str, run: Run, hw: Hardware, layouts: Sequence[tuple[int, int]],
             today: tuple[int, int] | None) -> str:
    """Both tables for `layouts`, plus today's sp=1 layout as a one-line memory table when it is not listed."""
    m = run.model
    projections = [project(run, hw, dp, sp) for dp, sp in layouts]
    parts = [f"## {title}",
             f"{m.name} (d={m.d_model}, {m.n_layers} layers, vocab {m.vocab}, hook layer {m.hook_layer}, T={m.context},"
             f" {m.params() / 1e6:.1f}M params without LM head) x {run.n_snapshots} snapshots, F={run.dict_size:,};"
             f" {run.precision}, ZeRO-{run.zero_stage}, global batch {run.global_batch} tokens,"
             f" {run.workers} worker(s)/rank, no activation cache. Memory in GB (1e9 bytes), per GPU, busiest rank.",
             "", memory_table(projections, run, hw), "", speed_table(projections, run)]
    if today in layouts:
        parts += ["", f"Today's code (sp=1) is the {today[0]} x 1 row: every rank loads all {run.n_snapshots} models."]
    elif today is not None:
        parts += ["", f"Today's code (sp=1: every rank loads all {run.n_snapshots} models and the whole crosscoder):",
                  "", memory_table([project(run, hw, *today)], run, hw)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ CLI


PYTHIA_160M = BaseModel("Pythia-160M-deduped", d_model=768, n_layers=12, vocab=50304, hook_layer=4, context=2048)
PYTHIA_6_9B = BaseModel("Pythia-6.9B-deduped", d_model=4096, n_layers=32, vocab=50432, hook_layer=16, context=2048)


def _layouts(world: int, sps: Sequence[int], n_snapshots: int) -> list[tuple[int, int]]:
    return [(world // sp, sp) for sp in sps if sp <= min(world, n_snapshots) and world % sp == 0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--peak-flops", type=float, default=989e12, help="per-GPU peak FLOP/s (H100 SXM bf16 dense)")
    add("--efficiency", type=float, default=0.4, help="achieved fraction of peak (eta)")
    add("--intra-node-gbps", type=float, default=450.0, help="NVLink GB/s per GPU per direction")
    add("--inter-node-gbps", type=float, default=50.0, help="inter-node GB/s per GPU per direction")
    add("--gpus-per-node", type=int, default=8)
    add("--gpu-memory-gb", type=float, default=80.0)
    add("--global-batch", type=int, default=4096, help="tokens per optimizer step, all ranks")
    add("--tokens", type=float, default=800e6)
    add("--workers", type=int, default=1, help="activation workers per rank (each loads the rank's models)")
    add("--precision", choices=PRECISIONS, default="bf16")
    add("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    add("--crosscoder", choices=("relu", "topk", "batchtopk"), default="batchtopk",
        help="topk/batchtopk also all-reduce the per-latent decoder norm [F]")
    add("--k", type=int, default=64, help="topk/batchtopk: active latents per token (the sparse backward's entries)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    hw = Hardware(peak_flops=args.peak_flops, efficiency=args.efficiency, intra_node_bw=args.intra_node_gbps * GB,
                  inter_node_bw=args.inter_node_gbps * GB, gpus_per_node=args.gpus_per_node,
                  gpu_memory=args.gpu_memory_gb * GB)
    small = Run(model=PYTHIA_160M, n_snapshots=32, dict_size=24_576, global_batch=args.global_batch,
                precision=args.precision, zero_stage=args.zero_stage, workers=args.workers, tokens=args.tokens,
                ranks_by_decoder_norm=args.crosscoder != "relu", model_bytes=ELEMENT_BYTES[args.precision],
                active_per_token=None if args.crosscoder == "relu" else args.k)
    large = replace(small, model=PYTHIA_6_9B, dict_size=32_768)
    print("# Snapshot-parallel scale plan: projections from formulas, not measurements\n")
    print(f"Assumed: peak {hw.peak_flops / 1e12:.0f} TFLOP/s per GPU at efficiency eta={hw.efficiency}; NVLink "
          f"{args.intra_node_gbps:.0f} GB/s, inter-node {args.inter_node_gbps:.0f} GB/s per GPU per direction; "
          f"{hw.gpus_per_node} GPUs/node; crosscoder={args.crosscoder}"
          f"{'' if args.crosscoder == 'relu' else f' k={args.k} (sparse backward, no dead latents)'}. "
          "Step time = compute + communication (no "
          "overlap, ring collectives at the bottleneck link). Rank r = i*sp + j: a snapshot group is sp consecutive "
          "ranks, so when sp spans nodes the per-step snapshot all-reduce goes over the inter-node link. Not "
          "counted: CUDA context, allocator fragmentation, the snapshot models' transient forward activations.\n")
    print(scenario("(a) Pythia-160M x 32 snapshots, 8 GPUs (1 node)", small, hw,
                   _layouts(8, (1, 2, 4, 8), 32), today=(8, 1)))
    for nodes in (2, 4):
        world = nodes * hw.gpus_per_node
        print()
        print(scenario(f"(b) Pythia-6.9B x 32 snapshots, {world} GPUs ({nodes} nodes x {hw.gpus_per_node})",
                       large, hw, _layouts(world, (8, 16, 32), 32), today=(world, 1)))


if __name__ == "__main__":
    main()
