"""SAE Match (Balagansky et al., ICLR 2025): put independently trained dictionaries of consecutive snapshots into
one latent order, so latent i is the same feature across a stack and the evolution analysis can read it.

Space matched in: each dictionary's normalised activation space (x_s * c_s, E||x_s||^2 = d), where decoder norms
live (`stack.load_stack_decoders`): exported weights are folded (W_dec_raw = W_dec_norm / c_s), so they are
multiplied back by c_s. A JumpReLU latent's threshold is folded in too, W~[i] = theta_i * W_dec[i], since
(encoder column * a, decoder row / a, theta * a) is the same latent for every a > 0 and only theta_i * W_dec[i]
(its smallest contribution when it fires) survives that rescaling; for the per-snapshot gate (`snapshot_jumprelu`,
which fires when pre_i * n_i > theta_i) the smallest contribution is theta_i * W_dec[i] / n_i. Other families
(ReLU, TopK, BatchTopK) have no per-latent threshold: only the input scale is folded.

For consecutive snapshots (A, B) the permutation P minimising ||W~A - P W~B||^2 is a linear assignment on the
pairwise squared distances (`cosine` cost: 1 - cosine). B is matched against A's *aligned* order, so the
permutations chain along the stack. A per-snapshot factor (c_s alone) does not change which permutation wins
(it scales every pairwise dot product alike), but it does change the residual reported as `relative_mse`;
per-latent thresholds change both.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from crosscoder.analysis.features.matching import linear_sum_assignment
from crosscoder.constants import ANALYSIS_DIR, CONFIG_FILE, WEIGHTS_FILE
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary, load_firing_frequency, read_tensors
from crosscoder.dictionary.stack import StackManifest, read_stack, write_stack_manifest
from crosscoder.errors import DictionaryError
from crosscoder.storage import building_dir, write_text_atomic

COSTS = ("mse", "cosine")
DEFAULT_MATCH_COSINE = 0.7
"""A matched pair counts as a good match when its decoder cosine is at least this (`--threshold`)."""
MATCH_QUALITY_FILE = "match_quality.json"
THRESHOLD_KEY = "activation.log_threshold"
LATENT_AXES = {"W_enc": -1, "b_enc": 0, "W_dec": 0, THRESHOLD_KEY: 0}
"""State-dict tensors indexed by latent, and the axis (exported shapes: W_enc [1, d, F], W_dec [F, 1, d])."""
_ZERO = 1e-12


def folded_decoder(tensors: dict[str, torch.Tensor], meta: DictionaryMeta, fold: bool = True) -> torch.Tensor:
    """[F, d] the decoder SAE Match compares (module docstring); `fold=False` gives the exported weights as they
    are (raw activation space, no threshold), the comparison that shows what folding is for."""
    w_dec = tensors["W_dec"][:, 0].double()
    if not fold:
        return w_dec
    w_dec = w_dec * meta.input_scale[0]
    if THRESHOLD_KEY in tensors and meta.activation in ("jumprelu", "snapshot_jumprelu"):
        theta = tensors[THRESHOLD_KEY].double().exp()
        if meta.activation == "snapshot_jumprelu":
            theta = theta / w_dec.norm(dim=1).clamp_min(_ZERO)
        w_dec = w_dec * theta[:, None]
    return w_dec


def cost_matrix(a: torch.Tensor, b: torch.Tensor, cost: str = "mse") -> torch.Tensor:
    """[F, F] cost of giving A's latent i the place of B's latent j: ||a_i - b_j||^2, or 1 - cos(a_i, b_j)."""
    a, b = a.double(), b.double()
    if cost == "mse":
        return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)
    if cost == "cosine":
        return 1 - _unit(a) @ _unit(b).T
    raise ValueError(f"cost={cost!r} is not one of {list(COSTS)}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(_ZERO)


def match_pair(a: torch.Tensor, b: torch.Tensor, cost: str = "mse") -> torch.Tensor:
    """[F] long `order` with b[order] in A's latent order (b[order[i]] is matched to a[i])."""
    if a.shape != b.shape:
        raise ValueError(f"decoders {list(a.shape)} and {list(b.shape)} differ in shape")
    rows, cols = linear_sum_assignment(cost_matrix(a, b, cost))
    order = torch.empty(a.shape[0], dtype=torch.long)
    order[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return order


def match_chain(decoders: list[torch.Tensor], cost: str = "mse") -> list[torch.Tensor]:
    """Per snapshot, the order putting its latents into the first snapshot's order (identity for the first):
    each is matched against the previous snapshot already aligned, so the permutations compose."""
    orders = [torch.arange(decoders[0].shape[0])]
    previous = decoders[0]
    for decoder in decoders[1:]:
        order = match_pair(previous, decoder, cost)
        orders.append(order)
        previous = decoder[order]
    return orders


@dataclass
class PairQuality:
    """How well one snapshot's aligned latents match the previous snapshot's."""

    a: str
    b: str
    threshold: float
    share_above_threshold: float
    """Share of matched pairs whose decoder cosine is >= threshold."""
    mean_cosine: float
    median_cosine: float
    relative_mse: float
    """||W~A - P W~B||^2 / ||W~A||^2 on the matched (folded) decoders."""
    unmoved_share: float
    """Share of latents left at their index (1 for a warm-started pair that kept its order)."""


def pair_quality(names: tuple[str, str], a: torch.Tensor, b_aligned: torch.Tensor, order: torch.Tensor,
                 threshold: float) -> PairQuality:
    cosine = (_unit(a) * _unit(b_aligned)).sum(1)
    relative = float(((a - b_aligned) ** 2).sum() / (a**2).sum().clamp_min(_ZERO))
    return PairQuality(
        a=names[0], b=names[1], threshold=threshold, share_above_threshold=float((cosine >= threshold).double().mean()),
        mean_cosine=float(cosine.mean()), median_cosine=float(cosine.median()), relative_mse=relative,
        unmoved_share=float((order == torch.arange(len(order))).double().mean()),
    )


@dataclass
class MatchResult:
    out_dir: Path
    orders: list[torch.Tensor]
    """Per snapshot: aligned latent i is the source dictionary's latent orders[s][i]."""
    pairs: list[PairQuality]
    details: dict[str, Any] = field(default_factory=dict)


def stack_decoders(stack_dir: str | Path, fold: bool = True
                   ) -> tuple[list[torch.Tensor], StackManifest, list[DictionaryMeta]]:
    """Each dictionary's [F, d] decoder as SAE Match compares it (`folded_decoder`), in stack order."""
    stack_dir = Path(stack_dir)
    manifest, metas = read_stack(stack_dir)
    decoders = []
    for entry, meta in zip(manifest.entries, metas, strict=True):
        weights = stack_dir / entry.dictionary / WEIGHTS_FILE
        names = ["W_dec", THRESHOLD_KEY] if meta.activation in ("jumprelu", "snapshot_jumprelu") else ["W_dec"]
        tensors = read_tensors(weights, names)
        if tensors["W_dec"].shape != (meta.dict_size, 1, meta.d_model):
            raise DictionaryError(f"{weights}: W_dec {list(tensors['W_dec'].shape)} does not fit one snapshot of "
                                  f"{meta.dict_size} latents x {meta.d_model}")
        decoder = folded_decoder(tensors, meta, fold)
        if not torch.isfinite(decoder).all():
            raise DictionaryError(f"{weights} has non-finite decoder values; re-export it")
        decoders.append(decoder)
    return decoders, manifest, metas


def match_stack(stack_dir: str | Path, cost: str = "mse", threshold: float = DEFAULT_MATCH_COSINE, fold: bool = True
                ) -> tuple[list[torch.Tensor], list[PairQuality], StackManifest, list[DictionaryMeta]]:
    """The chained orders and per-pair quality of a stack (nothing written)."""
    if cost not in COSTS:
        raise ValueError(f"cost={cost!r} is not one of {list(COSTS)}")
    decoders, manifest, metas = stack_decoders(stack_dir, fold)
    orders = match_chain(decoders, cost)
    pairs = [pair_quality((manifest.names[s - 1], manifest.names[s]), decoders[s - 1][orders[s - 1]],
                          decoders[s][orders[s]], orders[s], threshold) for s in range(1, len(decoders))]
    return orders, pairs, manifest, metas


def permute_latents(tensors: dict[str, torch.Tensor], order: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state dict with every latent-indexed tensor (LATENT_AXES) reordered by `order`; the rest as it is."""
    return {name: tensor.index_select(LATENT_AXES[name] % tensor.dim(), order).contiguous()
            if name in LATENT_AXES else tensor for name, tensor in tensors.items()}


def _permuted_dictionary(src: Path, dst: Path, meta: DictionaryMeta, order: torch.Tensor) -> None:
    """`src` re-exported at `dst` with its latents in `order`; its other top-level JSON files (eval.json, stream
    positions: nothing per latent) carried along, its analysis folder not (that is per latent)."""
    state = permute_latents(read_tensors(src / WEIGHTS_FILE), order)
    frequency = load_firing_frequency(src)
    if frequency is not None:
        frequency = frequency.index_select(frequency.dim() - 1, order)
    extra = {path.name: path.read_text(encoding="utf-8") for path in sorted(src.glob("*.json"))
             if path.is_file() and path.name != CONFIG_FILE}
    export_dictionary(state, replace(meta), dst, extra_files=extra, firing_frequency=frequency)


def _check_out(stack_dir: Path, out_dir: Path) -> None:
    stack, out = stack_dir.resolve(), out_dir.resolve()
    if out == stack or stack in out.parents or out in stack.parents:
        raise ValueError(f"--out {out_dir} must lie outside the stack {stack_dir} (and not contain it)")


def write_matched_stack(stack_dir: str | Path, out_dir: str | Path, cost: str = "mse",
                        threshold: float = DEFAULT_MATCH_COSINE) -> MatchResult:
    """Match the stack at `stack_dir` and write the aligned stack at `out_dir` (built under a hidden name, renamed
    into place): the first dictionary copied unchanged, the others with their latents permuted, stack.json with
    aligned = sae_match and the per-pair quality in details["sae_match"], and MATCH_QUALITY_FILE."""
    stack_dir, out_dir = Path(stack_dir), Path(out_dir)
    _check_out(stack_dir, out_dir)
    orders, pairs, manifest, metas = match_stack(stack_dir, cost, threshold)
    details = {
        "source_stack": str(stack_dir), "source_aligned": manifest.aligned, "cost": cost, "threshold": threshold,
        "space": "normalised activations (x_s * c_s); JumpReLU thresholds folded into the decoder",
        "pairs": [asdict(pair) for pair in pairs],
        "mean_share_above_threshold": _mean([pair.share_above_threshold for pair in pairs]),
    }
    with building_dir(out_dir) as tmp:
        for s, (entry, meta) in enumerate(zip(manifest.entries, metas, strict=True)):
            src, dst = stack_dir / entry.dictionary, tmp / entry.dictionary
            dst.parent.mkdir(parents=True, exist_ok=True)
            if s == 0:
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns(ANALYSIS_DIR))
            else:
                _permuted_dictionary(src, dst, meta, orders[s])
        quality = {**details, "orders": [order.tolist() for order in orders]}
        write_text_atomic(tmp / MATCH_QUALITY_FILE, json.dumps(quality, indent=2))
        aligned = replace(manifest, aligned="sae_match", details={**manifest.details, "sae_match": details})
        write_stack_manifest(tmp, aligned)
    return MatchResult(out_dir=out_dir, orders=orders, pairs=pairs, details=details)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
