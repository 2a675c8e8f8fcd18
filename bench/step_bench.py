"""One crosscoder training step (forward + loss + backward + Adam step), fp32 on CPU, against its bounds (issue 12).

    python bench/step_bench.py                      # B=4096, d=256, F=8192, k=32 for S=2 and S=8 (~10 min)
    python bench/step_bench.py --sizes large        # F=32768, k=64, S=8 (~4x the step time of s8; ~7 GB RSS)
    python bench/step_bench.py --quick              # smoke run: B=512, S=8, F=2048 (about two minutes)
    python bench/step_bench.py --sizes 2048x4x256x8192x32 --steps 3 --rows module

Every row runs in a fresh process that this script spawns (`--row <json>`), one after another, in the order
A B C ... A B C for `--passes` passes, so both passes of every row see the same machine. Each row process
calls torch.set_num_threads(cores) (os.sched_getaffinity), builds its step, runs `--warmup` untimed steps and
`--steps` timed ones; the table shows the best timed step of all passes and the process's peak RSS
(resource.getrusage ru_maxrss, and the peak before the first step: parameters, inputs, the engine). The rows
import a copy of crosscoder/ taken when the run starts (`--live`: the working tree), so edits made during a run
do not split it; each row records the digests of the model files it imported.

Rows of one configuration (B tokens x S snapshots x d, F latents, k):

  gemm       the fp32 GEMM [B, S*d] x [S*d, F] (the encoder forward) in FLOP/s, and the encoder-matmul bound it
             implies: tokens/s = FLOP/s / (2 S d F). A dense step does five such products (encoder forward,
             encoder weight gradient, decoder forward, decoder input and weight gradients: 0.2 of the bound at
             best); a sparse TopK step only the encoder forward over all F latents.
  reference  `Reference` below, a dense crosscoder step written here: the project's loss. Every row steps the
             trainer's Adam (crosscoder.training.schedules.adam: fused where the kernel exists).
  module     dictionary.crosscoder.Crosscoder(...)(x, l1_coeff, dead_mask).loss.backward(), Adam. TopK / BatchTopK
             with `sparse_topk=False` (dense) and `=True` (sparse; "n/a" while the keyword does not exist),
             without AuxK (dead_mask=None) and with AuxK (`--dead` of the latents dead, aux_k = d/2).
  trainer    the trainer's step on one rank (crosscoder.training.trainer.TrainingRun._step without the stream): the
             accelerate + DeepSpeed engine of build_accelerator (the trainer's stage: ZeRO-0 on one rank; the
             "ZeRO-2" row forces stage 2, which shards nothing on one rank: its cost over the ZeRO-0 row is the
             engine's own), the fired-latents + health reduction,
             accelerator.backward, optimizer / scheduler step, the dead-latent update.

Ratios are of tokens/s (above 1: the first is faster): sparse/dense against the same row with
sparse_topk=False, /ref against the reference of the same activation, trainer/module against the module row of
the same activation and path without AuxK, /bound against the encoder-matmul bound.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROW_MARK = "STEP_BENCH_ROW "
SOURCES = ("crosscoder/model.py", "crosscoder/activations.py", "crosscoder/sparse.py")
"""Files whose content every row records, so a run during edits of the project says which rows saw which code."""
SIZES = {  # name: (B, S, d, F, k)
    "s2": (4096, 2, 256, 8192, 32),
    "s8": (4096, 8, 256, 8192, 32),
    "large": (4096, 8, 256, 32768, 64),
    "q2": (512, 2, 256, 2048, 32),
    "q8": (512, 8, 256, 2048, 32),
}
DEFAULT_SIZES, QUICK_SIZES = "s2,s8", "q8"
L1_COEFF = 2.0  # crosscoder.l1_coeff's default (the step's cost does not depend on it)
LR = 1e-4


def _digests(root: Path) -> dict[str, str]:
    return {name: hashlib.sha1((root / name).read_bytes()).hexdigest()[:10] for name in SOURCES
            if (root / name).exists()}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine from /proc/stat, this process's own CPU seconds)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def timed(step) -> tuple[float, float]:  # noqa: ANN001
    """(seconds of one call of step, the cores other processes kept busy meanwhile, on average)."""
    machine, own = _cpu_seconds()
    started = time.perf_counter()
    step()
    wall = time.perf_counter() - started
    machine_after, own_after = _cpu_seconds()
    return wall, max(0.0, (machine_after - machine) - (own_after - own)) / wall


# ------------------------------------------------------------------------------------------------ the rows


def _reference_class():  # noqa: ANN202 (torch is imported in the row processes only)
    import torch
    from torch import nn

    class Reference(nn.Module):
        """A dense crosscoder step written plainly: x normalised once, no copies of [B, F] or [B, S, d] it can
        avoid; the loss of crosscoder.dictionary.crosscoder.Crosscoder.forward without AuxK."""

        def __init__(self, n_sources: int, d_model: int, dict_size: int, activation: str, k: int,
                     scale: torch.Tensor) -> None:
            super().__init__()
            decoder = torch.randn(dict_size, n_sources, d_model)
            decoder = decoder / decoder.norm(dim=-1, keepdim=True) * 0.1
            self.W_dec = nn.Parameter(decoder)  # [F, S, d]
            self.W_enc = nn.Parameter(decoder.permute(1, 2, 0).contiguous())  # [S, d, F]
            self.b_enc = nn.Parameter(torch.zeros(dict_size))
            self.b_dec = nn.Parameter(torch.zeros(n_sources, d_model))
            self.register_buffer("scale", scale.clone())  # [S]: c_s = sqrt(d) / sqrt(E||x_s||^2)
            self.activation, self.k = activation, k

        def forward(self, x: torch.Tensor, l1_coeff: float) -> torch.Tensor:
            x = x * self.scale[:, None]
            pre = torch.einsum("bsd,sdf->bf", x, self.W_enc) + self.b_enc
            weight = self.W_dec.norm(dim=-1).sum(dim=1)  # [F]: sum_s ||W_dec[i, s]||
            codes = pre.relu()
            if self.activation == "topk":
                top = (codes * weight.detach()).topk(self.k, dim=1).indices
                codes = torch.zeros_like(codes).scatter(1, top, codes.gather(1, top))
            elif self.activation == "batchtopk":
                top = (codes * weight.detach()).view(-1).topk(self.k * x.shape[0]).indices
                keep = torch.zeros(codes.numel(), dtype=torch.bool).index_fill_(0, top, True)
                codes = codes * keep.view_as(codes)
            recon = torch.einsum("bf,fsd->bsd", codes, self.W_dec) + self.b_dec
            loss = (x - recon).pow(2).sum(dim=(1, 2)).mean()
            if self.activation == "relu":
                loss = loss + l1_coeff * (codes * weight).sum(dim=1).mean()
            return loss

    return Reference


def _inputs(spec: dict):  # noqa: ANN202
    """x [B, S, d] with a different scale per snapshot, and the input scale c_s the trainer would estimate."""
    import torch

    batch, sources, d_model = spec["B"], spec["S"], spec["d"]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sources, d_model, generator=generator) * torch.linspace(0.5, 4.0, sources)[None, :, None]
    scale = (d_model / x.double().pow(2).sum(dim=2).mean(dim=0)).sqrt().float()
    return x.contiguous(), scale


def _has_sparse_topk() -> bool:
    from crosscoder.dictionary.crosscoder import Crosscoder

    return "sparse_topk" in inspect.signature(Crosscoder.__init__).parameters


def _module(spec: dict, scale, **extra):  # noqa: ANN001, ANN202
    import torch

    from crosscoder.dictionary.crosscoder import Crosscoder

    kwargs = dict(extra)
    if spec.get("sparse") is not None and _has_sparse_topk():  # without the keyword the module is dense
        kwargs["sparse_topk"] = spec["sparse"]
    torch.manual_seed(0)
    model = Crosscoder(n_sources=spec["S"], d_model=spec["d"], dict_size=spec["F"], activation=spec["activation"],
                       k=spec["k"], aux_k=0, **kwargs)
    model.set_input_scale(scale)
    return model


def _adam(parameters, lr: float, betas: tuple[float, float]):  # noqa: ANN001, ANN202
    """The trainer's optimiser for every row, the reference's too (the ratios compare crosscoder steps)."""
    import torch

    try:
        from crosscoder.training.schedules import adam
    except ImportError:  # a version from before the fused Adam
        return torch.optim.Adam(parameters, lr=lr, betas=betas)
    return adam(parameters, lr=lr, betas=betas)


def _dead_mask(spec: dict):  # noqa: ANN202
    import torch

    if not spec.get("aux"):
        return None
    dead = torch.zeros(spec["F"], dtype=torch.bool)
    order = torch.randperm(spec["F"], generator=torch.Generator().manual_seed(2))
    dead[order[: round(spec["dead"] * spec["F"])]] = True
    return dead


def _plain_step(spec: dict):  # noqa: ANN202
    """(step function, nothing to close) for the reference and module rows."""
    import torch

    x, scale = _inputs(spec)
    if spec["kind"] == "reference":
        torch.manual_seed(0)
        model = _reference_class()(spec["S"], spec["d"], spec["F"], spec["activation"], spec["k"], scale)

        def loss():  # noqa: ANN202
            return model(x, L1_COEFF)
    else:
        model = _module(spec, scale)
        dead = _dead_mask(spec)

        def loss():  # noqa: ANN202
            return model(x, L1_COEFF, dead).loss
    optimizer = _adam(model.parameters(), LR, (0.9, 0.999))

    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, lambda: None


def _trainer_step(spec: dict):  # noqa: ANN202
    """(step function, teardown): TrainingRun._build_engine and TrainingRun._step on one rank, with a fixed batch
    in place of the stream and without the log-step metrics (every trainer.log_every steps)."""
    import torch

    from crosscoder.config import RunConfig
    from crosscoder.parallel.engine import build_accelerator, teardown, with_model_parallel_unit
    from crosscoder.parallel.layout import build_layout
    from crosscoder.training.health import local_health, read_health
    from crosscoder.training.metrics import DeadLatentTracker, fired_latents
    from crosscoder.training.schedules import l1_coefficient, lr_multiplier

    cfg = RunConfig(output_dir=tempfile.mkdtemp(prefix="step_bench_"))
    cfg.deepspeed.zero_stage = spec.get("zero_stage")  # None: the trainer's own choice (ZeRO-0 on one rank)
    cfg.trainer.batch_size = spec["B"]
    cc, trainer_cfg = cfg.crosscoder, cfg.trainer
    cc.dict_size, cc.activation, cc.k = spec["F"], spec["activation"], spec["k"]
    accelerator = build_accelerator(cfg, spec["B"], 1)  # one rank: micro batch = batch
    layout = build_layout(1, spec["S"], cfg.parallel.sparse_topk_gradient)
    x, scale = _inputs(spec)
    model = _module(spec, scale, aux_coeff=cc.aux_coeff, init_decoder_norm=cc.init_decoder_norm,
                    snapshot_share=layout.share, reduction=layout.reduction)
    optimizer = _adam(model.parameters(), trainer_cfg.lr, tuple(trainer_cfg.adam_betas))
    total_steps = trainer_cfg.total_tokens // trainer_cfg.batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, trainer_cfg.lr_warmup_steps, trainer_cfg.lr_decay_fraction))
    with with_model_parallel_unit(layout):
        engine, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    param_dtype = next(engine.parameters()).dtype
    dead = DeadLatentTracker(cc.dict_size, cc.dead_after_tokens, accelerator.device)
    names = [f"s{i}" for i in range(spec["S"])]
    counter = iter(range(10**9))

    def step() -> None:
        n = next(counter)
        batch = x.to(accelerator.device, dtype=param_dtype)
        l1_coeff = l1_coefficient(n, cc.l1_coeff, cc.l1_warmup_steps)
        output = engine(batch, l1_coeff, dead.dead_mask)
        local = torch.cat([fired_latents(output.codes).float(),
                           local_health(layout, batch, output.loss, False, None), output.loss.detach().reshape(1)])
        reduced = accelerator.reduce(local, "sum")
        *flags, _loss = reduced[cc.dict_size :].tolist()  # the loss the progress line shows
        health = read_health(flags, names)
        if not health.healthy:
            raise RuntimeError(f"unhealthy step {n}: {health}")
        accelerator.backward(output.loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        dead.update(reduced[: cc.dict_size] > 0, cfg.trainer.batch_size)

    return step, lambda: teardown(accelerator)


def _gemm(spec: dict) -> dict:
    import torch

    a = torch.randn(spec["B"], spec["S"] * spec["d"])
    b = torch.randn(spec["S"] * spec["d"], spec["F"])
    flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    a @ b
    runs = [timed(lambda: a @ b) for _ in range(max(5, spec["steps"] * 2))]
    wall, others = min(runs)
    return {"flops": flop / wall, "times": [run[0] for run in runs], "others": others,
            "half_flops": _half_precision_flops(torch)}


def _half_precision_flops(torch) -> dict[str, float]:  # noqa: ANN001
    """bf16 / fp16 GEMM FLOP/s against fp32 at 512^3 (small: without matrix units for them, a CPU runs 16-bit
    GEMMs 100x+ slower, and the encoder-size GEMM would take minutes)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(512, 512).to(dtype)
        a @ a
        out[name] = 2 * 512**3 / min(timed(lambda a=a: a @ a)[0] for _ in range(3))
    return out


def _check(spec: dict) -> dict:
    """Loss and gradients of the reference against the module (dense, and sparse if it exists) on one small
    batch with the same weights: the rows compare the same computation."""
    import torch

    small = dict(spec, B=256, S=2, d=32, F=512, k=8)
    x, scale = _inputs(small)
    out = {}
    for activation in ("relu", "topk", "batchtopk"):
        small["activation"] = activation
        torch.manual_seed(0)
        reference = _reference_class()(2, 32, 512, activation, 8, scale)
        ref_loss = reference(x, L1_COEFF)
        ref_loss.backward()
        variants = [None] if activation == "relu" or not _has_sparse_topk() else [False, True]
        for sparse in variants:
            module = _module(dict(small, sparse=sparse), scale)
            module.load_state_dict({**module.state_dict(), **{n: p.detach() for n, p in reference.named_parameters()}})
            loss = module(x, L1_COEFF, None).loss
            loss.backward()
            grads = dict(module.named_parameters())
            grad_diff = max((grads[n].grad - p.grad).abs().max().item() / p.grad.abs().max().clamp_min(1e-12).item()
                            for n, p in reference.named_parameters())
            name = activation + ("" if sparse is None else ":sparse" if sparse else ":dense")
            out[name] = {"loss_diff": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), "grad_diff": grad_diff}
    return out


def run_row(spec: dict) -> dict:
    """One row in this (fresh) process: set-up, warm-up, timed steps; the figures as a dict."""
    import torch

    torch.set_num_threads(spec["threads"])
    result: dict = {"load_start": os.getloadavg()[0]}
    if spec["kind"] in ("module", "trainer", "check"):
        import crosscoder.dictionary.crosscoder

        # the copy the driver took, or the working tree
        root = Path(crosscoder.dictionary.crosscoder.__file__).parents[2]
        result["sources"] = _digests(root)
    if spec.get("sparse") and not _has_sparse_topk():
        return {**result, "na": "n/a (not implemented)"}
    if spec["kind"] == "gemm":
        return {**result, **_gemm(spec), "threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib()}
    if spec["kind"] == "check":
        return {**result, "check": _check(spec), "sparse_topk": _has_sparse_topk()}
    step, close = (_trainer_step if spec["kind"] == "trainer" else _plain_step)(spec)
    torch.set_num_threads(spec["threads"])  # after DeepSpeed / accelerate set-up, in case either changed it
    result["setup_rss_mib"] = peak_rss_mib()
    for _ in range(spec["warmup"]):
        step()
    times, others = [], []
    for _ in range(spec["steps"]):
        wall, busy = timed(step)
        times.append(wall)
        others.append(busy)
    result.update(times=times, others=others, threads=torch.get_num_threads(), peak_rss_mib=peak_rss_mib(),
                  load_end=os.getloadavg()[0])
    close()
    return result


# ------------------------------------------------------------------------------------------------ the driver


@dataclass
class Row:
    name: str
    spec: dict

    @property
    def kind(self) -> str:
        return self.spec["kind"]


def rows_of(size: tuple[int, ...], args: argparse.Namespace, sparse_exists: bool) -> list[Row]:
    batch, sources, d_model, dict_size, k = size
    base = dict(B=batch, S=sources, d=d_model, F=dict_size, k=k, threads=args.threads, warmup=args.warmup,
                steps=args.steps, dead=args.dead)
    rows = [Row("gemm", dict(base, kind="gemm"))]
    for activation in ("relu", "topk", "batchtopk"):
        rows.append(Row(f"reference {activation}", dict(base, kind="reference", activation=activation)))
        if activation == "relu":
            rows.append(Row("module relu", dict(base, kind="module", activation=activation)))
        else:
            for aux in (False, True):
                for sparse in (False, True):
                    label = f"module {activation}{' +AuxK' if aux else ''} {'sparse' if sparse else 'dense'}"
                    rows.append(Row(label, dict(base, kind="module", activation=activation, aux=aux, sparse=sparse)))
    rows.append(Row("trainer relu", dict(base, kind="trainer", activation="relu")))
    sparse = "sparse" if sparse_exists else "dense"
    rows.append(Row(f"trainer batchtopk {sparse}", dict(base, kind="trainer", activation="batchtopk",
                                                         sparse=sparse_exists)))
    rows.append(Row(f"trainer batchtopk {sparse} ZeRO-2", dict(base, kind="trainer", activation="batchtopk",
                                                                sparse=sparse_exists, zero_stage=2)))
    if args.rows:
        keep = [word.strip() for word in args.rows.split(",")]
        rows = [row for row in rows if row.kind == "gemm" or any(word in row.name for word in keep)]
    return rows


def spawn(spec: dict, timeout: float, root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        env.pop(key, None)  # a one-rank launch: ensure_process_group_env describes the group
    command = [sys.executable, str(Path(__file__).resolve()), "--row", json.dumps(spec)]
    try:
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(ROW_MARK):
            return json.loads(line[len(ROW_MARK) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"failed": f"exit {done.returncode}: " + " | ".join(tail)}


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if value is None else format(value, spec)


def table(size: tuple[int, ...], rows: list[Row], results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    batch, sources, d_model, dict_size, k = size
    best: dict[str, tuple[float, float]] = {}  # row name -> (best seconds per step, other processes' cores then)
    for row in rows:
        found = results[row.name] if row.kind != "gemm" else []
        steps = [(t, o) for r in found for t, o in zip(r.get("times", []), r.get("others", []), strict=True)]
        if steps:
            best[row.name] = min(steps)
    gemm = [r for r in results["gemm"] if "flops" in r]
    flops = max(r["flops"] for r in gemm) if gemm else None
    bound = flops / (2 * sources * d_model * dict_size) if flops else None
    print(f"\n== B={batch} tokens, S={sources}, d={d_model}, F={dict_size}, k={k}; AuxK rows: "
          f"{args.dead:.0%} of the latents dead, aux_k = d/2 = {d_model // 2}")
    if flops:
        per_pass = ", ".join(f"{r['flops'] / 1e9:.1f} (others {r['others']:.2f})" for r in gemm)
        print(f"fp32 GEMM [{batch}, {sources * d_model}] x [{sources * d_model}, {dict_size}]: best "
              f"{flops / 1e9:.1f} GFLOP/s (passes: {per_pass}) -> encoder-matmul bound {bound:,.0f} tok/s; "
              f"a dense step's five such products: {bound / 5:,.0f} tok/s")
        half = next((r["half_flops"] for r in gemm if "half_flops" in r), None)
        if half:
            print("GEMM 512^3 GFLOP/s: " + ", ".join(f"{name} {value / 1e9:.1f}" for name, value in half.items())
                  + " (16-bit on this CPU: " + ("faster" if half["bf16"] > half["fp32"] else "slower") + ")")
    passes = max(len(found) for found in results.values())
    head = " ".join(f"{'ms p' + str(p + 1):>7}" for p in range(passes))
    print(f"{'row':<32} {head} {'tok/s':>7} {'/bound':>6} {'/ref':>5} {'sparse/dense':>12} {'trainer/module':>14} "
          f"{'peak RSS MiB':>12} {'setup':>6} {'others':>6} {'load':>{4 * passes - 1}}")
    for row in rows:
        if row.kind == "gemm":
            continue
        found = results[row.name]
        status = next((r.get("na") or r.get("failed") for r in found if r.get("na") or r.get("failed")), None)
        if row.name not in best:
            print(f"{row.name:<32} {status or 'no result'}")
            continue
        per_pass = " ".join(f"{min(r['times']) * 1e3:>7.0f}" if r.get("times") else f"{'-':>7}" for r in found)
        seconds, others = best[row.name]
        rate = batch / seconds
        rss = max(r["peak_rss_mib"] for r in found if "peak_rss_mib" in r)
        setup = max(r["setup_rss_mib"] for r in found if "setup_rss_mib" in r)
        load = "/".join(f"{r['load_start']:.1f}" if "load_start" in r else "-" for r in found)
        spec = row.spec

        def ratio(other: str | None, mine: float = seconds) -> float | None:
            return best[other][0] / mine if other in best else None

        reference = f"reference {spec['activation']}" if row.kind != "reference" else None
        dense = row.name.replace(" sparse", " dense") if spec.get("sparse") else None
        module = None
        if row.kind == "trainer":
            path = "" if spec["activation"] == "relu" else " sparse" if spec.get("sparse") else " dense"
            module = f"module {spec['activation']}{path}"
        print(f"{row.name:<32} {per_pass} {rate:>7,.0f} {_fmt(rate / bound if bound else None, '6.3f')} "
              f"{_fmt(ratio(reference), '5.2f')} {_fmt(ratio(dense), '12.2f')} {_fmt(ratio(module), '14.2f')} "
              f"{rss:>12,.0f} {setup:>6,.0f} {others:>6.2f} {load:>{4 * passes - 1}}"
              + (f"   [{status}]" if status else ""))
    print("ms pN: the best timed step of pass N; tok/s from the best of all; others: cores busy with other processes "
          "during that step (/proc/stat less the row's own CPU time); load: 1-min load average as each pass's row "
          "process started")


def drive(args: argparse.Namespace) -> None:
    sizes = []
    for name in (QUICK_SIZES if args.quick and not args.sizes else args.sizes or DEFAULT_SIZES).split(","):
        sizes.append(SIZES[name] if name in SIZES else tuple(int(v) for v in name.split("x")))
    started = time.perf_counter()
    root = REPO
    if not args.live:  # every row times the same code while the project is being edited
        root = Path(tempfile.mkdtemp(prefix="step_bench_src_"))
        shutil.copytree(REPO / "crosscoder", root / "crosscoder", ignore=shutil.ignore_patterns("__pycache__"))
    print(f"step_bench: {time.strftime('%Y-%m-%d %H:%M')}, {cores()} cores, load average "
          f"{'/'.join(f'{v:.2f}' for v in os.getloadavg())} (1/5/15 min) at the start")
    where = "the working tree (--live)" if args.live else "a copy of crosscoder/ taken at the start"
    print(f"rows import {where}: " + ", ".join(f"{n.split('/')[-1]} {d}" for n, d in _digests(root).items()))
    print(f"each row: a fresh process, torch.set_num_threads({args.threads}), fp32, {args.warmup} warm-up + "
          f"{args.steps} timed step(s), {args.passes} pass(es) in the order A B C ... A B C; best timed step shown; "
          f"'load' = the 1-min load average as each pass's process started (it counts that process's own threads)")
    check = spawn(dict(kind="check", threads=args.threads, k=8), args.timeout, root)
    if "check" in check:
        worst = max(max(v.values()) for v in check["check"].values())
        print("reference vs module, same weights, B=256 S=2 d=32 F=512 k=8, relative |diff| of loss, gradients: "
              + ", ".join(f"{n} {v['loss_diff']:.0e}/{v['grad_diff']:.0e}" for n, v in check["check"].items())
              + ("" if worst < 1e-4 else "   !! the reference and the module differ"))
    else:
        print(f"reference vs module check: {check.get('failed', check)}")
    sparse_exists = bool(check.get("sparse_topk"))  # Crosscoder(sparse_topk=...) exists; the rows check again
    if not sparse_exists:
        print("Crosscoder has no sparse_topk keyword: the sparse rows are n/a, the trainer's BatchTopK row is dense")
    seen_sources: dict[str, set] = {}
    for size in sizes:
        rows = rows_of(size, args, sparse_exists)
        results: dict[str, list[dict]] = {row.name: [] for row in rows}
        for n in range(args.passes):
            for row in rows:
                result = spawn(row.spec, args.timeout, root)
                results[row.name].append(result)
                for name, digest in result.get("sources", {}).items():
                    seen_sources.setdefault(name, set()).add(digest)
                if args.verbose:
                    times = ", ".join(f"{t * 1e3:.0f}" for t in result.get("times", []))
                    print(f"  [pass {n + 1}] {row.name}: {result.get('failed') or result.get('na') or times + ' ms'}",
                          flush=True)
        table(size, rows, results, args)
        sys.stdout.flush()
    if not args.live:
        shutil.rmtree(root, ignore_errors=True)
    changed = [name for name, digests in seen_sources.items() if len(digests) > 1]
    if changed:
        print(f"\n!! {', '.join(changed)} changed during the run: the rows did not all time the same code")
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average "
          f"{'/'.join(f'{v:.2f}' for v in os.getloadavg())} at the end; project sources "
          + ", ".join(f"{name.split('/')[-1]} {'/'.join(sorted(d))}" for name, d in seen_sources.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None,
                        help=f"comma list of {', '.join(SIZES)} or BxSxdxFxk (default {DEFAULT_SIZES}; "
                             f"--quick: {QUICK_SIZES})")
    parser.add_argument("--quick", action="store_true", help="smoke run at small sizes")
    parser.add_argument("--rows", default="", help="only rows whose name contains one of these (comma list)")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per row process (default 1: ~10 min for the default sizes on 2 idle cores, "
                             "13 min with 2; --quick: 5)")
    parser.add_argument("--dead", type=float, default=0.5, help="share of the latents dead in the AuxK rows")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--timeout", type=float, default=900, help="seconds per row process")
    parser.add_argument("--live", action="store_true",
                        help="rows import the working tree's crosscoder/ (default: a copy taken at the start)")
    parser.add_argument("--verbose", action="store_true", help="print each row's step times as it finishes")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 5 if args.quick else 1
    if args.row:
        print(ROW_MARK + json.dumps(run_row(json.loads(args.row))), flush=True)
    else:
        drive(args)


if __name__ == "__main__":
    main()
