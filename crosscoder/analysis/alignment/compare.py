"""Several dictionaries trained on the same snapshots, compared (crosscoder-compare): a crosscoder (one dictionary
whose latents span all S snapshots) and aligned stacks (one single-snapshot dictionary per snapshot,
crosscoder.dictionary.stack), each read as one crosscoder by the evolution analysis.

Per input: emergence counts, class counts, tokens and wall time when known, and per-snapshot explained variance
and L0 on one replay of the same activations (crosscoder.analysis.inputs.compare_replay).

Agreement of each aligned stack with each crosscoder: S[i, j] between crosscoder latent i and stack latent j is
the mean, over the snapshots where both are present (trajectory n >= the emergence threshold), of the cosine of
their decoder vectors in that snapshot (0 when never both present); a linear assignment maximises the total
similarity and a pair is matched when S >= the threshold. Reported: the matched share of the crosscoder's live
latents and, among matched pairs, the share emerging at the same snapshot (and within one snapshot).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crosscoder.analysis.features.evolution import ZERO_NORM, Evolution
from crosscoder.analysis.features.matching import linear_sum_assignment
from crosscoder.analysis.inputs.compare_replay import ReplayResult, replay_metrics
from crosscoder.analysis.report.dictionary import check_dictionary_dir, load_evolution
from crosscoder.analysis.report.stack import load_stack_chains
from crosscoder.constants import RUN_SUMMARY_FILE, WEIGHTS_FILE
from crosscoder.dictionary.io import DictionaryMeta, read_tensors
from crosscoder.dictionary.stack import is_stack, read_stack

DEFAULT_MATCH_THRESHOLD = 0.7
"""Similarity a crosscoder latent and a stack latent need to count as the same feature."""
DEFAULT_REPLAY_TOKENS = 20000
SIMILARITY_BLOCK_ROWS = 2048
"""Crosscoder latents per block of the similarity computation: temporaries are [block, F_stack] float32."""


class IncompatibleInputsError(ValueError):
    """The inputs were not trained on the same snapshots, hook or width."""


@dataclass
class CompareInput:
    """One compared dictionary: a crosscoder or an aligned stack, with its evolution analysis."""

    name: str
    path: Path
    stack: bool
    method: str
    """`crosscoder` (and its activation), or the stack's training method and alignment."""
    evolution: Evolution
    meta: DictionaryMeta
    """A stack's is stack_report.stack_meta: the stack described as one crosscoder."""
    tokens: int | None = None
    wall_seconds: float | None = None

    @property
    def kind(self) -> str:
        return "stack" if self.stack else "crosscoder"

    @property
    def live(self) -> int:
        return int((~self.evolution.dead).sum())

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "method": self.method,
                "dict_size": self.meta.dict_size, "live_latents": self.live,
                "class_counts": self.evolution.class_counts(),
                "emergence_counts": self.evolution.emergence_counts.tolist(), "tokens": self.tokens,
                "wall_seconds": self.wall_seconds}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def run_summary(dictionary_dir: Path) -> dict[str, Any]:
    """The training run's summary.json in the folder holding the dictionary (or stack) folder, which a run's
    `dictionary/` export has (crosscoder-match writes its aligned stack beside the original); {} when there is no
    run summary there."""
    path = dictionary_dir.resolve().parent / RUN_SUMMARY_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) and "wall_seconds" in raw else {}


def _cost(details: dict[str, Any], dictionary_dir: Path, meta: DictionaryMeta) -> tuple[int, float | None]:
    """(tokens, wall seconds): from `details` (a stack manifest's), else from the run's summary.json beside the
    folder, else the metadata's tokens and no wall time."""
    summary = {**run_summary(dictionary_dir), **{k: v for k, v in details.items() if _number(v) is not None}}
    tokens = _number(summary.get("tokens_seen"))
    return int(tokens) if tokens is not None else meta.tokens_seen, _number(summary.get("wall_seconds"))


def load_input(path: str | Path, name: str | None = None) -> CompareInput:
    """A crosscoder dictionary folder or an aligned stack folder, analysed (StackNotAlignedError for a stack never
    matched; NotADictionaryError / DictionaryError naming what is wrong otherwise)."""
    path = Path(path)
    name = name or path.name
    if is_stack(path):
        evo, meta = load_evolution(path)  # refuses an unaligned stack
        manifest, _ = read_stack(path)
        tokens, wall = _cost(manifest.details, path, meta)
        return CompareInput(name=name, path=path, stack=True, method=f"{manifest.method}, aligned {manifest.aligned}",
                            evolution=evo, meta=meta, tokens=tokens, wall_seconds=wall)
    evo, meta = load_evolution(check_dictionary_dir(path))
    tokens, wall = _cost({}, path, meta)
    return CompareInput(name=name, path=path, stack=False, method=f"crosscoder ({meta.activation})", evolution=evo,
                        meta=meta, tokens=tokens, wall_seconds=wall)


def check_compatible(inputs: Sequence[CompareInput]) -> None:
    """IncompatibleInputsError naming the first difference from the first input: snapshot names (in order), hook,
    d_model."""
    first = inputs[0]
    names = first.meta.source_names
    for other in inputs[1:]:
        theirs = other.meta.source_names
        if theirs != names:
            if len(theirs) != len(names):
                raise IncompatibleInputsError(f"{other.name} has {len(theirs)} snapshots {theirs}, {first.name} has "
                                              f"{len(names)} {names}")
            s = next(s for s, (a, b) in enumerate(zip(names, theirs, strict=True)) if a != b)
            raise IncompatibleInputsError(f"snapshot {s} is {theirs[s]!r} in {other.name} but {names[s]!r} in "
                                          f"{first.name}: the inputs must share their snapshots, in order")
        _check_same_snapshots(first, other)
        if other.meta.hook != first.meta.hook:
            raise IncompatibleInputsError(f"{other.name} reads hook {other.meta.hook!r}, {first.name} reads "
                                          f"{first.meta.hook!r}")
        if other.meta.d_model != first.meta.d_model:
            raise IncompatibleInputsError(f"{other.name} has d_model={other.meta.d_model}, {first.name} has "
                                          f"d_model={first.meta.d_model}")


def _check_same_snapshots(first: CompareInput, other: CompareInput) -> None:
    """Same names are not the same snapshots: two models' `step0`, or a folder of other activations. Where both
    inputs recorded a source's fingerprint (every export since they were added), they must agree; otherwise the
    second would be scored on the first's activations and latents matched across models."""
    for mine, theirs in zip(first.meta.sources, other.meta.sources, strict=True):
        ours, their = mine.get("fingerprint"), theirs.get("fingerprint")
        if ours and their and ours != their:
            raise IncompatibleInputsError(
                f"snapshot {mine.get('name')!r} of {other.name} is not the one of {first.name} (fingerprints "
                f"{their[:12]} and {ours[:12]}: another model, checkpoint or activation folder under the same name); "
                "compare dictionaries trained on the same snapshots")


def load_decoder(item: CompareInput) -> torch.Tensor:
    """W_dec [F, S, d] (only its directions are used: a crosscoder's folded decoder has the same ones)."""
    if item.stack:  # the chains the stack's evolution analysis reads (one latent per chain)
        return load_stack_chains(item.path).chains.decoder
    return read_tensors(item.path / WEIGHTS_FILE, ["W_dec"])["W_dec"]


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    vectors = vectors.float()
    norm = vectors.norm(dim=-1, keepdim=True)
    return torch.where(norm > ZERO_NORM, vectors / norm.clamp_min(ZERO_NORM), torch.zeros_like(vectors))


def decoder_similarity(w_a: torch.Tensor, present_a: torch.Tensor, w_b: torch.Tensor, present_b: torch.Tensor,
                       block_rows: int = SIMILARITY_BLOCK_ROWS, device: str | torch.device = "cpu") -> torch.Tensor:
    """[Fa, Fb] mean over the snapshots where both latents are present (`present_*` [F, S] bool) of the cosine of
    their decoders [F, S, d] at that snapshot; 0 where never both present. One snapshot and `block_rows` rows of
    `w_a` at a time, so temporaries stay at [block_rows, Fb] (on `device`; the result is on the CPU)."""
    if w_a.shape[1:] != w_b.shape[1:]:
        raise ValueError(f"decoders {list(w_a.shape)} and {list(w_b.shape)} differ in snapshots or width")
    n_a, n_snapshots, _ = w_a.shape
    out = torch.zeros(n_a, w_b.shape[0])
    for start in range(0, n_a, block_rows):
        stop = min(n_a, start + block_rows)
        total = torch.zeros(stop - start, w_b.shape[0], device=device)
        count = torch.zeros(stop - start, w_b.shape[0], device=device)
        for s in range(n_snapshots):
            both = (present_a[start:stop, s, None].to(device) & present_b[None, :, s].to(device)).float()
            total += (_unit(w_a[start:stop, s].to(device)) @ _unit(w_b[:, s].to(device)).T) * both
            count += both
        out[start:stop] = torch.where(count > 0, total / count.clamp_min(1), 0.0).cpu()
    return out


@dataclass
class Agreement:
    """How one aligned stack's latents match one crosscoder's (module docstring)."""

    crosscoder: str
    stack: str
    threshold: float
    live: int
    """The crosscoder's live latents."""
    crosscoder_index: torch.Tensor = field(repr=False)
    """[M] matched crosscoder latents (similarity >= threshold, both live)."""
    stack_index: torch.Tensor = field(repr=False)
    """[M] the stack latent matched to each."""
    similarity: torch.Tensor = field(repr=False)
    """[M] their similarity."""
    same_emergence: int = 0
    within_one: int = 0

    @property
    def matched(self) -> int:
        return int(self.crosscoder_index.numel())

    @property
    def matched_share(self) -> float:
        return self.matched / self.live if self.live else 0.0

    def summary(self) -> dict[str, Any]:
        matched = self.matched
        return {"crosscoder": self.crosscoder, "stack": self.stack, "threshold": self.threshold,
                "crosscoder_live": self.live, "matched": matched, "matched_share": self.matched_share,
                "mean_matched_similarity": float(self.similarity.mean()) if matched else None,
                "same_emergence_share": self.same_emergence / matched if matched else None,
                "emergence_within_one_share": self.within_one / matched if matched else None}


def agreement(crosscoder: CompareInput, stack: CompareInput, threshold: float = DEFAULT_MATCH_THRESHOLD,
              decoders: tuple[torch.Tensor, torch.Tensor] | None = None, device: str | torch.device = "cpu"
              ) -> Agreement:
    """Match the stack's latents to the crosscoder's (module docstring); `decoders` (crosscoder's, stack's) when
    the caller has them loaded; the similarity is computed on `device`, the assignment on the CPU (scipy)."""
    evo_a, evo_b = crosscoder.evolution, stack.evolution
    w_a, w_b = decoders if decoders is not None else (load_decoder(crosscoder), load_decoder(stack))
    present_a, present_b = evo_a.trajectories >= evo_a.threshold, evo_b.trajectories >= evo_b.threshold
    similarity = decoder_similarity(w_a, present_a, w_b, present_b, device=device)
    rows, cols = linear_sum_assignment(-similarity)
    rows, cols = torch.from_numpy(rows), torch.from_numpy(cols)
    pair_similarity = similarity[rows, cols]
    keep = (pair_similarity >= threshold) & ~evo_a.dead[rows] & ~evo_b.dead[cols]
    rows, cols, pair_similarity = rows[keep], cols[keep], pair_similarity[keep]
    gap = (evo_a.emergence[rows] - evo_b.emergence[cols]).abs()
    return Agreement(crosscoder=crosscoder.name, stack=stack.name, threshold=threshold, live=crosscoder.live,
                     crosscoder_index=rows, stack_index=cols, similarity=pair_similarity,
                     same_emergence=int((gap == 0).sum()), within_one=int((gap <= 1).sum()))


def all_agreements(inputs: Sequence[CompareInput], threshold: float = DEFAULT_MATCH_THRESHOLD,
                   device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> list[Agreement]:
    """Every (crosscoder, stack) pair; each crosscoder's decoder is read once, one stack's at a time."""
    results = []
    for crosscoder in (item for item in inputs if not item.stack):
        w_a = load_decoder(crosscoder)
        for stack in (item for item in inputs if item.stack):
            log(f"matching {stack.name} to {crosscoder.name}")
            results.append(agreement(crosscoder, stack, threshold, (w_a, load_decoder(stack)), device))
    return results


@dataclass
class Comparison:
    inputs: list[CompareInput]
    agreements: list[Agreement]
    replay: ReplayResult
    threshold: float

    def to_json(self) -> dict[str, Any]:
        first = self.inputs[0]
        return {"snapshots": first.evolution.names, "steps": first.evolution.steps, "hook": first.meta.hook,
                "d_model": first.meta.d_model, "emergence_threshold": first.evolution.threshold,
                "match_threshold": self.threshold, "inputs": [item.summary() for item in self.inputs],
                "replay": self.replay.to_json(), "agreement": [result.summary() for result in self.agreements]}


def compare(paths: Sequence[str | Path], names: Sequence[str] | None = None, *,
            n_tokens: int = DEFAULT_REPLAY_TOKENS, threshold: float = DEFAULT_MATCH_THRESHOLD,
            device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> Comparison:
    """Load, check and compare the inputs (module docstring); `n_tokens` 0 skips the replay."""
    if len(paths) < 2:
        raise ValueError(f"compare needs at least 2 inputs, got {len(paths)}")
    names = list(names) if names is not None else [None] * len(paths)
    inputs = []
    for path, name in zip(paths, names, strict=True):
        log(f"loading {path}")
        inputs.append(load_input(path, name))
    check_compatible(inputs)
    agreements = all_agreements(inputs, threshold, device, log)
    if n_tokens > 0:
        replay = replay_metrics([item.path for item in inputs], [item.meta for item in inputs],
                                [item.stack for item in inputs], n_tokens, device, log)
    else:
        replay = ReplayResult(n_tokens=0, explained_variance=[], l0=[], reason="replay disabled (--tokens 0)")
    if replay.reason is not None:
        log(f"skipping explained variance and L0: {replay.reason}")
    return Comparison(inputs=inputs, agreements=agreements, replay=replay, threshold=threshold)
