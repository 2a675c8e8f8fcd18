"""Feature evolution over snapshots: trajectories, emergence, classes, drift, snapshot similarity (no I/O).

Inputs are a decoder W_dec [F, S, d] (only its directions are used) and per-snapshot decoder norms [F, S]
(defaults to ||W_dec[i, s]||). For an exported dictionary pass the normalised-space norms from
decoder_norms.safetensors: the exported W_dec has each snapshot's input scale folded in, which changes its
norms by a per-snapshot factor but leaves every direction, hence every cosine, unchanged.

Rules (tau = EMERGENCE_THRESHOLD):
- trajectory n_i(s) = norm[i, s] / max_s norm[i, s]; all zeros for dead latents.
- dead: max_s norm[i, s] <= DEAD_FLOOR * median over latents of max_s norm, or exactly zero, or in a given mask.
- emergence snapshot: the first s with n_i(s) >= tau (-1 for dead latents). Every live latent has one, since
  its maximum has n = 1, so a latent present from the start emerges at snapshot 0.
- class, for live latents, from the first and last snapshots only: persistent (>= tau at both), emerging
  (below at the first, >= at the last), vanishing (>= at the first, below at the last), transient (below at
  both, so >= only in between). Exactly one class each; dips are not reclassified but counted in `segments`,
  the number of maximal runs of snapshots with n >= tau (1 for a clean trajectory).
- drift: cosine of a latent's decoder directions between consecutive snapshots [F, S-1] and against the last
  snapshot [F, S]; NaN where either vector is (numerically, <= ZERO_NORM) zero and for dead latents, because a
  zero vector has no direction. Per-latent summaries only look at snapshots where the latent is present
  (n >= tau): `min_present_cosine` (its sharpest single-step turn) and `lifetime_cosine` (first vs last present
  snapshot), since before emergence a small decoder's direction is mostly noise.
- snapshot similarity sim[s, t] = sum_i norm[i,s] norm[i,t] cos_i(s,t) / sum_i norm[i,s] norm[i,t] over live
  latents: the norm-weighted mean cosine of each latent's decoder at s and t (1 on the diagonal and for
  identical snapshots), so large features dominate and near-absent ones, whose direction is noise, do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

EMERGENCE_THRESHOLD = 0.5
"""A latent counts as present at a snapshot when its decoder norm is at least this fraction of its maximum."""
DEAD_FLOOR = 1e-3
"""A latent is dead when its largest decoder norm is at most this fraction of the dictionary's median."""
ZERO_NORM = 1e-12
"""Vectors at most this long have no direction (cosines involving them are NaN)."""

PERSISTENT, EMERGING, VANISHING, TRANSIENT, DEAD = "persistent", "emerging", "vanishing", "transient", "dead"
CLASSES = (PERSISTENT, EMERGING, VANISHING, TRANSIENT, DEAD)
"""Class names; `classify` returns indices into this tuple."""
_CHUNK = 4096  # latents per block in the [chunk, S, d] cosine computations, to bound temporary memory


def normalized_trajectories(norms: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """[F, S] n_i(s) = norm[i, s] / max_s norm[i, s]; zero rows for dead (or all-zero) latents."""
    norms = norms.float()
    peak = norms.amax(dim=1, keepdim=True)
    traj = torch.where(peak > 0, norms / peak.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))
    if dead is not None:
        traj[dead] = 0.0
    return traj


def dead_latents(norms: torch.Tensor, dead_mask: torch.Tensor | None = None, floor: float = DEAD_FLOOR) -> torch.Tensor:
    """[F] bool: peak norm <= floor * median peak norm, or zero, or set in `dead_mask`."""
    peak = norms.float().amax(dim=1)
    dead = (peak <= floor * peak.median()) | (peak <= 0)
    if dead_mask is not None:
        dead = dead | dead_mask.to(dead.device, torch.bool)
    return dead


def emergence_snapshots(traj: torch.Tensor, threshold: float = EMERGENCE_THRESHOLD) -> torch.Tensor:
    """[F] long: first snapshot with n_i(s) >= threshold, -1 where there is none (dead latents)."""
    above = traj >= threshold
    first = above.int().argmax(dim=1)  # argmax returns the first maximal index
    return torch.where(above.any(dim=1), first, torch.full_like(first, -1))


def emergence_steps(emergence: torch.Tensor, steps: list[int | None] | None) -> list[int | None]:
    """Training step of each latent's emergence snapshot; None when dead or the snapshot's step is unknown."""
    if steps is None:
        return [None] * len(emergence)
    return [steps[s] if s >= 0 else None for s in emergence.tolist()]


def classify(traj: torch.Tensor, dead: torch.Tensor, threshold: float = EMERGENCE_THRESHOLD) -> torch.Tensor:
    """[F] long indices into CLASSES, from presence at the first and last snapshots (see the module rules)."""
    first, last = traj[:, 0] >= threshold, traj[:, -1] >= threshold
    labels = torch.full((traj.shape[0],), CLASSES.index(TRANSIENT), dtype=torch.long)
    labels[first & last] = CLASSES.index(PERSISTENT)
    labels[~first & last] = CLASSES.index(EMERGING)
    labels[first & ~last] = CLASSES.index(VANISHING)
    labels[dead] = CLASSES.index(DEAD)
    return labels


def presence_segments(traj: torch.Tensor, threshold: float = EMERGENCE_THRESHOLD) -> torch.Tensor:
    """[F] long: number of maximal runs of snapshots with n >= threshold (0 for dead, 1 without dips)."""
    above = (traj >= threshold).int()
    starts = above[:, :1].sum(dim=1) + (above[:, 1:] > above[:, :-1]).sum(dim=1)
    return starts.long()


def _directions(w_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit decoder vectors [F, S, d] (zero where the vector is) and a [F, S] mask of vectors with a direction."""
    w = w_dec.float()
    norm = w.norm(dim=-1)
    has_direction = norm > ZERO_NORM
    return w / norm.clamp_min(ZERO_NORM)[..., None] * has_direction[..., None], has_direction


def consecutive_cosine(w_dec: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """[F, S-1] cos(W_dec[i, s], W_dec[i, s+1]); NaN where undefined (see module rules)."""
    out = torch.empty(w_dec.shape[0], w_dec.shape[1] - 1)
    for start in range(0, w_dec.shape[0], _CHUNK):
        unit, ok = _directions(w_dec[start:start + _CHUNK])
        cos = (unit[:, :-1] * unit[:, 1:]).sum(dim=-1)
        out[start:start + _CHUNK] = torch.where(ok[:, :-1] & ok[:, 1:], cos, torch.nan)
    if dead is not None:
        out[dead] = torch.nan
    return out


def cosine_to_last(w_dec: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """[F, S] cos(W_dec[i, s], W_dec[i, S-1]) (last column 1); NaN where undefined."""
    out = torch.empty(w_dec.shape[:2])
    for start in range(0, w_dec.shape[0], _CHUNK):
        unit, ok = _directions(w_dec[start:start + _CHUNK])
        cos = (unit * unit[:, -1:]).sum(dim=-1)
        out[start:start + _CHUNK] = torch.where(ok & ok[:, -1:], cos, torch.nan)
    if dead is not None:
        out[dead] = torch.nan
    return out


def snapshot_similarity(w_dec: torch.Tensor, norms: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """[S, S] norm-weighted mean decoder cosine between snapshots over live latents (see module rules)."""
    live = ~dead if dead is not None else torch.ones(w_dec.shape[0], dtype=torch.bool)
    n_snap = w_dec.shape[1]
    numerator = torch.zeros(n_snap, n_snap, dtype=torch.float64)
    denominator = torch.zeros(n_snap, n_snap, dtype=torch.float64)
    for start in range(0, w_dec.shape[0], _CHUNK):
        keep = live[start:start + _CHUNK]
        unit, ok = _directions(w_dec[start:start + _CHUNK][keep])
        weight = norms[start:start + _CHUNK][keep].float() * ok  # no direction: no weight
        vectors = unit * weight[..., None]
        numerator += torch.einsum("fsd,ftd->st", vectors, vectors).double()
        denominator += (weight.T @ weight).double()
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.nan).float()


def emergence_counts(emergence: torch.Tensor, n_snapshots: int) -> torch.Tensor:
    """[S] number of live latents whose emergence snapshot is s."""
    return torch.bincount(emergence[emergence >= 0], minlength=n_snapshots)


def min_present_cosine(consecutive: torch.Tensor, traj: torch.Tensor, threshold: float = EMERGENCE_THRESHOLD
                       ) -> torch.Tensor:
    """[F] smallest consecutive cosine over transitions with n >= threshold at both ends (NaN if none): the
    largest single-step turn of the feature while it exists."""
    if consecutive.shape[1] == 0:
        return torch.full((traj.shape[0],), torch.nan)
    both = (traj[:, :-1] >= threshold) & (traj[:, 1:] >= threshold) & ~consecutive.isnan()
    smallest = torch.where(both, consecutive, torch.inf).amin(dim=1)
    return torch.where(torch.isinf(smallest), torch.nan, smallest)


def lifetime_cosine(w_dec: torch.Tensor, traj: torch.Tensor, threshold: float = EMERGENCE_THRESHOLD
                    ) -> torch.Tensor:
    """[F] cosine between the decoder at the first and at the last snapshot with n >= threshold: the total
    drift over the feature's life (1 when present at one snapshot only, NaN for dead latents)."""
    present = traj >= threshold
    idx = torch.arange(traj.shape[1]).expand_as(traj)
    first = torch.where(present, idx, traj.shape[1] - 1).amin(dim=1)
    last = torch.where(present, idx, 0).amax(dim=1)
    rows = torch.arange(traj.shape[0])
    unit, ok = _directions(torch.stack([w_dec[rows, first], w_dec[rows, last]], dim=1))
    cos = (unit[:, 0] * unit[:, 1]).sum(dim=-1)
    return torch.where(ok.all(dim=1) & present.any(dim=1), cos, torch.nan)


AXIS_NOUNS = {"step": "snapshot", "layer": "layer", "hook": "hook", "source": "source"}
"""What one position of the source axis is called in labels, by `SourceInfo.axis` (crosscoder.sources.models)."""


@dataclass
class Evolution:
    """Everything `analyze_evolution` computes for one dictionary; F latents, S snapshots."""

    names: list[str]
    """Snapshot names [S]."""
    steps: list[int | None]
    """Training step of each snapshot [S] (None when unknown)."""
    norms: torch.Tensor
    """[F, S] decoder norms the trajectories come from."""
    trajectories: torch.Tensor
    """[F, S] n_i(s)."""
    dead: torch.Tensor
    """[F] bool."""
    classes: torch.Tensor
    """[F] indices into CLASSES."""
    emergence: torch.Tensor
    """[F] emergence snapshot, -1 for dead latents."""
    segments: torch.Tensor
    """[F] runs of presence (n >= threshold); > 1 means the feature dipped and came back."""
    consecutive_cos: torch.Tensor
    """[F, S-1] decoder cosine between consecutive snapshots."""
    cos_to_last: torch.Tensor
    """[F, S] decoder cosine against the last snapshot."""
    min_present_cos: torch.Tensor
    """[F] see `min_present_cosine`."""
    lifetime_cos: torch.Tensor
    """[F] see `lifetime_cosine`."""
    similarity: torch.Tensor
    """[S, S] snapshot similarity."""
    threshold: float = EMERGENCE_THRESHOLD
    axis: str = "step"
    """What the sources are: `step` (snapshots; `steps` are training steps), `layer` (`steps` are block indices),
    `hook` or `source` (crosscoder.sources.models.source_axis)."""

    @property
    def noun(self) -> str:
        """What one source is called in labels: snapshot, layer, hook or source."""
        return AXIS_NOUNS.get(self.axis, "source")

    @property
    def emergence_step(self) -> list[int | None]:
        return emergence_steps(self.emergence, self.steps)

    @property
    def emergence_counts(self) -> torch.Tensor:
        return emergence_counts(self.emergence, len(self.names))

    def median_drift(self) -> list[float]:
        """[S-1] median (the lower one for an even count) consecutive cosine per transition over latents present
        at both ends; NaN where there are none."""
        present = self.trajectories >= self.threshold
        both = present[:, :-1] & present[:, 1:]
        return torch.where(both, self.consecutive_cos, torch.nan).nanmedian(dim=0).values.tolist()

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.classes, minlength=len(CLASSES)).tolist()
        return dict(zip(CLASSES, counts, strict=True))

    def emergence_counts_by_class(self) -> dict[str, list[int]]:
        """Per live class, the [S] emergence counts of its latents."""
        return {name: emergence_counts(self.emergence[self.classes == i], len(self.names)).tolist()
                for i, name in enumerate(CLASSES) if name != DEAD}


def analyze_evolution(
    w_dec: torch.Tensor,
    norms: torch.Tensor | None = None,
    *,
    names: list[str] | None = None,
    steps: list[int | None] | None = None,
    dead_mask: torch.Tensor | None = None,
    threshold: float = EMERGENCE_THRESHOLD,
    axis: str = "step",
) -> Evolution:
    """All evolution metrics of a decoder [F, S, d]; `norms` [F, S] defaults to the decoder's own norms; `axis`
    says what the sources are (`Evolution.axis`), `steps` then being training steps or layers."""
    with torch.no_grad():
        w_dec = w_dec.detach().cpu()
        norms = (w_dec.float().norm(dim=-1) if norms is None else norms.detach().cpu().float())
        if norms.shape != w_dec.shape[:2]:
            raise ValueError(f"norms {list(norms.shape)} do not match decoder {list(w_dec.shape)}")
        n_snap = w_dec.shape[1]
        names = list(names) if names is not None else [f"snapshot {s}" for s in range(n_snap)]
        steps = list(steps) if steps is not None else [None] * n_snap
        if len(names) != n_snap or len(steps) != n_snap:
            raise ValueError(f"{len(names)} names and {len(steps)} steps for {n_snap} snapshots")
        dead = dead_latents(norms, dead_mask)
        traj = normalized_trajectories(norms, dead)
        consecutive = consecutive_cosine(w_dec, dead)
        return Evolution(
            names=names, steps=steps, norms=norms, trajectories=traj, dead=dead,
            classes=classify(traj, dead, threshold), emergence=emergence_snapshots(traj, threshold),
            segments=presence_segments(traj, threshold), consecutive_cos=consecutive,
            cos_to_last=cosine_to_last(w_dec, dead), min_present_cos=min_present_cosine(consecutive, traj, threshold),
            lifetime_cos=lifetime_cosine(w_dec, traj, threshold), similarity=snapshot_similarity(w_dec, norms, dead),
            axis=axis,
            threshold=threshold,
        )


def table_cells(values: torch.Tensor) -> list[list[float | None]]:
    """Float table cells, rounded to 6 decimals (vectorised: tables have F x S cells); NaN becomes None (empty in
    CSV, null in JSON and W&B)."""
    rounded = (values.double() * 1e6).round() / 1e6
    return [[None if math.isnan(v) else v for v in row] for row in rounded.tolist()]


@dataclass
class FeatureTable:
    """Per-latent rows; `wandb.Table(columns=table.columns, data=table.rows)` works as is."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def feature_table(evo: Evolution, include_dead: bool = True) -> FeatureTable:
    """One row per latent: index, class, emergence snapshot and step, peak norm, segments, drift summary, and
    the trajectory n_i(s) as one `n@<snapshot>` column per snapshot (flat, so W&B and CSV can take it)."""
    columns = ["feature", "class", "emergence_snapshot", "emergence_name", "emergence_step", "peak_norm",
               "segments", "min_present_cos", "lifetime_cos", *[f"n@{name}" for name in evo.names]]
    table = FeatureTable(columns=columns)
    steps = evo.emergence_step
    floats = table_cells(torch.cat([evo.norms.amax(dim=1, keepdim=True), evo.min_present_cos[:, None],
                               evo.lifetime_cos[:, None], evo.trajectories], dim=1))
    classes, emergence, segments, dead = (t.tolist() for t in (evo.classes, evo.emergence, evo.segments, evo.dead))
    for i, (peak, min_cos, life_cos, *traj) in enumerate(floats):
        if dead[i] and not include_dead:
            continue
        snapshot = emergence[i] if emergence[i] >= 0 else None
        table.rows.append([i, CLASSES[classes[i]], snapshot, None if snapshot is None else evo.names[snapshot],
                           steps[i], peak, segments[i], min_cos, life_cos, *traj])
    return table
