"""Top-activating contexts: the text around each feature's strongest activations, overall and per snapshot.

The snapshots are re-run (inline, no workers) on the dictionary's own token stream (the run's data config).
Two activations per latent i and token:
- shared: the crosscoder's code `encode(x)[:, i]`, from all snapshots together (TopK selection included);
- snapshot s: relu(x_s . W_enc[s, :, i] + b_enc[i]), the code the latent would get from snapshot s alone (the
  other snapshots' inputs zero, no TopK selection): what the feature responds to in snapshot s.
Exported weights are folded (they take raw activations); an unfolded model's input scale is applied first.
Only a running top-k per (latent, channel) and the token ids of the sequences it points at are kept.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosscoder.analysis.features.evolution import CLASSES, DEAD, Evolution
from crosscoder.analysis.inputs.token_stream import replayed_batches
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import load_dictionary
from crosscoder.dictionary.provenance import dictionary_sources
from crosscoder.sources.models import load_runners

CONTEXTS_TITLE = "Top-activating contexts"
ENCODE_CHUNK_ELEMENTS = 1 << 24
"""Bound on tokens x F of one `encode` call (TopK needs every latent), so a large F stays within memory."""


@dataclass
class Context:
    value: float
    sequence: int
    """Index of the sequence in the stream (batch index * data.model_batch_size + row)."""
    position: int
    """Position of the activating token in its sequence (0 is BOS)."""
    token_id: int
    before: str
    token: str
    after: str

    def marked(self, left: str = "⟦", right: str = "⟧") -> str:
        return f"{self.before}{left}{self.token}{right}{self.after}"


@dataclass
class FeatureContexts:
    feature: int
    overall: list[Context]
    """By the shared code, largest first."""
    per_snapshot: list[list[Context]]
    """[S] by the single-snapshot activation (module docstring), largest first; empty where it never fires."""


@dataclass
class ContextsResult:
    snapshots: list[str]
    features: list[FeatureContexts]
    n_tokens: int
    """Valid (non-BOS, non-padding) tokens streamed."""
    top_k: int
    window: tuple[int, int]
    steps: list[int | None] = field(default_factory=list)

    def feature(self, index: int) -> FeatureContexts:
        return next(f for f in self.features if f.feature == index)


@torch.no_grad()
def feature_activations(model: Crosscoder, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """[n, 1 + S, m]: the shared code, then each single-snapshot activation (module docstring), of latents
    `features` [m] on raw activations x [n, S, d]. A per-snapshot gate's code is its largest over the snapshots."""
    code_width = model.dict_size * (model.n_sources if model.activation.per_snapshot else 1)
    rows = max(1, ENCODE_CHUNK_ELEMENTS // code_width)
    shared = torch.cat([_shared_code(model.encode(chunk))[:, features] for chunk in x.split(rows)])
    scale = torch.ones_like(model.input_scale) if model.is_folded else model.input_scale
    pre = torch.einsum("nsd,sdm->nsm", x * scale[None, :, None], model.W_enc[:, :, features]) + model.b_enc[features]
    return torch.cat([shared[:, None], pre.relu()], dim=1)


def _shared_code(codes: torch.Tensor) -> torch.Tensor:
    """[n, F] codes, per-snapshot ones [n, S, F] at their largest snapshot."""
    return codes.amax(dim=1) if codes.dim() == 3 else codes


class _RunningTopK:
    """Per channel, the k largest positive values seen and their token keys (sequence * seq_len + position)."""

    def __init__(self, channels: int, k: int, device: torch.device) -> None:
        self.values = torch.full((channels, k), -torch.inf, device=device)
        self.keys = torch.full((channels, k), -1, dtype=torch.long, device=device)

    def update(self, values: torch.Tensor, keys: torch.Tensor) -> None:
        """values [channels, n], keys [n]."""
        values = torch.where(values > 0, values, -torch.inf)
        all_values = torch.cat([self.values, values], dim=1)
        all_keys = torch.cat([self.keys, keys[None, :].expand_as(values)], dim=1)
        self.values, top = all_values.topk(self.values.shape[1], dim=1)
        self.keys = all_keys.gather(1, top)

    def sequences(self, seq_len: int) -> set[int]:
        return set((self.keys[self.values > -torch.inf] // seq_len).tolist())


def top_contexts(
    dictionary_dir: str | Path,
    features: list[int],
    *,
    n_tokens: int = 20000,
    top_k: int = 5,
    window: tuple[int, int] = (8, 3),
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> ContextsResult:
    """The `top_k` contexts (`window` = tokens before, after) of each latent in `features`, overall and per
    snapshot, over the first `n_tokens` valid tokens of the run's own token stream."""
    device = torch.device(device)
    model, meta = load_dictionary(dictionary_dir, device)
    bad = [i for i in features if not 0 <= i < meta.dict_size]
    if not features or bad or top_k <= 0 or n_tokens <= 0 or min(window) < 0:
        raise ValueError(f"features={features} (each in [0, {meta.dict_size})), top_k={top_k}, n_tokens={n_tokens} "
                         f"and window={window} must be non-empty, positive and >= 0")
    cfg, info = dictionary_sources(meta, log)
    runners = load_runners(cfg.sources, info.specs, device)
    n_snap, index = len(info.specs), torch.tensor(features, device=device)
    tracker = _RunningTopK((1 + n_snap) * len(features), top_k, device)
    sequences: dict[int, torch.Tensor] = {}
    seen, seq_len = 0, cfg.data.seq_len
    log(f"contexts: {len(features)} latents, {n_snap} snapshots, {n_tokens:,} tokens on {device}")
    for batch in replayed_batches(cfg, info.tokenizer, runners, n_tokens, device):
        values = feature_activations(model, batch.x, index)  # [n, 1 + S, m]
        tracker.update(values.permute(2, 1, 0).reshape(-1, len(batch.keys)), batch.keys)  # channel = f * (1 + S) + c
        # A sequence not yet kept that the top-k points at is in this batch.
        first = batch.first_sequence
        sequences = {seq: sequences[seq] if seq in sequences else batch.input_ids[seq - first].clone()
                     for seq in tracker.sequences(seq_len)}
        seen += len(batch.keys)

    def context(value: float, key: int) -> Context:
        seq, pos = divmod(key, seq_len)
        ids = sequences[seq].tolist()
        decode = lambda part: info.tokenizer.decode(part, clean_up_tokenization_spaces=False)  # noqa: E731
        return Context(value=value, sequence=seq, position=pos, token_id=ids[pos], token=decode([ids[pos]]),
                       before=decode(ids[max(0, pos - window[0]):pos]), after=decode(ids[pos + 1:pos + 1 + window[1]]))

    pairs = zip(tracker.values.cpu().tolist(), tracker.keys.cpu().tolist(), strict=True)
    channels = [[context(v, k) for v, k in zip(vs, ks, strict=True) if v > 0] for vs, ks in pairs]
    width = 1 + n_snap
    result = [FeatureContexts(i, channels[j * width], channels[j * width + 1:(j + 1) * width])
              for j, i in enumerate(features)]
    log(f"contexts: done over {seen:,} tokens")
    return ContextsResult(snapshots=meta.source_names, features=result, n_tokens=seen, top_k=top_k, window=window,
                          steps=[s.step for s in info.specs])


# ---- HTML ----------------------------------------------------------------------------------------------------
_STYLE = """<style>
table.ctx td.ctx { text-align: left; font-family: ui-monospace, monospace; white-space: pre-wrap;
  font-size: 0.8em; max-width: 24em; vertical-align: top; }
table.ctx mark { background: #ffd54f; padding: 0 1px; } table.ctx .v { color: #777; }
</style>"""


def feature_labels(evo: Evolution) -> dict[int, str]:
    """Per latent: its class and, when live, the snapshot it emerges at."""
    labels = {}
    for i, (c, e) in enumerate(zip(evo.classes.tolist(), evo.emergence.tolist(), strict=True)):
        step = evo.steps[e] if e >= 0 else None
        where = "" if e < 0 else f", emerges at {_snapshot_label(evo.names[e], step)}"
        labels[i] = CLASSES[c] + where if CLASSES[c] != DEAD else DEAD
    return labels


def _snapshot_label(name: str, step: int | None) -> str:
    return name if step is None or str(step) in name else f"{name} (step {step})"


def _show(text: str) -> str:
    """Escaped, with line breaks made visible so a context stays on one line."""
    return html.escape(text.replace("\n", "↵").replace("\t", "⇥"))


def _cell(ctx: Context | None) -> str:
    if ctx is None:
        return '<td class="ctx v">—</td>'
    title = html.escape(f"sequence {ctx.sequence}, position {ctx.position}, token id {ctx.token_id}", quote=True)
    return (f'<td class="ctx" title="{title}"><span class="v">{ctx.value:.3g}</span> {_show(ctx.before)}'
            f"<mark>{_show(ctx.token)}</mark>{_show(ctx.after)}</td>")


def contexts_section(result: ContextsResult, labels: Evolution | dict[int, str], max_per_cell: int | None = None
                     ) -> str:
    """HTML (all text escaped): per latent, its label, then a table with a row for the shared code and one per
    snapshot, each holding its top contexts with the activating token highlighted."""
    labels = feature_labels(labels) if isinstance(labels, Evolution) else labels
    k = min(result.top_k, max_per_cell or result.top_k)
    before, after = result.window
    parts = [_STYLE, f"<p class='muted'>Over {result.n_tokens:,} tokens of the run's own token stream, "
             f"{before} tokens before and {after} after the highlighted activating token (value first). "
             "<b>shared</b>: the crosscoder's code from all snapshots together. A snapshot row: "
             "relu(x<sub>s</sub> &middot; W<sub>enc</sub>[s, :, i] + b<sub>enc</sub>[i]), the code the latent would "
             "get from that snapshot alone (no TopK selection): what the feature responds to there. "
             "&mdash;: no (further) positive activation in these tokens.</p>"]
    header = "".join(f"<th>#{j + 1}</th>" for j in range(k))
    names = [_snapshot_label(name, step)
             for name, step in zip(result.snapshots, result.steps or [None] * len(result.snapshots), strict=True)]
    for fc in result.features:
        rows = [("shared", fc.overall), *zip(names, fc.per_snapshot, strict=True)]
        body = "".join(f'<tr><th class="l">{html.escape(name)}</th>'
                       + "".join(_cell(ctxs[j] if j < len(ctxs) else None) for j in range(k)) + "</tr>"
                       for name, ctxs in rows)
        label = labels.get(fc.feature, "")
        parts.append(f"<h3>latent {fc.feature} <span class='muted'>{html.escape(label)}</span></h3>"
                     f'<div class="scroll"><table class="ctx"><tr><th class="l">snapshot</th>{header}</tr>{body}'
                     "</table></div>")
    return "".join(parts)
