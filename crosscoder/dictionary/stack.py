"""A stack: one single-snapshot dictionary per snapshot, in snapshot order (issue 14's methods that train no
crosscoder: independent SAEs per snapshot, SAE-Track chains, and SAE Match's aligned copies of either).

On disk a stack is a folder holding `stack.json` (STACK_MANIFEST_FILE, written last and atomically, so a folder
without it is incomplete) and one dictionary folder per snapshot in the exported format of crosscoder.dictionary.io
(S = 1 each: config.json, weights.safetensors, decoder_norms.safetensors). Latent i of one dictionary is the
same feature as latent i of the next when `aligned` says so: `warm_start` (SAE-Track: each dictionary continues
the previous one's weights) or `sae_match` (permuted by crosscoder-match); `none` (independent dictionaries:
latent indices mean nothing across snapshots until matched).

`load_stack_decoders` assembles what the evolution analysis reads from a crosscoder, W_dec [F, S, d] and the
decoder norms [F, S] in each snapshot's normalised space, so a stack is analysed exactly as a crosscoder is.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from crosscoder.constants import DECODER_NORMS_FILE, WEIGHTS_FILE
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary, read_meta, read_tensors
from crosscoder.errors import DictionaryError
from crosscoder.storage import building_dir, write_text_atomic

STACK_MANIFEST_FILE = "stack.json"
STACK_FORMAT_VERSION = 1
METHODS = ("independent", "sae_track")
ALIGNMENTS = ("none", "warm_start", "sae_match")


@dataclass
class StackEntry:
    """One snapshot's dictionary in the stack."""

    name: str
    """The snapshot's name (its source name in the dictionary's config.json)."""
    dictionary: str
    """The dictionary folder, relative to the stack folder."""
    step: int | None = None
    """The snapshot's training step, when known."""
    train_steps: int = 0
    """Optimiser steps this dictionary trained for (SAE-Track: this link of the chain only)."""


@dataclass
class StackManifest:
    method: str
    """How the dictionaries were trained: `independent` or `sae_track`."""
    aligned: str
    """Why latent i is the same feature across the stack: `none`, `warm_start` or `sae_match` (ALIGNMENTS)."""
    entries: list[StackEntry]
    """In snapshot (training) order."""
    hook: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    """Method-specific provenance (SAE-Track's per-link budgets and learning rates, SAE Match's quality, ...)."""
    format_version: int = STACK_FORMAT_VERSION

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    @property
    def steps(self) -> list[int | None]:
        return [entry.step for entry in self.entries]


def write_stack_manifest(stack_dir: str | Path, manifest: StackManifest) -> Path:
    """stack.json, after checking every entry's dictionary is there: written last, the stack's completion mark."""
    stack_dir = Path(stack_dir)
    check_manifest(manifest)
    for entry in manifest.entries:
        _check_dictionary(stack_dir, entry)
    path = stack_dir / STACK_MANIFEST_FILE
    write_text_atomic(path, json.dumps(asdict(manifest), indent=2))
    return path


def entry_folder(index: int, name: str) -> str:
    """A stack entry's folder name: its position and its snapshot's name, kept to safe characters."""
    return f"{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def export_stack(states: list[dict[str, torch.Tensor]], metas: list[DictionaryMeta], out_dir: str | Path,
                 manifest: StackManifest, firing_frequencies: list[torch.Tensor | None] | None = None,
                 extra_files: dict[str, str] | None = None) -> Path:
    """A complete stack folder at `out_dir` (replacing an older one, as export_dictionary does): each snapshot's
    full state exported under its entry's folder, then stack.json, all in a hidden sibling renamed into place.
    `extra_files` (name -> text) go into every entry's folder (the stream positions its evaluation reads).
    A NaN anywhere raises DictionaryError before the old stack is touched."""
    out_dir = Path(out_dir)
    with building_dir(out_dir) as tmp:
        frequencies = firing_frequencies or [None] * len(states)
        for entry, state, meta, frequency in zip(manifest.entries, states, metas, frequencies, strict=True):
            export_dictionary(state, meta, tmp / entry.dictionary, extra_files, firing_frequency=frequency)
        write_stack_manifest(tmp, manifest)
    return out_dir


def check_manifest(manifest: StackManifest) -> None:
    if manifest.method not in METHODS:
        raise DictionaryError(f"stack method {manifest.method!r} is not one of {list(METHODS)}")
    if manifest.aligned not in ALIGNMENTS:
        raise DictionaryError(f"stack alignment {manifest.aligned!r} is not one of {list(ALIGNMENTS)}")
    if len(manifest.entries) < 2:
        raise DictionaryError(f"a stack needs at least 2 snapshots, got {len(manifest.entries)}")
    names = manifest.names
    if len(set(names)) != len(names):
        raise DictionaryError(f"stack snapshot names repeat: {names}")


def is_stack(path: str | Path) -> bool:
    return (Path(path) / STACK_MANIFEST_FILE).is_file()


def stack_members(stack_dir: str | Path) -> list[Path]:
    """The stack's dictionary folders, in snapshot order (read_stack's checks first)."""
    manifest, _ = read_stack(stack_dir)
    return [Path(stack_dir) / entry.dictionary for entry in manifest.entries]


def read_stack(stack_dir: str | Path) -> tuple[StackManifest, list[DictionaryMeta]]:
    """The manifest and each entry's dictionary metadata, checked: every dictionary present, single-snapshot,
    named as its entry, and all of one width and size (DictionaryError naming the file otherwise)."""
    stack_dir = Path(stack_dir)
    path = stack_dir / STACK_MANIFEST_FILE
    if not path.is_file():
        raise DictionaryError(f"{stack_dir} is not a dictionary stack: {STACK_MANIFEST_FILE} is missing "
                              "(an unfinished stack has none)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        manifest = StackManifest(**{**raw, "entries": [StackEntry(**entry) for entry in raw["entries"]]})
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise DictionaryError(f"{path} is truncated or not a stack manifest ({error})") from error
    if manifest.format_version > STACK_FORMAT_VERSION:
        raise DictionaryError(f"{path} has stack format {manifest.format_version}; this version reads up to "
                              f"{STACK_FORMAT_VERSION}")
    check_manifest(manifest)
    metas = [_check_dictionary(stack_dir, entry) for entry in manifest.entries]
    shapes = {(meta.d_model, meta.dict_size) for meta in metas}
    if len(shapes) != 1:
        raise DictionaryError(f"the stack {stack_dir} mixes dictionary shapes (d_model, dict_size) {sorted(shapes)}")
    return manifest, metas


def _check_dictionary(stack_dir: Path, entry: StackEntry) -> DictionaryMeta:
    folder = stack_dir / entry.dictionary
    meta = read_meta(folder)
    if len(meta.sources) != 1:
        raise DictionaryError(f"{folder} spans {len(meta.sources)} snapshots; a stack holds one per dictionary")
    if meta.source_names[0] != entry.name:
        raise DictionaryError(f"{folder} is the dictionary of snapshot {meta.source_names[0]!r}, but the stack "
                              f"lists it as {entry.name!r}")
    return meta


def load_stack_decoders(stack_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, StackManifest]:
    """(W_dec [F, S, d] in each snapshot's normalised space, decoder norms [F, S], the manifest): the stack laid
    out as one crosscoder's decoder would be. Exported weights are folded (W_dec / c_s), so they are multiplied
    back by each dictionary's input scale, the space its decoder_norms.safetensors is in."""
    stack_dir = Path(stack_dir)
    manifest, metas = read_stack(stack_dir)
    decoders, norms = [], []
    for entry, meta in zip(manifest.entries, metas, strict=True):
        folder = stack_dir / entry.dictionary
        w_dec = read_tensors(folder / WEIGHTS_FILE, ["W_dec"])["W_dec"]  # [F, 1, d], folded
        decoders.append(w_dec[:, 0] * meta.input_scale[0])
        norms.append(read_tensors(folder / DECODER_NORMS_FILE, ["decoder_norms"])["decoder_norms"][:, 0])
    return torch.stack(decoders, dim=1), torch.stack(norms, dim=1), manifest
