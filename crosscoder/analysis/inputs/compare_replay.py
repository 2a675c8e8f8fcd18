"""Per-snapshot explained variance and L0 of several dictionaries on one replay of the same activations
(crosscoder-compare).

The activations are re-created once (crosscoder.analysis.inputs.replay) from the first input whose metadata can give
them, and every batch goes through every input's dictionaries, so all inputs are measured on the same tokens:
- a crosscoder takes the whole batch x [B, S, d]; its codes are [B, F] (one L0 for every snapshot) or [B, S, F]
  for a per-snapshot gate (one L0 per snapshot);
- a stack's dictionary for snapshot s takes x[:, s:s+1] ([B, 1, d]) and gives snapshot s's reconstruction and L0.

EV_s = 1 - sum ||x_s - x̂_s||^2 / sum ||x_s - mean x_s||^2 over the replayed tokens (raw activation space: the
exported dictionaries are folded), L0_s = mean number of non-zero codes per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from crosscoder.analysis.inputs.replay import activation_batches, has_activations
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import DictionaryMeta, load_dictionary
from crosscoder.dictionary.stack import read_stack
from crosscoder.errors import ConfigError

CHUNK_ELEMENTS = 1 << 24
"""Bound on rows x S x F of one encode call (the codes of a large dictionary are dense)."""


@dataclass
class ReplaySource:
    """One input's dictionaries, loaded for the replay."""

    models: list[Crosscoder]
    """One crosscoder, or a stack's S single-snapshot dictionaries in snapshot order."""
    stack: bool


@dataclass
class ReplayResult:
    """Per input, [S] EV and L0; `reason` instead when the activations could not be replayed."""

    n_tokens: int
    explained_variance: list[list[float]]
    l0: list[list[float]]
    reason: str | None = None

    def to_json(self) -> dict:
        return {"n_tokens": self.n_tokens, "skipped": self.reason, "explained_variance": self.explained_variance,
                "l0": self.l0}


def replay_meta(path: Path, meta: DictionaryMeta, stack: bool) -> DictionaryMeta:
    """The metadata that re-creates an input's activations: a crosscoder's own; for a stack (`meta` describing it
    as one crosscoder, stack_report.stack_meta) the first dictionary's run configuration, which gives all S
    snapshots when every dictionary trained on one planted problem of S snapshots (replay refuses it otherwise)."""
    if not stack:
        return meta
    _, metas = read_stack(path)
    return replace(meta, training=metas[0].training)


def load_replay_source(path: Path, stack: bool, device: str | torch.device) -> ReplaySource:
    """The dictionaries at `path` (an exported crosscoder or a stack) on `device`, in eval mode."""
    if not stack:
        return ReplaySource(models=[load_dictionary(path, device)[0]], stack=False)
    manifest, _ = read_stack(path)
    return ReplaySource(models=[load_dictionary(path / entry.dictionary, device)[0] for entry in manifest.entries],
                        stack=True)


def replay_source_meta(metas: Iterable[DictionaryMeta]) -> tuple[DictionaryMeta | None, str | None]:
    """The first metadata whose activations can be re-created, or (None, the first one's reason)."""
    reasons = []
    for meta in metas:
        reason = has_activations(meta)
        if reason is None:
            return meta, None
        reasons.append(reason)
    return None, reasons[0] if reasons else "no inputs"


def _l0(codes: torch.Tensor, n_snapshots: int) -> torch.Tensor:
    """[S] summed over the chunk: non-zero codes per token, shared ([B, F]) or per snapshot ([B, S, F])."""
    active = (codes != 0).sum(dim=-1).double()  # [B] or [B, S]
    return active.sum(dim=0).expand(n_snapshots) if active.dim() == 1 else active.sum(dim=0)


@torch.no_grad()
def _errors(source: ReplaySource, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([S] summed squared reconstruction error, [S] summed L0) of one batch x [B, S, d]."""
    n_snapshots = x.shape[1]
    sse = torch.zeros(n_snapshots, dtype=torch.float64, device=x.device)
    l0 = torch.zeros(n_snapshots, dtype=torch.float64, device=x.device)
    for chunk in x.split(rows):
        if source.stack:
            for s, model in enumerate(source.models):
                piece = chunk[:, s:s + 1]
                codes = model.encode(piece)
                sse[s] += (piece - model.decode(codes)).double().pow(2).sum()
                l0[s] += _l0(codes, 1)[0]
        else:
            model = source.models[0]
            codes = model.encode(chunk)
            sse += (chunk - model.decode(codes)).double().pow(2).sum(dim=(0, 2))
            l0 += _l0(codes, n_snapshots)
    return sse, l0


def _skipped(reason: str) -> ReplayResult:
    return ReplayResult(n_tokens=0, explained_variance=[], l0=[], reason=reason)


def replay_metrics(paths: Sequence[Path], metas: Sequence[DictionaryMeta], stacks: Sequence[bool], n_tokens: int,
                   device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> ReplayResult:
    """Per-snapshot EV and L0 of every input (`paths[i]`, described by `metas[i]`, a stack when `stacks[i]`) on
    `n_tokens` tokens replayed once (module docstring); `reason` set instead when no input's activations can be
    re-created or the replay gives none. Every input's dictionaries are held on `device` together."""
    meta, reason = replay_source_meta(replay_meta(*args) for args in zip(paths, metas, stacks, strict=True))
    if meta is None:
        return _skipped(reason or "")
    sources = [load_replay_source(path, stack, device) for path, stack in zip(paths, stacks, strict=True)]
    rows = max(1, CHUNK_ELEMENTS // max(model.n_sources * model.dict_size for s in sources for model in s.models))
    n_snapshots = len(meta.sources)
    sse = torch.zeros(len(sources), n_snapshots, dtype=torch.float64)
    l0 = torch.zeros_like(sse)
    sum_x = torch.zeros(n_snapshots, meta.d_model, dtype=torch.float64)
    sum_sq = torch.zeros(n_snapshots, dtype=torch.float64)
    seen = 0
    log(f"replaying {n_tokens:,} tokens through {len(sources)} inputs")
    try:
        for batch in activation_batches(meta, n_tokens, device, log):
            x = batch.to(device=device, dtype=torch.float32)
            sum_x += x.double().sum(dim=0).cpu()
            sum_sq += x.double().pow(2).sum(dim=(0, 2)).cpu()
            for index, source in enumerate(sources):
                batch_sse, batch_l0 = _errors(source, x, rows)
                sse[index] += batch_sse.cpu()
                l0[index] += batch_l0.cpu()
            seen += x.shape[0]
    except ConfigError as error:  # e.g. snapshots no longer where the run found them
        return _skipped(str(error))
    if seen == 0:
        return _skipped("the replay gave no tokens")
    variance = sum_sq - sum_x.pow(2).sum(dim=1) / seen  # [S] sum ||x_s - mean x_s||^2
    ev = torch.where(variance > 0, 1 - sse / variance.clamp_min(1e-300), torch.nan)
    return ReplayResult(n_tokens=seen, explained_variance=ev.tolist(), l0=(l0 / seen).tolist())
