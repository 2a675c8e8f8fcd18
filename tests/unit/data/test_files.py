"""`sources.kind=files`: a folder of activations computed elsewhere, read back exactly in both formats and both
layouts, split across ranks like the cache, resumed at a shard, and refused (naming the file) when malformed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from crosscoder.config import RunConfig, SourcesConfig
from crosscoder.data.checks import check_inputs
from crosscoder.data.files import FileActivations, describe_file_sources, scan_folder
from crosscoder.data.kinds import count_sources
from crosscoder.errors import ConfigError

NAMES = ["L0", "L2", "L4"]
D = 4
ROWS = (5, 7, 6)
LAYOUTS = [("safetensors", True), ("safetensors", False), ("npy", True), ("npy", False)]


def _data(rows: tuple[int, ...] = ROWS, s: int = len(NAMES)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, s, D, generator=generator) for n in rows]


def _write(root: Path, shards: list[torch.Tensor], fmt: str = "safetensors", stacked: bool = True,
           token_ids: list[torch.Tensor] | None = None, names: list[str] = NAMES) -> Path:
    """A folder in the documented format; shard k holds `shards[k]` [n, S, d] (and `token_ids[k]`)."""
    root.mkdir(parents=True, exist_ok=True)
    sources = [{"name": name, "layer": 2 * i} for i, name in enumerate(names)]
    (root / "sources.json").write_text(json.dumps({"sources": sources, "hook": "resid_pre"}))
    for k, acts in enumerate(shards):
        ids = token_ids[k] if token_ids is not None else None
        label = f"shard_{k:03d}"
        if fmt == "safetensors":
            tensors = {"activations": acts} if stacked else {n: acts[:, i].contiguous() for i, n in enumerate(names)}
            if ids is not None:
                tensors["token_ids"] = ids
            save_file(tensors, str(root / f"{label}.safetensors"))
            continue
        if stacked:
            np.save(root / f"{label}.npy", acts.numpy())
        else:
            for i, name in enumerate(names):
                (root / name).mkdir(exist_ok=True)
                np.save(root / name / f"{label}.npy", acts[:, i].contiguous().numpy())
        if ids is not None:
            np.save(root / f"{label}.token_ids.npy", ids.numpy())
    return root


def _read(root: Path, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    blocks = list(FileActivations(_cfg(root), **kwargs).iter_blocks())
    if not blocks:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), []
    return (torch.cat([b.activations for b in blocks]), torch.cat([b.token_ids for b in blocks]),
            [b.index for b in blocks])


def _cfg(root: Path) -> SourcesConfig:
    cfg = SourcesConfig(kind="files")
    cfg.files.dir = str(root)
    return cfg


@pytest.mark.parametrize(("fmt", "stacked"), LAYOUTS)
def test_every_format_and_layout_reads_back_exactly(tmp_path: Path, fmt: str, stacked: bool) -> None:
    shards = _data()
    ids = [torch.arange(n, dtype=torch.int32) + 1000 * k for k, n in enumerate(ROWS)]
    root = _write(tmp_path / "acts", shards, fmt, stacked, ids)
    activations, token_ids, indices = _read(root)
    assert torch.equal(activations, torch.cat(shards))
    assert activations.dtype == torch.float32
    assert torch.equal(token_ids, torch.cat(ids).long()) and token_ids.dtype == torch.int64
    assert indices == [0, 1, 2]
    info = describe_file_sources(_cfg(root))
    assert [s.name for s in info.specs] == NAMES and [s.layer for s in info.specs] == [0, 2, 4]
    assert {s.path for s in info.specs} == {str(root)} and all(s.revision is None for s in info.specs)
    assert info.d_model == D and info.hook == "resid_pre" and info.tokenizer is None and info.axis == "layer"


@pytest.mark.parametrize(("fmt", "dtype"), [("safetensors", torch.float16), ("safetensors", torch.bfloat16),
                                            ("safetensors", torch.float64), ("npy", torch.float16),
                                            ("npy", torch.float64)])
def test_half_and_double_precision_are_read_as_float32(tmp_path: Path, fmt: str, dtype: torch.dtype) -> None:
    shards = [acts.to(dtype) for acts in _data()]
    activations, _, _ = _read(_write(tmp_path / "acts", shards, fmt))
    assert activations.dtype == torch.float32 and torch.equal(activations, torch.cat(shards).float())


def test_without_token_ids_the_global_row_number_is_the_id(tmp_path: Path) -> None:
    _, token_ids, _ = _read(_write(tmp_path / "acts", _data(), "npy"))
    assert torch.equal(token_ids, torch.arange(sum(ROWS)))


@pytest.mark.parametrize(("fmt", "stacked"), LAYOUTS)
@pytest.mark.parametrize("batch_rows", [0, 3])
def test_two_ranks_read_disjoint_rows_covering_everything(tmp_path: Path, fmt: str, stacked: bool,
                                                          batch_rows: int) -> None:
    shards = _data()
    root = _write(tmp_path / "acts", shards, fmt, stacked)
    full = torch.cat(shards)
    seen = []
    for rank in range(2):
        reader = FileActivations(_cfg(root), rank=rank, world_size=2, batch_rows=batch_rows)
        activations, rows, _ = _read(root, rank=rank, world_size=2, batch_rows=batch_rows)
        assert reader.tokens_per_rank == rows.numel()
        assert torch.equal(activations, full[rows])  # the id is the global row: each row is its own
        if batch_rows:
            assert bool(((rows // batch_rows) % 2 == rank).all())  # global batch order, as CacheReader
        seen.append(rows)
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(torch.cat(seen).tolist()) == list(range(full.shape[0]))


def test_iter_blocks_resumes_at_a_shard(tmp_path: Path) -> None:
    shards = _data()
    reader = FileActivations(_cfg(_write(tmp_path / "acts", shards)))
    assert reader.n_shards == 3 and reader.tokens_from(1) == ROWS[1] + ROWS[2]
    blocks = list(reader.iter_blocks(2))
    assert [b.index for b in blocks] == [2] and torch.equal(blocks[0].activations, shards[2])
    assert torch.equal(blocks[0].token_ids, ROWS[0] + ROWS[1] + torch.arange(ROWS[2]))


@pytest.mark.parametrize(("fmt", "stacked"), LAYOUTS)
def test_a_sources_share_reads_only_its_columns(tmp_path: Path, fmt: str, stacked: bool) -> None:
    shards = _data()
    activations, _, _ = _read(_write(tmp_path / "acts", shards, fmt, stacked), sources=range(1, 3))
    assert torch.equal(activations, torch.cat(shards)[:, 1:3])


def test_fingerprint_changes_when_one_file_changes(tmp_path: Path) -> None:
    shards = _data()
    root = _write(tmp_path / "acts", shards, "npy", stacked=False)
    before = describe_file_sources(_cfg(root)).specs[0].fingerprint
    assert before and before == describe_file_sources(_cfg(root)).specs[0].fingerprint
    moved = root.rename(tmp_path / "moved")
    assert describe_file_sources(_cfg(moved)).specs[0].fingerprint == before  # where it lives is not what it is
    changed = shards[1][:, 2].clone()
    changed[3, 1] += 1.0
    np.save(moved / "L4" / "shard_001.npy", changed.numpy())
    assert describe_file_sources(_cfg(moved)).specs[0].fingerprint != before


def test_nan_is_refused_at_start_up_and_while_reading_naming_file_and_source(tmp_path: Path) -> None:
    shards = _data()
    shards[0][2, 1, 3] = float("nan")
    root = _write(tmp_path / "first", shards, "npy", stacked=False)
    with pytest.raises(ConfigError, match=r"first/L2/shard_000\.npy.*NaN/inf.*'L2'"):
        describe_file_sources(_cfg(root))
    shards = _data()
    shards[2][0, 2, 0] = float("inf")
    root = _write(tmp_path / "later", shards)
    describe_file_sources(_cfg(root))  # only the first shard is read at start-up
    with pytest.raises(ConfigError, match=r"shard_002\.safetensors.*NaN/inf.*'L4'"):
        _read(root)


def _json(root: Path, raw: object) -> None:
    (root / "sources.json").write_text(raw if isinstance(raw, str) else json.dumps(raw))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", r"sources\.json is not valid JSON"),
        ({"sources": []}, r"non-empty list `sources`"),
        ({"sources": [{"layer": 0}]}, r"sources\[0\].*`name`"),
        ({"sources": [{"name": "L0"}, {"name": "L0"}, {"name": "L4"}]}, r"'L0' appears twice"),
        ({"sources": [{"name": "L0", "step": "10"}, {"name": "L2"}, {"name": "L4"}]}, r"'L0' has step='10'"),
    ],
)
def test_a_malformed_sources_json_is_refused(tmp_path: Path, raw: object, message: str) -> None:
    root = _write(tmp_path / "acts", _data())
    _json(root, raw)
    with pytest.raises(ConfigError, match=message):
        scan_folder(root)


def test_a_missing_sources_json_or_no_shards_is_refused(tmp_path: Path) -> None:
    root = _write(tmp_path / "acts", [])
    with pytest.raises(ConfigError, match=r"acts holds no shards"):
        scan_folder(root)
    (root / "sources.json").unlink()
    with pytest.raises(ConfigError, match=r"acts/sources\.json is missing"):
        scan_folder(root)


def test_s_mismatch_wrong_shape_and_wrong_dtype_are_refused_naming_the_file(tmp_path: Path) -> None:
    root = _write(tmp_path / "s", _data(s=2))
    with pytest.raises(ConfigError, match=r"shard_000\.safetensors \(tensor 'activations'\) holds S=2 sources but "
                                          r"sources\.json lists 3"):
        scan_folder(root)
    root = _write(tmp_path / "shape", [torch.zeros(5, 3 * D)], "npy")
    with pytest.raises(ConfigError, match=r"shape/shard_000\.npy has shape \[5, 12\], expected \[n, S, d\]"):
        scan_folder(root)
    root = _write(tmp_path / "dtype", [torch.zeros(5, 3, D, dtype=torch.int32)], "npy", stacked=False)
    with pytest.raises(ConfigError, match=r"dtype/L0/shard_000\.npy \(source 'L0'\) has dtype int32"):
        scan_folder(root)


def test_mismatched_widths_rows_and_token_ids_are_refused(tmp_path: Path) -> None:
    root = _write(tmp_path / "d", [torch.zeros(5, 3, D), torch.zeros(5, 3, D + 1)])
    with pytest.raises(ConfigError, match=r"shard_001\.safetensors has d=5 .* d=4"):
        scan_folder(root)
    root = _write(tmp_path / "n", _data(rows=(5,)), stacked=False)
    save_file({"L0": torch.zeros(5, D), "L2": torch.zeros(4, D), "L4": torch.zeros(5, D)},
              str(root / "shard_000.safetensors"))
    with pytest.raises(ConfigError, match=r"\(source 'L2'\) has 4 rows but .*\(source 'L0'\) has 5"):
        scan_folder(root)
    root = _write(tmp_path / "ids", _data(rows=(5,)), "npy", token_ids=[torch.arange(4)])
    with pytest.raises(ConfigError, match=r"shard_000\.token_ids\.npy is int64 \[4\]; .*shape \[5\]"):
        scan_folder(root)
    root = _write(tmp_path / "idtype", _data(rows=(5,)), token_ids=[torch.zeros(5)])
    with pytest.raises(ConfigError, match=r"tensor 'token_ids'\) is float32 \[5\]"):
        scan_folder(root)
    root = _write(tmp_path / "zero", [torch.zeros(0, 3, D)], "npy")
    with pytest.raises(ConfigError, match=r"zero/shard_000\.npy has zero rows"):
        scan_folder(root)


def test_missing_per_source_tensor_or_file_and_mixed_formats_are_refused(tmp_path: Path) -> None:
    root = _write(tmp_path / "st", _data(rows=(5,)), stacked=False)
    save_file({"L0": torch.zeros(5, D), "L4": torch.zeros(5, D)}, str(root / "shard_000.safetensors"))
    with pytest.raises(ConfigError, match=r"shard_000\.safetensors has no tensor 'activations' and none for "
                                          r"source\(s\) 'L2'"):
        scan_folder(root)
    root = _write(tmp_path / "npy", _data(), "npy", stacked=False)
    (root / "L2" / "shard_001.npy").unlink()
    with pytest.raises(ConfigError, match=r"npy/L2/shard_001\.npy is missing"):
        scan_folder(root)
    root = _write(tmp_path / "mixed", _data(rows=(5,)))
    np.save(root / "extra.npy", np.zeros((5, 3, D), np.float32))
    with pytest.raises(ConfigError, match=r"both \.safetensors and \.npy"):
        scan_folder(root)


def test_a_pickled_npy_is_refused_not_unpickled(tmp_path: Path) -> None:
    root = _write(tmp_path / "acts", [])
    np.save(root / "shard_000.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match=r"shard_000\.npy is not a readable \.npy array"):
        scan_folder(root)


def test_config_requires_an_existing_files_dir(tmp_path: Path) -> None:
    cfg = RunConfig(output_dir=str(tmp_path / "run"))
    cfg.sources.kind = "files"
    with pytest.raises(ConfigError, match=r"sources\.files\.dir=''"):
        check_inputs(cfg)
    cfg.sources.files.dir = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"sources\.files\.dir=.*absent.* is not an existing folder"):
        check_inputs(cfg)
    cfg.sources.files.dir = str(tmp_path)  # a folder, but no sources.json: refused at start-up too
    with pytest.raises(ConfigError, match=r"sources\.json is missing"):
        check_inputs(cfg)
    (tmp_path / "sources.json").write_text(json.dumps({"sources": [{"name": "a"}, {"name": "b"}]}))
    assert check_inputs(cfg) is cfg and count_sources(cfg.sources) == 2


def test_a_corrupt_safetensors_header_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = _write(tmp_path / "acts", _data(rows=(5,)))
    (root / "shard_000.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ConfigError, match=r"shard_000\.safetensors is not a readable safetensors file"):
        scan_folder(root)


def _sparse_sources(n: int, s: int = 3, d: int = 16, features: int = 24, seed: int = 0) -> torch.Tensor:
    """[n, s, d] activations that are sparse sums of planted directions, one direction per feature and source."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(features, s, d, generator=generator), dim=-1)
    active = torch.rand(n, features, generator=generator) < 3 / features
    codes = active * torch.rand(n, features, generator=generator).add(0.5)
    return torch.einsum("nf,fsd->nsd", codes, directions)


@pytest.mark.parametrize(("fmt", "stacked"), [("safetensors", True), ("npy", False)])
def test_a_crosscoder_trains_end_to_end_from_a_folder_of_files(
        tmp_path: Path, fmt: str, stacked: bool, clean_process_env: None) -> None:
    """The real trainer on `sources.kind=files` (safetensors [n, S, d] shards; per-source .npy folders): it learns
    the planted directions, and the export names the files' sources, their layers and the layer axis."""
    from crosscoder.cli.train import train
    from crosscoder.dictionary.io import load_dictionary

    data = _sparse_sources(3 * 2048)
    folder = _write(tmp_path / "acts", list(data.split(2048)), fmt, stacked)
    cfg = RunConfig(output_dir=str(tmp_path / "run"))
    cfg.sources.kind, cfg.sources.files.dir = "files", str(folder)
    cfg.data.shuffle.buffer_tokens = 1024
    cfg.crosscoder.dict_size, cfg.crosscoder.norm_estimation_batches, cfg.crosscoder.l1_coeff = 64, 2, 0.3
    cfg.trainer.batch_size, cfg.trainer.total_tokens, cfg.trainer.lr, cfg.trainer.eval_tokens = 128, 128 * 40, 3e-3, 0
    cfg.deepspeed.zero_stage, cfg.tracking.mode = 0, "disabled"
    result = train(cfg)
    assert result.steps == 40 and result.final_metrics["explained_variance/mean"] > 0.5
    _, meta = load_dictionary(result.dictionary_dir)
    assert meta.source_names == NAMES and meta.source_positions == [0, 2, 4] and meta.source_axis == "layer"
    assert meta.hook == "resid_pre"
    if fmt == "npy":
        return
    # The analysis re-reads the files for latent scaling (they are where the activations live) and reads layers.
    from crosscoder.cli.analyze import main as analyze_main

    analyze_main([str(result.dictionary_dir), "--scaling-tokens", "1024", "--contexts", "0"])
    summary = json.loads((result.dictionary_dir / "analysis" / "summary.json").read_text())
    assert "latent_scaling" in summary
    assert "<h2>Per layer</h2>" in (result.dictionary_dir / "analysis" / "report.html").read_text()
