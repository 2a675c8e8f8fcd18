"""Planted ground truth: synthetic paired activations for S snapshots from a dictionary whose history is known.

Each planted feature i has a unit direction u[i, s] per snapshot (fixed, or turning smoothly across snapshots)
and a magnitude profile over snapshots by kind: persistent (on everywhere), emerging (off, then on from t),
vanishing (on until t, then off) or transient (on only on an interior window [t0, t1)). A token switches each
feature on independently and gives it a positive coefficient c ~ U[0.5, 1.5]; x_s = sum_i c_i D[i, s] + noise.

Normalised space: the trainer scales each snapshot to E||x_s||^2 = d and the analysis reads decoder norms
there, so the truth is stored in that space. Snapshot s is scaled by g_s, computed analytically so that
E||x_s||^2 = d exactly in expectation (the estimated input scale is then ~1), and `decoder` / `magnitudes`
already include g_s. Without it, snapshots with fewer live features would be blown up by the normalisation and
the planted magnitudes would stop being what the learned decoder norms should show.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from crosscoder.config import PlantedSourceConfig, SourcesConfig
from crosscoder.data.activations import ActivationBlock
from crosscoder.sources.spec import SYNTHETIC_PATH, SnapshotSpec

EMERGENCE_THRESHOLD = 0.5
"""A feature has emerged at the first snapshot s where magnitude[s] / max_s magnitude[s] >= this (the analysis
applies the same rule to learned decoder norms)."""
KINDS = ("persistent", "emerging", "vanishing", "transient")
HELD_OUT_BATCH_TOKENS = 4096
"""Rows per held-out draw (`held_out_draws`)."""
HELD_OUT_SEED = 0x5CA1E
"""Added to the planted seed for the analysis draws (training blocks use sha256-derived seeds of their own)."""
COEFF_LOW, COEFF_HIGH = 0.5, 1.5
"""An active feature's coefficient is uniform on [COEFF_LOW, COEFF_HIGH] (mean 1)."""


@dataclass
class PlantedTruth:
    """The planted dictionary, in the normalised space (E||x_s||^2 = d) the crosscoder is trained in."""

    decoder: torch.Tensor
    """[F_true, S, d] true per-snapshot decoder vectors: unit direction * magnitude."""
    magnitudes: torch.Tensor
    """[F_true, S] ||decoder[i, s]|| (profile * snapshot scale); 0 where the feature is off."""
    kinds: list[str]
    """Kind of each feature: persistent | emerging | vanishing | transient."""
    emergence: torch.Tensor
    """[F_true] int64 emergence snapshot by `emergence_index` (0 for persistent and vanishing features)."""
    profiles: torch.Tensor
    """[F_true, S] the planned on/off profile (1 on, 0 off) before the snapshot scale."""
    directions: torch.Tensor
    """[F_true, S, d] unit direction of each feature at each snapshot (defined where it is off, too)."""
    rotating: torch.Tensor
    """[F_true] bool, features whose direction turns across snapshots."""
    snapshot_scale: torch.Tensor
    """[S] g_s, the factor that brings snapshot s to E||x_s||^2 = d."""
    active_prob: float
    """Probability that a feature is on in a token (active_per_token / F_true)."""
    noise_std: float
    """Std of the Gaussian noise per coordinate, in the normalised space."""


def emergence_index(magnitudes: torch.Tensor, threshold: float = EMERGENCE_THRESHOLD) -> torch.Tensor:
    """[..., S] norms -> [...] int64: first s with norm_s / max_s norm_s >= threshold (0 for an all-zero row)."""
    ratio = magnitudes / magnitudes.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return (ratio >= threshold).to(torch.uint8).argmax(dim=-1)


def _kind_counts(cfg: PlantedSourceConfig) -> list[int]:
    """Features per kind: shares * F_true rounded by largest remainder, so the counts sum to F_true."""
    shares = [cfg.persistent_share, cfg.emerging_share, cfg.vanishing_share, cfg.transient_share]
    exact = [share / sum(shares) * cfg.n_features for share in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(KINDS)), key=lambda k: counts[k] - exact[k])
    for k in by_remainder[: cfg.n_features - sum(counts)]:
        counts[k] += 1
    return counts


def _profiles(cfg: PlantedSourceConfig, kinds: list[str], gen: torch.Generator) -> torch.Tensor:
    """[F, S] 0/1 profiles: clean steps, so the 0.5 crossing (the emergence snapshot) is unambiguous."""
    n_s = cfg.n_snapshots
    snapshots = torch.arange(n_s)
    profiles = torch.zeros(len(kinds), n_s, dtype=torch.float64)
    n_steps = {kind: 0 for kind in KINDS}  # emerging / vanishing steps cycle through 1..S-1: balanced over time
    for i, kind in enumerate(kinds):
        if kind == "persistent":
            profiles[i] = 1
        elif kind in ("emerging", "vanishing"):
            t = 1 + n_steps[kind] % (n_s - 1)
            n_steps[kind] += 1
            profiles[i] = (snapshots >= t) if kind == "emerging" else (snapshots < t)
        else:
            t0 = int(torch.randint(1, n_s - 1, (), generator=gen))
            t1 = int(torch.randint(t0 + 1, n_s, (), generator=gen))
            profiles[i] = (snapshots >= t0) & (snapshots < t1)
    return profiles


def _directions(cfg: PlantedSourceConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, S, d] unit directions and [F] rotating mask; a rotating one turns at a constant rate in a plane."""
    n_f, n_s, d = cfg.n_features, cfg.n_snapshots, cfg.d_model
    start = torch.randn(n_f, d, generator=gen, dtype=torch.float64)
    start = start / start.norm(dim=-1, keepdim=True)
    other = torch.randn(n_f, d, generator=gen, dtype=torch.float64)
    other = other - (other * start).sum(-1, keepdim=True) * start  # orthogonal to start
    other = other / other.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rotating = torch.zeros(n_f, dtype=torch.bool)
    rotating[torch.randperm(n_f, generator=gen)[: round(cfg.rotation_fraction * n_f)]] = True
    # Angle grows linearly from 0 to arccos(rotation_cosine), so cos(first, last) = rotation_cosine exactly.
    angle = math.acos(cfg.rotation_cosine) * torch.arange(n_s, dtype=torch.float64) / (n_s - 1)
    angle = angle[None, :, None] * rotating[:, None, None]
    return torch.cos(angle) * start[:, None] + torch.sin(angle) * other[:, None], rotating


def planted_truth(cfg: PlantedSourceConfig) -> PlantedTruth:
    """The planted dictionary of `cfg`, deterministic from cfg.seed."""
    cfg.validate()
    gen = torch.Generator().manual_seed(cfg.seed)
    kinds = [kind for kind, count in zip(KINDS, _kind_counts(cfg), strict=True) for _ in range(count)]
    profiles = _profiles(cfg, kinds, gen)
    directions, rotating = _directions(cfg, gen)
    raw = profiles[:, :, None] * directions
    # Signal y_s = sum_i a_i raw[i, s] with a_i = on_i * c_i independent across features, so
    # E||y_s||^2 = Var(a) sum_i ||raw_is||^2 + E[a]^2 ||sum_i raw_is||^2 (positive codes give y_s a mean).
    p = cfg.active_per_token / cfg.n_features
    mean_a = p * (COEFF_LOW + COEFF_HIGH) / 2
    mean_a2 = p * (COEFF_LOW**2 + COEFF_LOW * COEFF_HIGH + COEFF_HIGH**2) / 3
    signal_energy = (mean_a2 - mean_a**2) * profiles.pow(2).sum(0) + mean_a**2 * raw.sum(0).pow(2).sum(-1)
    if (signal_energy <= 0).any():
        empty = (signal_energy <= 0).nonzero().flatten().tolist()
        raise ValueError(f"snapshots {empty} have no live planted feature; change the kind shares")
    # Noise energy is noise^2 * signal energy, so E||x_s||^2 = (1 + noise^2) * signal energy before scaling.
    scale = (cfg.d_model / ((1 + cfg.noise**2) * signal_energy)).sqrt()
    decoder = raw * scale[None, :, None]
    magnitudes = profiles * scale[None, :]
    return PlantedTruth(
        decoder=decoder.float(), magnitudes=magnitudes.float(), kinds=kinds, emergence=emergence_index(magnitudes),
        profiles=profiles.float(), directions=directions.float(), rotating=rotating, snapshot_scale=scale.float(),
        active_prob=p, noise_std=cfg.noise / math.sqrt(1 + cfg.noise**2),
    )


def sample_tokens(truth: PlantedTruth, n_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [n, F_true], activations [n, S, d]) float32: sparse positive codes through the planted decoder."""
    n_f, n_s, d = truth.decoder.shape
    on = torch.rand(n_tokens, n_f, generator=gen) < truth.active_prob
    codes = (COEFF_LOW + (COEFF_HIGH - COEFF_LOW) * torch.rand(n_tokens, n_f, generator=gen)) * on
    activations = (codes @ truth.decoder.reshape(n_f, n_s * d)).view(n_tokens, n_s, d)
    activations += truth.noise_std * torch.randn(n_tokens, n_s, d, generator=gen)
    return codes, activations


def _block_seed(seed: int, global_block: int) -> int:
    """A 63-bit seed per (cfg.seed, global block), independent of the seed the dictionary is drawn with."""
    digest = hashlib.sha256(f"planted-block:{seed}:{global_block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def planted_blocks(
    cfg: PlantedSourceConfig, rank: int, world_size: int, start: int = 0, block_tokens: int = 2048
) -> Iterator[ActivationBlock]:
    """Endless stream of this rank's blocks, from block `start` on.

    Block j of rank r is global block g = j * world_size + r, drawn from a generator seeded by (cfg.seed, g)
    alone: a stream restarted at `start` continues exactly, ranks never share rows, and the ranks' blocks
    together are the one-rank stream. token_ids are global row numbers g * block_tokens + (0..n-1), not
    vocabulary ids: unique per row, so alignment checks still mean something.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if start < 0 or block_tokens <= 0:
        raise ValueError(f"start={start} must be >= 0 and block_tokens={block_tokens} > 0")
    truth = planted_truth(cfg)
    for j in itertools.count(start):
        g = j * world_size + rank
        _, activations = sample_tokens(truth, block_tokens, torch.Generator().manual_seed(_block_seed(cfg.seed, g)))
        token_ids = torch.arange(g * block_tokens, (g + 1) * block_tokens, dtype=torch.long)
        yield ActivationBlock(index=j, activations=activations, token_ids=token_ids)


def planted_specs(cfg: SourcesConfig) -> list[SnapshotSpec]:
    """Synthetic snapshots (`sources.kind=planted`): the revision, which is also their fingerprint, is a hash of
    the planted config, so a cache or a training state of them is never reused for another planted problem."""
    planted = json.dumps(asdict(cfg.planted), sort_keys=True)
    digest = hashlib.sha256(planted.encode()).hexdigest()[:16]
    return [SnapshotSpec(name=f"snapshot{index}", path=SYNTHETIC_PATH, revision=digest, step=index,
                         fingerprint=digest)
            for index in range(cfg.planted.n_snapshots)]


def held_out_draws(cfg: PlantedSourceConfig, n_tokens: int) -> Iterator[torch.Tensor]:
    """Activations [B, S, d] of the planted problem, `n_tokens` rows in all, from a generator seeded apart from
    the training stream's blocks: held out, for analysing a dictionary trained on them."""
    truth = planted_truth(cfg)
    generator = torch.Generator().manual_seed(cfg.seed + HELD_OUT_SEED)
    sizes = [min(HELD_OUT_BATCH_TOKENS, n_tokens - start) for start in range(0, n_tokens, HELD_OUT_BATCH_TOKENS)]
    return (sample_tokens(truth, size, generator)[1] for size in sizes)
