"""Snapshot fingerprints: what a snapshot is (config + sampled weight bytes, a hub commit, a planted digest), and
the refusal of saved snapshots that are not the ones named now."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import huggingface_hub
import pytest

from crosscoder.config import SourcesConfig
from crosscoder.data.kinds import describe_sources
from crosscoder.errors import ConfigError
from crosscoder.sources.fingerprint import (
    CHUNK_BYTES,
    HEAD_BYTES,
    check_same_snapshots,
    sampled_regions,
    snapshot_fingerprint,
)
from crosscoder.sources.spec import SnapshotSpec

QUIET = lambda _: None  # noqa: E731


def _local(path: Path, name: str = "step0") -> SnapshotSpec:
    return SnapshotSpec(name=name, path=str(path))


def _edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config, indent=4))


def test_a_local_snapshot_is_its_config_and_weights_not_its_place_or_bookkeeping(
    tiny_snapshots: list, tmp_path: Path
) -> None:
    """Moved, its config re-saved with other key order, `_name_or_path`, transformers version or dtype field name:
    the same fingerprint. A changed config value, or another checkpoint of the same architecture: another."""
    original = tiny_snapshots[0].path
    reference = snapshot_fingerprint(_local(original))
    assert re.fullmatch(r"[0-9a-f]{64}", reference) and snapshot_fingerprint(_local(original)) == reference
    copy = tmp_path / "elsewhere" / "step0"
    shutil.copytree(original, copy)
    assert snapshot_fingerprint(_local(copy, "renamed")) == reference
    config = json.loads((copy / "config.json").read_text())
    dtype = config.pop("dtype", None) or config.pop("torch_dtype", "float32")
    reordered = {"torch_dtype": dtype, "_name_or_path": "/somewhere/else", "transformers_version": "4.0.0",
                 **dict(reversed(config.items()))}
    (copy / "config.json").write_text(json.dumps(reordered))
    assert snapshot_fingerprint(_local(copy)) == reference
    _edit_config(copy, layer_norm_eps=1e-3)
    assert snapshot_fingerprint(_local(copy)) != reference
    # The toy's step 0 and step 4: one architecture, one header layout, other values.
    assert snapshot_fingerprint(_local(tiny_snapshots[1].path)) != reference


def test_a_large_weight_file_is_sampled_at_fixed_regions(tmp_path: Path) -> None:
    """A byte changed in the head, a middle chunk or the tail, or another size: another fingerprint; a byte outside
    every sampled region is not read (the price of reading a few MB per file, not the whole checkpoint)."""
    directory = tmp_path / "big"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    size = 4 * HEAD_BYTES + 12345
    weights = directory / "model.safetensors"
    content = bytes(range(256)) * (size // 256) + bytes(size % 256)
    weights.write_bytes(content)
    reference = snapshot_fingerprint(_local(directory))
    regions = sampled_regions(size)
    assert regions[0] == (0, HEAD_BYTES) and regions[-1] == (size - CHUNK_BYTES, CHUNK_BYTES) and len(regions) == 10
    assert all(a + la <= b for (a, la), (b, _) in zip(regions, regions[1:], strict=False))  # in order, disjoint

    def changed_at(offset: int) -> str:
        altered = bytearray(content)
        altered[offset] ^= 0xFF
        weights.write_bytes(bytes(altered))
        return snapshot_fingerprint(_local(directory))

    for offset in (10, regions[4][0] + 7, size - 1):
        assert changed_at(offset) != reference, offset
    unsampled = regions[1][0] - 1
    assert not any(a <= unsampled < a + length for a, length in regions)
    assert changed_at(unsampled) == reference
    weights.write_bytes(content + b"\0")
    assert snapshot_fingerprint(_local(directory)) != reference
    read = sum(length for _, length in sampled_regions(10 << 30))
    assert read == HEAD_BYTES + 9 * CHUNK_BYTES  # 1.56 MiB of a 10 GiB file


def test_pickled_weight_files_are_hashed_as_bytes_never_unpickled(tmp_path: Path) -> None:
    """A `.bin` that runs code when unpickled is fingerprinted without running it."""
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    first = snapshot_fingerprint(_local(directory))
    assert not marker.exists()
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    assert snapshot_fingerprint(_local(directory)) != first
    (directory / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"snapshot 'step0'.*has no config.json"):
        snapshot_fingerprint(_local(directory))


def _hub_snapshot(cache: Path, repo: str, revision: str, commit: str, config: dict) -> None:
    """A repo in the HF cache layout, config only (no weights): refs/<revision> -> snapshots/<commit>/."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "snapshots" / commit / "config.json").write_text(json.dumps(config))


def test_a_hub_snapshot_is_its_commit_and_config_without_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolved offline from the HF cache: no weights needed; the revision and its commit hash agree; another commit
    (a moved branch, another model) differs even with the same config; nothing cached: a ConfigError naming it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    config = {"model_type": "gpt_neox", "hidden_size": 32, "_name_or_path": "x"}
    commit_a, commit_b = "a" * 40, "b" * 40
    _hub_snapshot(tmp_path, "org/tiny", "step100", commit_a, config)
    _hub_snapshot(tmp_path, "org/other", "step100", commit_b, config)
    by_branch = snapshot_fingerprint(SnapshotSpec("step100", "org/tiny", "step100"))
    assert snapshot_fingerprint(SnapshotSpec("step100", "org/tiny", commit_a)) == by_branch
    assert snapshot_fingerprint(SnapshotSpec("step100", "org/other", "step100")) != by_branch
    with pytest.raises(ConfigError, match=r"cannot fingerprint snapshot 'step9' \('org/tiny' at revision 'step9'\)"):
        snapshot_fingerprint(SnapshotSpec("step9", "org/tiny", "step9"))
    with pytest.raises(ConfigError, match=r"'crosscoder-tests/no-such-model'"):
        snapshot_fingerprint(SnapshotSpec("main", "crosscoder-tests/no-such-model"))


def test_describe_sources_fingerprints_every_snapshot(tiny_snapshots: list) -> None:
    """Local snapshots get their directory fingerprint; planted ones their revision digest."""
    info = describe_sources(SourcesConfig(paths=[str(s.path) for s in tiny_snapshots]), log=QUIET)
    assert [s.fingerprint for s in info.specs] == [snapshot_fingerprint(_local(s.path)) for s in tiny_snapshots]
    assert len({s.fingerprint for s in info.specs}) == 3
    planted = describe_sources(SourcesConfig(kind="planted"), log=QUIET)
    assert all(s.fingerprint == s.revision and s.fingerprint for s in planted.specs)


def test_check_same_snapshots_names_the_first_difference() -> None:
    """Count, name, fingerprint, or no fingerprint at all: each refused naming the snapshot; equal passes, also
    against `asdict(spec)` entries read back from JSON (what a training state saves)."""
    specs = [SnapshotSpec(f"step{i}", "planted", revision=f"digest{i}", step=i, fingerprint=f"digest{i}")
             for i in range(3)]
    saved = json.loads(json.dumps([asdict(spec) for spec in specs]))
    check_same_snapshots(saved, specs, "training state T")
    with pytest.raises(ConfigError, match=r"training state T was made from 2 snapshots \(\['step0', 'step1'\]\), the "
                                          r"sources name 3"):
        check_same_snapshots(saved[:2], specs, "training state T")
    renamed = [dict(saved[0]), {**saved[1], "name": "final"}, saved[2]]
    with pytest.raises(ConfigError, match=r"snapshot 1 is 'final' there but 'step1' in the sources"):
        check_same_snapshots(renamed, specs, "training state T")
    other = [*saved[:2], {**saved[2], "fingerprint": "f" * 64}]
    with pytest.raises(ConfigError, match=r"different snapshot 'step2' \(fingerprint ffffffffffff… there, digest2 "
                                          r"now: its weights or config changed\)"):
        check_same_snapshots(other, specs, "training state T")
    old = [{key: value for key, value in entry.items() if key != "fingerprint"} for entry in saved]
    with pytest.raises(ConfigError, match=r"records snapshot 'step0' without a fingerprint .*rebuild it"):
        check_same_snapshots(old, specs, "training state T")
    # A spec not from describe_sources is fingerprinted on the spot.
    check_same_snapshots(saved, [SnapshotSpec(s.name, s.path, s.revision, s.step) for s in specs], "training state T")
