"""Formats written by crosscoder at commit 8a55f64 (before the package was restructured) still load and resume.

The fixtures in tests/fixtures/legacy/ were made by that commit's entry points (the commands are in its README):
an exported crosscoder dictionary, an exported stack (method=independent), an activation cache, and a run
directory stopped after its step-4 training state (of 8 steps), plus the tiny toy snapshots all of them were made
from. Every test copies what it uses into tmp_path first: nothing is ever written under tests/fixtures.

The fixtures record absolute paths of the machine that made them (/tmp/crosscoder-legacy/...: the snapshots'
`path`, `sources.toy.cache_dir`, `output_dir`); none is needed to load or resume. The toy snapshots are committed
rather than rebuilt because a rebuild is not bit-identical across thread counts or CPUs, and caches and training
states refuse snapshots whose fingerprint (their weight bytes) changed.

The crosscoder imports below are the only ones: the package's module paths change in the restructure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from crosscoder.cli.train import CONF_DIR, train
from crosscoder.data.cache_reader import CacheReader
from crosscoder.dictionary.io import load_decoder_norms, load_dictionary, load_firing_frequency
from crosscoder.dictionary.provenance import run_config_of
from crosscoder.dictionary.stack import load_stack_decoders, read_stack

LEGACY = Path(__file__).resolve().parent.parent / "fixtures" / "legacy"
SNAPSHOTS = ["step0", "step2", "step4"]
D_MODEL, DICT_SIZE = 8, 16
HOOK = "blocks.1.hook_resid_pre"


def copy_fixture(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(LEGACY / name, target)
    return target


def legacy_config(tmp_path: Path, output_dir: Path, *overrides: str):  # noqa: ANN201 (a RunConfig)
    """The run fixture's own command line (its .hydra/overrides.yaml), as its resume command would repeat it,
    with the toy snapshots read from a copy in tmp_path, W&B off, and `overrides` on top."""
    toy = tmp_path / "toy"
    if not toy.exists():
        shutil.copytree(LEGACY / "toy", toy)
    recorded = yaml.safe_load((LEGACY / "run" / ".hydra" / "overrides.yaml").read_text())
    replaced = {"sources.toy.cache_dir", "tracking", "tracking.log_analysis"}  # recorded: tracking=offline
    replaced |= {override.split("=", 1)[0] for override in overrides}
    kept = [override for override in recorded if override.split("=", 1)[0] not in replaced]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose(config_name="config", overrides=[
            *kept, f"sources.toy.cache_dir={toy}", "tracking=disabled", "tracking.log_analysis=false",
            f"output_dir={output_dir}", *overrides])
    return OmegaConf.to_object(composed)


def test_legacy_dictionary_loads_and_reconstructs() -> None:
    folder = LEGACY / "dictionary"
    model, meta = load_dictionary(folder)
    assert meta.source_names == SNAPSHOTS and meta.source_positions == [0, 2, 4] and meta.source_axis == "step"
    assert (meta.hook, meta.d_model, meta.dict_size, meta.activation) == (HOOK, D_MODEL, DICT_SIZE, "relu")
    assert (meta.train_step, meta.tokens_seen, meta.normalization_folded) == (4, 128, True)
    assert len(meta.input_scale) == 3 and meta.training["crosscoder"]["dict_size"] == DICT_SIZE
    assert model.W_enc.shape == (3, D_MODEL, DICT_SIZE) and model.W_dec.shape == (DICT_SIZE, 3, D_MODEL)

    x = torch.randn(32, 3, D_MODEL, generator=torch.Generator().manual_seed(0)) * 10
    with torch.no_grad():
        codes = model.encode(x)
        reconstruction = model.decode(codes)
    assert codes.shape == (32, DICT_SIZE) and reconstruction.shape == x.shape
    assert torch.isfinite(reconstruction).all() and (codes >= 0).all()

    norms = load_decoder_norms(folder)
    assert norms.shape == (DICT_SIZE, 3) and torch.isfinite(norms).all()
    frequency = load_firing_frequency(folder)
    assert frequency is not None and frequency.shape == (DICT_SIZE,)
    assert json.loads((folder / "stream_position.json").read_text())
    assert "step2" in json.dumps(json.loads((folder / "eval.json").read_text()))
    # The analysis re-creates activations from the run configuration recorded in config.json: it still fits.
    recorded = run_config_of(meta)
    assert (recorded.sources.kind, recorded.sources.toy.hidden_size, recorded.crosscoder.dict_size) == ("toy", 8, 16)


def test_legacy_stack_loads() -> None:
    folder = LEGACY / "stack"
    manifest, metas = read_stack(folder)
    assert (manifest.method, manifest.aligned, manifest.names, manifest.steps) == ("independent", "none",
                                                                                   SNAPSHOTS, [0, 2, 4])
    assert [meta.source_names for meta in metas] == [[name] for name in SNAPSHOTS]
    decoders, norms, _ = load_stack_decoders(folder)
    assert decoders.shape == (DICT_SIZE, 3, D_MODEL) and norms.shape == (DICT_SIZE, 3)
    assert torch.isfinite(decoders).all()
    x = torch.randn(16, 1, D_MODEL, generator=torch.Generator().manual_seed(0)) * 10
    for entry in manifest.entries:
        model, meta = load_dictionary(folder / entry.dictionary)
        assert (meta.activation, meta.k, meta.dict_size) == ("topk", 4, DICT_SIZE)
        with torch.no_grad():
            codes = model.encode(x)
            assert torch.isfinite(model.decode(codes)).all()
        assert int((codes > 0).sum(dim=-1).max()) <= 4


def test_legacy_cache_reads_back_verified(tmp_path: Path) -> None:
    """Every shard's token hash and activation checksums verify; rows pair tokens with 3 snapshots' activations."""
    reader = CacheReader(copy_fixture("cache", tmp_path))
    blocks = list(reader.iter_blocks())
    assert len(blocks) == 3 and reader.tokens_per_rank == 355
    assert sum(block.activations.shape[0] for block in blocks) == 355
    for block in blocks:
        assert block.activations.shape[1:] == (3, D_MODEL) and block.activations.dtype == torch.float32
        assert torch.isfinite(block.activations).all()
        assert block.token_ids.shape == (block.activations.shape[0],)


def test_legacy_cache_trains(tmp_path: Path, clean_process_env: None) -> None:
    """The cache is training input: its manifest matches the toy snapshots (fingerprints) and a short run ends."""
    cache = copy_fixture("cache", tmp_path)
    cfg = legacy_config(tmp_path, tmp_path / "out", f"data.cache.dir={cache}", "trainer.total_tokens=96",
                        "trainer.state_every=0")
    result = train(cfg)
    assert result.steps == 3 and result.tokens_seen == 96
    _, meta = load_dictionary(result.dictionary_dir)
    assert meta.source_names == SNAPSHOTS and meta.train_step == 3


def test_legacy_run_resumes_to_completion(tmp_path: Path, clean_process_env: None) -> None:
    """`trainer.resume=<run dir>` continues the stopped run in its own directory from its step-4 state to step 8,
    and ends near the weights the uninterrupted run exported (committed beside it)."""
    run_dir = copy_fixture("run", tmp_path)
    cfg = legacy_config(tmp_path, run_dir, f"trainer.resume={run_dir}")
    result = train(cfg)
    assert result.output_dir.resolve() == run_dir.resolve()
    assert result.steps == 8 and result.tokens_seen == 256
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] == 4
    assert (run_dir / "training_state" / "step_0000008" / "manifest.json").is_file()

    model, meta = load_dictionary(run_dir / "dictionary")
    assert meta.source_names == SNAPSHOTS and (meta.train_step, meta.tokens_seen) == (8, 256)
    expected = load_file(str(LEGACY / "run_final_weights.safetensors"))
    for name, tensor in model.state_dict().items():  # bit-identical here; a step moves them by ~1% of their scale
        got, want = tensor.double(), expected[name].double()  # (`folded` is a bool)
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), f"{name} differs after resuming"

