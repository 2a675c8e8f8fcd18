"""SAE-Track's progress measure (Xu et al. 2024) of an aligned stack: how far each final feature has formed at each
snapshot.

For latent i of the final snapshot's dictionary, take its `top` (25) most activating tokens by the final
dictionary's code on a replay of tokens; encode those same tokens' activations at snapshot t with snapshot t's
dictionary, giving one code vector [F] per token; the measure is the mean pairwise cosine of those code vectors
minus a baseline, the same statistic for `top` random tokens of the replay (one baseline per snapshot, the same
random tokens at every snapshot):

    progress[i, t] = mean_{j<k} cos(z_t(x_j), z_t(x_k)) - baseline[t]

A formed feature's top tokens share a code (high cosine); an unformed one's do not. Conventions:
- only tokens the latent fires on (final code > 0) are its top tokens; a latent firing on fewer than 2 replayed
  tokens (never firing, in particular) gets NaN;
- a zero code vector has no direction: its cosine with anything counts as 0 (it still counts in the pairs);
- with unit vectors z_j (zero ones kept zero), sum_{j<k} cos_jk = (|sum_j z_j|^2 - #non-zero) / 2, so no
  [top, top] Gram matrix is formed, and latents are taken in chunks: memory stays about `max_elements` floats
  (chunk latents x top x F), never [F, top, F] at once. The codes at snapshot t are computed on the fly for each
  chunk's (deduplicated) top tokens: about F x top encodes per snapshot.

`stack_progress` replays the tokens once and holds their raw activations [N, S, d] on the CPU (float32: N x S x d
floats, e.g. 1.2 GB for 20k tokens, 20 snapshots, d = 768), since the top tokens are known only at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from crosscoder.analysis.inputs.compare_replay import load_replay_source, replay_meta
from crosscoder.analysis.inputs.replay import activation_batches, has_activations
from crosscoder.analysis.report.stack import check_aligned, stack_meta
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.stack import read_stack
from crosscoder.errors import ConfigError

DEFAULT_TOP = 25
"""Top-activating tokens per latent (SAE-Track's choice), and random tokens of the baseline."""
DEFAULT_PROGRESS_TOKENS = 20000
"""Tokens `crosscoder-analyze` replays for the progress measure unless `--progress-tokens` says otherwise."""
MAX_ELEMENTS = 1 << 24
"""Bound on the floats of one chunk's codes (rows x F)."""
BASELINE_SEED = 0x9A0
"""Seeds the choice of the baseline's random tokens when no generator is given."""

CodesAt = Callable[[int, torch.Tensor], torch.Tensor]
"""(snapshot t, token rows [n]) -> the codes [n, F] of those tokens' activations at t, by t's dictionary."""


@dataclass
class TopTokens:
    """Each latent's top-activating tokens at the final snapshot."""

    index: torch.Tensor
    """[F, top] token rows, highest code first."""
    value: torch.Tensor
    """[F, top] their codes; <= 0 where the latent fired on fewer than `top` tokens."""

    @property
    def valid(self) -> torch.Tensor:
        """[F, top] the tokens the latent actually fires on."""
        return self.value > 0


def top_tokens(code_batches: Iterable[torch.Tensor], top: int = DEFAULT_TOP) -> tuple[TopTokens, int]:
    """Each latent's `top` highest-coded token rows over a stream of final-snapshot codes [B, F] (rows numbered
    in stream order), kept as a running top-k: memory F x (top + B). Returns them and the rows seen."""
    best_value: torch.Tensor | None = None
    best_index: torch.Tensor | None = None
    seen = 0
    for codes in code_batches:
        value = codes.detach().float().t()  # [F, B]
        index = torch.arange(seen, seen + value.shape[1], device=value.device).expand_as(value)
        if best_value is not None and best_index is not None:
            value, index = torch.cat([best_value, value], dim=1), torch.cat([best_index, index], dim=1)
        best_value, position = value.topk(min(top, value.shape[1]), dim=1)
        best_index = index.gather(1, position)
        seen += codes.shape[0]
    if best_value is None or best_index is None:
        raise ValueError("no codes: the token stream was empty")
    return TopTokens(index=best_index.cpu(), value=best_value.cpu()), seen


@torch.no_grad()
def mean_pairwise_cosine(codes_at: CodesAt, snapshot: int, index: torch.Tensor, valid: torch.Tensor,
                         code_width: int | None = None, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """[L] for each row of `index` [L, n] (token rows; only those `valid` [L, n]), the mean cosine over all pairs of
    their code vectors at `snapshot` (module docstring: zero vectors count 0); NaN for a row of < 2 tokens. Rows
    are taken in chunks of about `max_elements` / (n x `code_width`) (F, by default L: a dictionary's own
    latents)."""
    n_rows, width = index.shape
    chunk = max(1, max_elements // max(1, width * (code_width or n_rows)))
    out = torch.full((n_rows,), math.nan, dtype=torch.float64)
    for start in range(0, n_rows, chunk):
        rows, keep = index[start:start + chunk], valid[start:start + chunk]
        count = keep.sum(dim=1)
        if int(count.max()) < 2:
            continue
        tokens, inverse = torch.unique(rows[keep], return_inverse=True)
        codes = codes_at(snapshot, tokens).float()  # [U, F]
        norm = codes.norm(dim=1, keepdim=True)
        unit = codes / norm.clamp_min(torch.finfo(codes.dtype).tiny)  # zero rows stay zero
        membership = codes.new_zeros(len(rows), len(tokens))
        owner = torch.arange(len(rows))[:, None].expand_as(rows)[keep]
        membership[owner.to(codes.device), inverse.to(codes.device)] = 1.0
        total = (membership @ unit).double().pow(2).sum(dim=1)  # |sum_j z_j|^2 = #non-zero + 2 sum_{j<k} cos_jk
        nonzero = membership.double() @ (norm[:, 0] > 0).double()
        pairs = (count * (count - 1)).double().to(codes.device)
        out[start:start + chunk] = torch.where(pairs > 0, (total - nonzero) / pairs.clamp_min(1), math.nan).cpu()
    return out


def progress_from_top(tops: TopTokens, codes_at: CodesAt, n_snapshots: int, n_tokens: int,
                      generator: torch.Generator | None = None, max_elements: int = MAX_ELEMENTS
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(progress [F, S], baseline [S]) from each latent's final top tokens and the codes at every snapshot; the
    baseline's `top` random tokens are drawn once from the `n_tokens` replayed rows with `generator`."""
    generator = generator or torch.Generator().manual_seed(BASELINE_SEED)
    n_random = min(tops.index.shape[1], n_tokens)
    random_rows = torch.randperm(n_tokens, generator=generator)[:n_random][None]
    progress = torch.full((tops.index.shape[0], n_snapshots), math.nan, dtype=torch.float64)
    baseline = torch.full((n_snapshots,), math.nan, dtype=torch.float64)
    valid = tops.valid
    for t in range(n_snapshots):
        everyone = torch.ones_like(random_rows, dtype=torch.bool)
        baseline[t] = mean_pairwise_cosine(codes_at, t, random_rows, everyone, max_elements=max_elements)[0]
        progress[:, t] = mean_pairwise_cosine(codes_at, t, tops.index, valid, max_elements=max_elements) - baseline[t]
    return progress, baseline


def progress_measure(final_codes: torch.Tensor, codes_per_snapshot: Sequence[torch.Tensor] | CodesAt,
                     top: int = DEFAULT_TOP, generator: torch.Generator | None = None, n_snapshots: int | None = None,
                     max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """progress [F, S] (module docstring) from the final snapshot's codes [N, F] of N tokens and, per snapshot,
    those tokens' codes: a list of [N, F], or a `CodesAt` callable computing them for given rows (then
    `n_snapshots` says how many). NaN for latents firing on fewer than 2 tokens."""
    if callable(codes_per_snapshot):
        if n_snapshots is None:
            raise ValueError("n_snapshots is needed with a codes callable")
        codes_at = codes_per_snapshot
    else:
        tensors = list(codes_per_snapshot)
        n_snapshots = len(tensors)
        codes_at = lambda t, rows: tensors[t][rows.to(tensors[t].device)]  # noqa: E731
    rows = max(1, max_elements // max(1, final_codes.shape[1]))
    tops, seen = top_tokens(final_codes.split(rows), top)
    return progress_from_top(tops, codes_at, n_snapshots, seen, generator, max_elements)[0]


@dataclass
class ProgressResult:
    """The progress measure of an aligned stack over `n_tokens` replayed tokens."""

    names: list[str]
    progress: torch.Tensor
    """[F, S] per dictionary latent (slot) and snapshot; NaN for latents that fire on < 2 tokens at the final one."""
    baseline: torch.Tensor
    """[S] the mean pairwise code cosine of `top` random tokens."""
    n_tokens: int
    top: int = DEFAULT_TOP

    @property
    def live(self) -> torch.Tensor:
        """[F] latents live at the final snapshot (firing on >= 2 replayed tokens)."""
        return ~self.progress[:, -1].isnan()

    def median(self) -> list[float | None]:
        """[S] median progress over the latents live at the final snapshot (None where there are none)."""
        if not bool(self.live.any()):
            return [None] * len(self.names)
        return [float(value) for value in self.progress[self.live].quantile(0.5, dim=0)]  # the mean of two middles

    def summary(self) -> dict:
        return {"n_tokens": self.n_tokens, "top": self.top, "live_latents": int(self.live.sum()),
                "baseline": [None if math.isnan(value) else value for value in self.baseline.tolist()],
                "median": self.median()}


@torch.no_grad()
def _codes(model: Crosscoder, x: torch.Tensor) -> torch.Tensor:
    """[n, F] a single-snapshot dictionary's codes of raw activations [n, 1, d] (a per-snapshot gate's [n, 1, F]
    flattened)."""
    return model.encode(x).reshape(x.shape[0], -1)


def _replay(models: list[Crosscoder], batches: Iterable[torch.Tensor], device: str | torch.device
            ) -> tuple[torch.Tensor, TopTokens]:
    """The replayed raw activations [N, S, d] (held on the CPU: the later snapshots' codes are computed from them)
    and the final dictionary's top tokens, streamed."""
    kept: list[torch.Tensor] = []
    rows = max(1, MAX_ELEMENTS // max(1, models[-1].dict_size))

    def final_codes() -> Iterable[torch.Tensor]:
        for batch in batches:
            x = batch.to(device=device, dtype=torch.float32)
            kept.append(x.cpu())
            for piece in x.split(rows):
                yield _codes(models[-1], piece[:, -1:])

    tops, _ = top_tokens(final_codes(), DEFAULT_TOP)
    return torch.cat(kept), tops


def stack_progress(stack_dir: str | Path, n_tokens: int = DEFAULT_PROGRESS_TOKENS, device: str | torch.device = "cpu",
                   log: Callable[[str], None] = print, seed: int = BASELINE_SEED) -> ProgressResult:
    """The progress measure of the aligned stack at `stack_dir` over `n_tokens` tokens re-created from its run
    configuration (compare_replay.replay_meta: all snapshots at once). StackNotAlignedError for an unaligned
    stack; ConfigError when its activations cannot be re-created (`has_activations` says why)."""
    stack_dir = Path(stack_dir)
    manifest, metas = read_stack(stack_dir)
    check_aligned(stack_dir, manifest)
    meta = replay_meta(stack_dir, stack_meta(manifest, metas), stack=True)
    reason = has_activations(meta)
    if reason is not None:
        raise ConfigError(reason)
    models = load_replay_source(stack_dir, True, device).models
    log(f"progress measure: {meta.dict_size} latents x {len(models)} snapshots over {n_tokens:,} tokens")
    x, tops = _replay(models, activation_batches(meta, n_tokens, device, log), device)
    codes_at = lambda t, rows: _codes(models[t], x[rows, t:t + 1].to(device))  # noqa: E731
    progress, baseline = progress_from_top(tops, codes_at, len(models), x.shape[0],
                                           torch.Generator().manual_seed(seed))
    result = ProgressResult(names=manifest.names, progress=progress, baseline=baseline, n_tokens=x.shape[0])
    median = result.median()
    log(f"progress measure: median over {int(result.live.sum())} live latents "
        + ", ".join(f"{name} {'-' if value is None else f'{value:.3f}'}"
                    for name, value in zip(result.names, median, strict=True)))
    return result
