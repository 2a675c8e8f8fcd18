"""Builders shared by the test modules of both tiers (tests/unit runs in-process, tests/launch starts processes).
A test module imports from here, never from another test module; conftest.py files hold only fixtures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

from crosscoder.analysis.features.planted import planted_config
from crosscoder.cli.train import sweep_group
from crosscoder.config import PlantedSourceConfig, RunConfig
from crosscoder.constants import DICTIONARY_DIR, RUN_SUMMARY_FILE, TRAINING_STATES_DIR
from crosscoder.data.planted import planted_truth
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary, load_dictionary
from crosscoder.dictionary.stack import StackEntry, StackManifest, write_stack_manifest
from crosscoder.parallel.engine import free_port
from crosscoder.toy import ToyLMConfig
from crosscoder.training.state import list_training_states

# ---- the tiny toy run ------------------------------------------------------------------------------------------------
# The toy's snapshots' settings, run configs reading them, and what a run leaves on disk.


# What a training run (or a launcher) puts in os.environ about its process group and W&B staging.
# WANDB_SERVICE: the address of the W&B service an in-process run started; a launched job inheriting it would
# share that service (and a killed run's id would stay "in use" there).
PROCESS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_DATA_DIR",
               "CROSSCODER_OWNS_WANDB_DATA_DIR", "WANDB_SERVICE")
TINY_TOY = dict(hidden_size=32, num_layers=2, train_steps=12, snapshot_steps=(0, 4, 12))


SMALL = ToyLMConfig(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300,
    seq_len=32, batch_size=8, train_steps=20, warmup_steps=2, snapshot_steps=(0, 5, 20),
    n_documents=300, seed=0,
)


def tiny_toy_config(toy_cache: Path, output_dir: str | Path = "unused", model_batch_size: int = 8,
                    toy_documents: int = 200) -> RunConfig:
    """A run config reading the tiny toy snapshots (16-token sequences); callers set the rest."""
    cfg = RunConfig(output_dir=str(output_dir))
    cfg.sources.kind, cfg.sources.hook = "toy", "blocks.1.hook_resid_pre"
    cfg.sources.toy.cache_dir = str(toy_cache)
    for key, value in TINY_TOY.items():
        setattr(cfg.sources.toy, key, list(value) if isinstance(value, tuple) else value)
    cfg.data.seq_len, cfg.data.model_batch_size, cfg.data.toy_documents = 16, model_batch_size, toy_documents
    cfg.trainer.eval_tokens = 0  # the spliced-in evaluation at each export: on only where a test checks it
    return cfg


def tiny_run_config(toy_cache: Path, output_dir: Path) -> RunConfig:
    cfg = tiny_toy_config(toy_cache, output_dir)
    cfg.data.shuffle.buffer_tokens = 1024
    cfg.crosscoder.dict_size, cfg.crosscoder.norm_estimation_batches = 128, 2
    cfg.crosscoder.l1_coeff, cfg.crosscoder.l1_warmup_steps = 0.5, 5
    cfg.trainer.batch_size, cfg.trainer.total_tokens, cfg.trainer.log_every = 128, 128 * 40, 10
    cfg.trainer.lr, cfg.trainer.lr_warmup_steps = 3e-3, 5
    cfg.deepspeed.zero_stage = 0
    cfg.tracking.mode = "disabled"
    return cfg


def states(run_dir: Path) -> list[int]:
    return sorted(int(path.name[5:]) for path in list_training_states(run_dir / TRAINING_STATES_DIR))


def copy_snapshots(tiny_snapshots: list, folder: Path) -> list[Path]:
    """The tiny snapshots copied to `folder` under their own names (step0, step4, step12)."""
    copies = []
    for snapshot in tiny_snapshots:
        copies.append(folder / snapshot.path.name)
        shutil.copytree(snapshot.path, copies[-1])
    return copies


# ---- launching the real entry points ---------------------------------------------------------------------------------
# Launching the real entry points in subprocesses for the end-to-end tests: `accelerate launch` of 1-4 CPU ranks
# (gloo), the tiny toy run's overrides, signals to a whole job, and the shared activation cache.


REPO = Path(__file__).resolve().parent.parent


def tiny_overrides(toy_cache: Path) -> list[str]:
    steps = ",".join(str(s) for s in TINY_TOY["snapshot_steps"])
    return [
        f"sources.toy.cache_dir={toy_cache}",
        f"sources.toy.hidden_size={TINY_TOY['hidden_size']}",
        f"sources.toy.num_layers={TINY_TOY['num_layers']}",
        f"sources.toy.train_steps={TINY_TOY['train_steps']}",
        f"sources.toy.snapshot_steps=[{steps}]",
        "data.seq_len=16", "data.model_batch_size=8", "data.toy_documents=200",
        "data.shuffle.buffer_tokens=512", "data.workers.num_workers=1",
        "crosscoder.dict_size=64", "crosscoder.norm_estimation_batches=2", "crosscoder.l1_warmup_steps=2",
        "trainer.batch_size=128", "trainer.total_tokens=1024", "trainer.log_every=2",
        "trainer.lr_warmup_steps=2", "trainer.eval_tokens=0", "tracking=offline",
    ]


def run(command: list[str], tmp_path: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    """Run a command in a clean offline environment; it must exit with `returncode`."""
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_ENV}
    env = {**inherited, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == returncode, (f"exit {result.returncode}\n{result.stdout[-4000:]}\n"
                                             f"{result.stderr[-6000:]}")
    return result


def single_wandb_run_file(run_dir: Path) -> Path:
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected exactly one W&B run (rank 0 only), found {runs}"
    return runs[0]


def launch_two_ranks(launch_config: str, toy_cache: Path, workdir: Path) -> tuple[Path, str]:
    """A 2-process `accelerate launch` of the tiny run fed by one worker per rank; (run dir, its log)."""
    run_dir = workdir / "run"
    result = run([
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "launch" / launch_config), "--main_process_port", str(free_port()),
        "-m", "crosscoder.train", *[o for o in tiny_overrides(toy_cache) if not o.startswith("trainer.eval_tokens=")],
        "trainer.checkpoint_every=4", "trainer.eval_tokens=128", f"hydra.run.dir={run_dir}",
    ], workdir)
    return run_dir, result.stdout + result.stderr


def launch(config: str | None, overrides: list[str], workdir: Path, num_processes: int | None = None,
           returncode: int = 0) -> subprocess.CompletedProcess:
    """`accelerate launch` with a launch/ config (its 2 ranks, or `num_processes`), or a plain one-process run
    when config is None."""
    processes = ["--num_processes", str(num_processes)] if num_processes else []
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
                *processes, "--main_process_port", str(free_port())] if config else [sys.executable]
    return run([*launcher, "-m", "crosscoder.train", *overrides], workdir, returncode)


def in_order_overrides(toy_cache: Path, cache: Path, run_dir: Path) -> list[str]:
    """From the cache, unshuffled: rank r of N reads the r-th micro batch of every global batch."""
    return [*tiny_overrides(toy_cache), f"data.cache.dir={cache}", "data.shuffle.buffer_tokens=0",
            "trainer.checkpoint_every=4", f"hydra.run.dir={run_dir}"]


def resume_overrides(toy_cache: Path, cache: Path, run_dir: Path) -> list[str]:
    """64 steps of 32 tokens from the cache, shuffled, a training state every 4 steps."""
    return [*tiny_overrides(toy_cache), f"data.cache.dir={cache}", "trainer.batch_size=32",
            "trainer.total_tokens=2048", "trainer.state_every=4", "trainer.log_every=8", f"hydra.run.dir={run_dir}"]


def start_two_ranks(overrides: list[str], workdir: Path, log: Path, config: str = "cpu_2proc_zero2.yaml",
                    num_processes: int | None = None) -> subprocess.Popen:
    """A 2-rank launch (or `num_processes`) in its own process group (so a signal reaches the launcher and every
    rank)."""
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_ENV}
    env = {**inherited, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    processes = ["--num_processes", str(num_processes)] if num_processes else []
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
               *processes, "--main_process_port", str(free_port()), "-m", "crosscoder.train", *overrides]
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) first:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.02)


def signal_job(process: subprocess.Popen, signum: int) -> None:
    """Signal the launcher and every process under it, as a scheduler does to a job (the ranks run in sessions
    of their own, so a process-group signal would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, parent = stat.read_text().rsplit(")", 1)[1].split()[1:2][0], int(stat.parent.name)
        except (OSError, IndexError):
            continue
        children.setdefault(int(pid), []).append(parent)
    job, frontier = [], [process.pid]
    while frontier:
        pid = frontier.pop()
        job.append(pid)
        frontier.extend(children.get(pid, []))
    for pid in job:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def wait_for_job(process: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    """The launcher and the ranks have exited (the ranks hold their W&B runs open until then)."""
    process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(str(run_dir) in cmdline.read_text(errors="ignore") for cmdline in _cmdlines()):
        assert time.monotonic() < deadline, "ranks of the job are still running"
        time.sleep(0.1)


def _cmdlines() -> list[Path]:
    return [path for path in Path("/proc").glob("[0-9]*/cmdline") if path.parent.name != str(os.getpid())]


def newest_state_step(run_dir: Path) -> int:
    states = list_training_states(run_dir / TRAINING_STATES_DIR)
    return int(states[0].name[5:]) if states else 0


def build_activation_cache(toy_cache: Path, workdir: Path) -> Path:
    """A cache of the tiny toy run (3072 tokens), written by the `crosscoder-cache` entry point."""
    cache_dir = workdir / "acts"
    result = run([sys.executable, "-m", "crosscoder.cli.cache", *tiny_overrides(toy_cache),
                  f"data.cache.dir={cache_dir}", "data.cache.tokens=3072", f"hydra.run.dir={workdir / 'log'}"],
                 workdir)
    assert f"activations in {cache_dir}" in result.stdout
    assert (cache_dir / "manifest.json").is_file()
    return cache_dir


def check_sweep(sweep_dir: Path) -> dict[float, float]:
    """Jobs 0 and 1 of a lambda = 0.5, 5 sweep each exported their dictionary and ran one W&B run, both in
    the sweep's W&B group; returns L0 per lambda."""
    sparsity, groups = {}, set()
    for job, coeff in (("0", 0.5), ("1", 5.0)):
        _, meta = load_dictionary(sweep_dir / job / DICTIONARY_DIR)
        assert meta.training["crosscoder"]["l1_coeff"] == coeff
        summary = json.loads((sweep_dir / job / RUN_SUMMARY_FILE).read_text())
        sparsity[coeff] = summary["l0"]
        groups.add(run_group(single_wandb_run_file(sweep_dir / job)))
    assert groups == {sweep_group(sweep_dir)}, groups
    return sparsity


# ---- offline W&B run files -------------------------------------------------------------------------------------------
# Read the records of an offline W&B run file (`run-*.wandb`): a LevelDB-style log of protobuf records.
#
# wandb no longer ships a Python reader for it; this is enough to check what a run logged.


FILE_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
BLOCK = 32 * 1024
RECORD_HEADER = 7  # crc32 (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, pending = FILE_HEADER, b""
    while offset + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer padding
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + RECORD_HEADER])
        if offset + RECORD_HEADER + length > len(data):
            return  # the writer is still writing this record: read up to it
        chunk = data[offset + RECORD_HEADER : offset + RECORD_HEADER + length]
        offset += RECORD_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            offset += left_in_block - RECORD_HEADER  # zero padding: skip to the next block
            offset -= offset % BLOCK


def read_records(path: Path, wait_s: float = 20.0) -> Iterator[wandb_internal_pb2.Record]:
    """The run file's records. `run.finish()` can return before wandb-core has written the last of them (seen
    under two pytest-xdist workers: a history record missing, then present), so wait up to `wait_s` for the
    run's closing `exit` record; a run that never closed (killed) is read as it is after that. A record caught
    half-written (seen once in CI: "Wire format was corrupt") is read again."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = [_record(payload) for payload in _payloads(path)]
        except DecodeError:  # read while wandb-core was writing a record: read again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return iter(records)
        time.sleep(0.2)


def _record(payload: bytes) -> wandb_internal_pb2.Record:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    return record


def history_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


def artifacts(path: Path) -> list[wandb_internal_pb2.ArtifactRecord]:
    return [r.artifact for r in read_records(path) if r.WhichOneof("record_type") == "artifact"]


def run_group(path: Path) -> str:
    """The W&B group the run was started in ('' when none)."""
    return next(r.run.run_group for r in read_records(path) if r.WhichOneof("record_type") == "run")


# ---- hand-built dictionaries -----------------------------------------------------------------------------------------
# Exported crosscoder dictionaries built by hand: one with known classes (written by
# `crosscoder.dictionary.io.export_dictionary`), the planted problem's own dictionary, and a damaged file.


N_SOURCES, DICTIONARY_D_MODEL = 4, 8
# Per-group normalised decoder norms over the 4 snapshots, and how many latents follow each.
DICTIONARY_GROUPS = [
    ("persistent", 0, [1.0, 1.0, 0.9, 1.0], 8),
    ("emerging", 1, [0.1, 0.6, 0.9, 1.0], 8),
    ("emerging", 2, [0.1, 0.2, 0.7, 1.0], 8),
    ("vanishing", 0, [1.0, 0.8, 0.3, 0.1], 6),
    ("transient", 1, [0.2, 1.0, 0.6, 0.2], 6),
    ("dead", -1, [0.0, 0.0, 0.0, 0.0], 4),
]
EXPECTED_CLASSES = {"persistent": 8, "emerging": 16, "vanishing": 6, "transient": 6, "dead": 4}
EXPECTED_EMERGENCE = [14, 14, 8, 0]  # persistent + vanishing at 0; emerging(1) + transient at 1; emerging(2) at 2
# Strongly non-uniform input scales: the folded W_dec norms differ from the normalised ones by these factors,
# so trajectories computed from raw W_dec norms would give different classes.
INPUT_SCALE = torch.tensor([4.0, 1.0, 1.0, 0.25])
SOURCES = [
    {"name": "step0", "path": "toy", "revision": "step0", "step": 0},
    {"name": "step64", "path": "toy", "revision": "step64", "step": 64},
    {"name": "step512", "path": "toy", "revision": "step512", "step": 512},
    {"name": "final", "path": "/models/final", "revision": None, "step": None},
]


def expected_norms() -> torch.Tensor:
    return torch.cat([torch.tensor(norms).expand(count, N_SOURCES) for _, _, norms, count in DICTIONARY_GROUPS])


def write_dictionary(path: Path, firing_frequency: torch.Tensor | None = None) -> Path:
    norms = expected_norms()
    dict_size = norms.shape[0]
    torch.manual_seed(0)
    model = Crosscoder(N_SOURCES, DICTIONARY_D_MODEL, dict_size, "topk", k=4)
    model.set_input_scale(INPUT_SCALE)
    with torch.no_grad():
        directions = torch.randn(dict_size, N_SOURCES, DICTIONARY_D_MODEL)
        model.W_dec.copy_(directions / directions.norm(dim=-1, keepdim=True) * norms[..., None])
    meta = DictionaryMeta(
        sources=[dict(s) for s in SOURCES], hook="blocks.1.hook_resid_pre", d_model=DICTIONARY_D_MODEL,
        dict_size=dict_size, activation="topk", k=4, aux_k=0, tokens_seen=1_000_000, train_step=500,
        input_scale=[1.0] * N_SOURCES, training={"trainer": {"lr": 1e-3}},
    )
    return export_dictionary(model.state_dict(), meta, path, firing_frequency=firing_frequency)


def _planted_dictionary(path: Path) -> tuple[Path, int, int]:
    """The planted problem's own dictionary as a crosscoder (decoder = truth, encoder = matched filters), with
    one persistent feature's snapshot-0 decoder shrunk to 2%: returns (folder, shrunk latent, emerging latent)."""
    cfg = PlantedSourceConfig(n_snapshots=3, d_model=32, n_features=8, persistent_share=0.5, emerging_share=0.5,
                              vanishing_share=0.0, transient_share=0.0, active_per_token=2.0, rotation_fraction=0.0,
                              noise=0.05, seed=1)
    truth = planted_truth(cfg)
    model = Crosscoder(3, 32, 8, "relu")
    weight = truth.profiles / (truth.profiles * truth.magnitudes).sum(dim=1, keepdim=True)  # code ~ coefficient
    with torch.no_grad():
        model.W_dec.copy_(truth.decoder)
        model.W_enc.copy_((truth.directions * weight[..., None]).permute(1, 2, 0))
        model.b_enc.fill_(-0.2)
        shrunk = truth.kinds.index("persistent")
        model.W_dec[shrunk, 0] *= 0.02
    sources = [{"name": f"snapshot{s}", "path": "planted", "revision": "x", "step": s} for s in range(3)]
    meta = DictionaryMeta(sources=sources, hook="planted", d_model=32, dict_size=8, activation="relu", k=0, aux_k=0,
                          tokens_seen=0, train_step=0, input_scale=[1.0] * 3,
                          training={"sources": {"kind": "planted", "planted": asdict(cfg)}})
    return export_dictionary(model.state_dict(), meta, path), shrunk, truth.kinds.index("emerging")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---- hand-built stacks -----------------------------------------------------------------------------------------------
# Stacks of single-snapshot dictionaries built by hand: hand-built decoders (known classes) and the planted
# problem's decoders, each snapshot's dictionary exported by `crosscoder.dictionary.io.export_dictionary`.


D_MODEL, DICT_SIZE = 16, 48


def write_single(path: Path, name: str, w_dec: torch.Tensor, *, scale: float = 1.0, activation: str = "topk",
                 threshold: torch.Tensor | None = None, encoder_gain: torch.Tensor | None = None,
                 tag: torch.Tensor | None = None, training: dict | None = None) -> Path:
    """One snapshot's exported dictionary with decoder `w_dec` [F, d] in normalised space; W_enc = gain * W_dec^T
    and b_enc = `tag` (which latent this is, so a test can follow it through a permutation)."""
    n_latents, d_model = w_dec.shape
    model = Crosscoder(1, d_model, n_latents, activation, k=4)
    model.set_input_scale(torch.tensor([scale]))
    gain = encoder_gain if encoder_gain is not None else torch.ones(n_latents)
    with torch.no_grad():
        model.W_dec.copy_(w_dec[:, None])
        model.W_enc.copy_((w_dec * gain[:, None]).T[None])
        model.b_enc.copy_(tag if tag is not None else torch.arange(n_latents).float())
        if threshold is not None:
            model.activation.log_threshold.copy_(threshold.log())
    meta = DictionaryMeta(
        sources=[{"name": name, "path": "toy", "revision": None, "step": None}], hook="blocks.0.hook_resid_pre",
        d_model=d_model, dict_size=n_latents, activation=activation, k=4, aux_k=0, tokens_seen=1000, train_step=10,
        input_scale=[1.0], training=training or {},
    )
    # Which latent this is again, and never 0: a latent never seen firing holds nothing (analysis.chains).
    frequency = ((tag if tag is not None else torch.arange(n_latents).float()) + 1) / (10 * n_latents)
    return export_dictionary(model.state_dict(), meta, path, firing_frequency=frequency)


def write_stack(path: Path, decoders: list[torch.Tensor], *, aligned: str = "none", method: str = "independent",
                **per_snapshot: list) -> Path:
    """A stack of one dictionary per decoder; `per_snapshot` keyword lists go to `write_single` one item each."""
    entries = []
    for s, w_dec in enumerate(decoders):
        name = f"snap{s}"
        write_single(path / name, name, w_dec, **{key: values[s] for key, values in per_snapshot.items()})
        entries.append(StackEntry(name=name, dictionary=name, step=100 * s, train_steps=10))
    write_stack_manifest(path, StackManifest(method=method, aligned=aligned, entries=entries, hook="h"))
    return path


# Norms per snapshot of each group of latents in the hand-built stack, and how many latents each has.
GROUPS = [([1.0, 1.0, 1.0], 6), ([1e-3, 2e-3, 1.0], 5), ([0.2, 0.8, 1.0], 4), ([1.0, 0.6, 0.1], 3), ([0.0] * 3, 2)]


def hand_built_decoders() -> list[torch.Tensor]:
    """[F, d] per snapshot: fixed directions (slightly drifting) times the GROUPS norms."""
    gen = torch.Generator().manual_seed(20)
    norms = torch.cat([torch.tensor(values).expand(count, 3) for values, count in GROUPS])
    directions = torch.randn(len(norms), D_MODEL, generator=gen)
    out = []
    for s in range(3):
        drifted = directions + 0.05 * s * torch.randn(len(norms), D_MODEL, generator=gen)
        out.append(drifted / drifted.norm(dim=1, keepdim=True) * norms[:, s:s + 1])
    return out


N_SNAPSHOTS = 3
PLANTED = {"sources": {"kind": "planted", "planted": {"n_snapshots": N_SNAPSHOTS, "d_model": D_MODEL,
                                                      "n_features": 24}}}


def planted_decoders() -> list[torch.Tensor]:
    """[24, d] per snapshot: the planted decoder (zero rows where a feature is off)."""
    truth = planted_truth(planted_config(PLANTED))
    return [truth.decoder[:, s].clone() for s in range(N_SNAPSHOTS)]


def planted_stack(path: Path, decoders: list[torch.Tensor], aligned: str = "warm_start") -> Path:
    """A stack of single-snapshot dictionaries (encoder = decoder transpose, top-4) on the planted problem."""
    return write_stack(path, decoders, aligned=aligned, method="sae_track", training=[PLANTED] * N_SNAPSHOTS,
                       tag=[torch.zeros(len(w)) for w in decoders])


def write_activation_folder(root: Path, activations: torch.Tensor, sources: list[dict],
                            rows_per_shard: int = 2048) -> Path:
    """A `sources.kind=files` folder: sources.json listing `sources`, then safetensors shards of `activations`
    [n, S, d] (stacked) with their row numbers as token ids."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "sources.json").write_text(json.dumps({"sources": sources, "hook": "resid_pre"}))
    for index, start in enumerate(range(0, activations.shape[0], rows_per_shard)):
        block = activations[start : start + rows_per_shard].contiguous()
        ids = torch.arange(start, start + block.shape[0], dtype=torch.int64)
        save_file({"activations": block, "token_ids": ids}, str(root / f"shard_{index:03d}.safetensors"))
    return root


def train_cli(arguments: list[str], run_dir: Path, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`crosscoder-train <arguments> hydra.run.dir=<run_dir>` in this process, through its console-script
    function: (exit status, stdout, stderr)."""
    from crosscoder.cli.train import main

    return console_cli(main, ["crosscoder-train", *arguments, f"hydra.run.dir={run_dir}"], monkeypatch, capsys)


def console_cli(main: Callable[[], object], argv: list[str], monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """A console script's function run in this process with `argv` (sys.argv, the program name first):
    (exit status, stdout, stderr), only what the command printed."""
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextlib.contextmanager
def outside_any_launch() -> Iterator[None]:
    """The environment without what a launcher or a run puts there (PROCESS_ENV), restored afterwards: for a
    module-scoped fixture that trains in this process (clean_process_env is per test)."""
    saved = {key: os.environ.pop(key) for key in PROCESS_ENV if key in os.environ}
    try:
        yield
    finally:
        for key in PROCESS_ENV:
            os.environ.pop(key, None)
        os.environ.update(saved)
