"""Exemplars of every latent at every source: the top-N activating tokens, and a uniform sample of the firings
(quantile exemplars come from it), streamed over T replayed tokens in O(channels x F x N) memory.

The channels of a crosscoder are its shared code f_i (all sources together, TopK selection included), then each
source's own code relu(x_s W_enc[s] + b_enc)_i (the other sources zero, no selection): what latent i responds to
in source s. The channels of a stack are its dictionaries' codes, each on its own source. The snapshots are re-run
on the dictionary's own token stream (crosscoder.analysis.inputs.token_stream). Written by
crosscoder.analysis.interpretation.exemplar_files; docs/analysis.md describes the files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosscoder.analysis.inputs.token_stream import replayed_batches
from crosscoder.analysis.interpretation.streaming_top import StreamingTopK
from crosscoder.data.kinds import describe_sources
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import load_dictionary
from crosscoder.dictionary.provenance import dictionary_sources, run_config_of
from crosscoder.dictionary.stack import is_stack, read_stack, stack_members
from crosscoder.errors import ConfigError
from crosscoder.sources.models import load_runners

CODE_CHUNK_ELEMENTS = 1 << 22
"""Bound on rows x channels x F of the codes computed at once (16 MB of float32, and as much again for the
sampling priorities): what the pass holds beyond its O(channels x F x N) store."""
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class ExemplarSettings:
    top_n: int = 20
    """Top activations kept per latent and channel."""
    samples: int = 20
    """Firings sampled uniformly per latent and channel (the quantile exemplars)."""
    n_tokens: int = 50_000
    """Valid tokens replayed."""
    seed: int = 0
    """Seeds the sampling priorities: the same settings give the same sample."""

    def check(self) -> None:
        if self.top_n < 1 or self.samples < 0 or self.n_tokens < 1:
            raise ConfigError(f"exemplars: top_n={self.top_n} and n_tokens={self.n_tokens} must be >= 1, "
                              f"samples={self.samples} >= 0")


@dataclass
class Exemplars:
    """What the pass found; channel c of latent i is row c * dict_size + i of `top` and `sample`."""

    kind: str
    """`crosscoder` or `stack`."""
    channels: list[str]
    """`shared` then the sources' names (a crosscoder); the dictionaries' sources (a stack)."""
    dict_size: int
    top: StreamingTopK
    sample: StreamingTopK
    firing_counts: torch.Tensor
    """[C, F] tokens on which each latent's code in each channel was > 0."""
    activation_sums: torch.Tensor
    """[C, F] the sum of each code over the tokens (float64)."""
    n_tokens: int
    seq_len: int
    sequences: dict[int, list[int]] = field(default_factory=dict)
    """The token ids of every sequence an exemplar points into."""
    vocabulary: dict[int, str] = field(default_factory=dict)
    """The text of every token id in those sequences (the snapshots' tokenizer)."""
    settings: ExemplarSettings = field(default_factory=ExemplarSettings)


CodeFn = Callable[[torch.Tensor], torch.Tensor]
"""Raw activations [n, S, d] -> codes [n, C, F]."""


def crosscoder_codes(model: Crosscoder) -> CodeFn:
    """The shared code, then each source's own code (module docstring)."""
    scale = torch.ones_like(model.input_scale) if model.is_folded else model.input_scale

    @torch.no_grad()
    def codes(x: torch.Tensor) -> torch.Tensor:
        shared = model.encode(x)
        shared = shared.amax(dim=1) if shared.dim() == 3 else shared  # a per-snapshot gate: its largest
        own = (torch.einsum("nsd,sdf->nsf", x * scale[None, :, None], model.W_enc) + model.b_enc).relu()
        return torch.cat([shared[:, None], own], dim=1)

    return codes


def stack_codes(members: list[Crosscoder]) -> CodeFn:
    """Each dictionary's code on its own source."""

    @torch.no_grad()
    def codes(x: torch.Tensor) -> torch.Tensor:
        per_member = [member.encode(x[:, s : s + 1]) for s, member in enumerate(members)]
        return torch.stack([code.amax(dim=1) if code.dim() == 3 else code for code in per_member], dim=1)

    return codes


def exemplar_pass(dictionary_dir: str | Path, settings: ExemplarSettings, device: str | torch.device = "cpu",
                  log: Callable[[str], None] = print) -> Exemplars:
    """Stream the dictionary's (or stack's) replayed tokens once and keep every latent's exemplars at every
    channel (module docstring)."""
    settings.check()
    device = torch.device(device)
    if is_stack(dictionary_dir):
        _, metas = read_stack(dictionary_dir)
        members = [load_dictionary(path, device)[0] for path in stack_members(dictionary_dir)]
        meta, code_fn, kind = metas[0], stack_codes(members), "stack"
        cfg = run_config_of(meta, need_text=True)
        info = describe_sources(cfg.sources, log=log)
        names = [m.source_names[0] for m in metas]
        if [spec.name for spec in info.specs] != names:
            raise ConfigError(f"the stack's dictionaries cover {names}, its run's sources are "
                              f"{[spec.name for spec in info.specs]}")
        channels = names
    else:
        model, meta = load_dictionary(dictionary_dir, device)
        cfg, info = dictionary_sources(meta, log)
        code_fn, kind, channels = crosscoder_codes(model), "crosscoder", ["shared", *meta.source_names]
    runners = load_runners(cfg.sources, info.specs, device)
    width = len(channels) * meta.dict_size
    found = Exemplars(kind, channels, meta.dict_size, StreamingTopK(width, settings.top_n, device),
                      StreamingTopK(width, max(settings.samples, 1), device),
                      torch.zeros(width, dtype=torch.long, device=device),
                      torch.zeros(width, dtype=torch.float64, device=device), 0, cfg.data.seq_len,
                      settings=settings)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    token_ids: dict[int, torch.Tensor] = {}
    started = last_log = time.perf_counter()
    log(f"exemplars: {meta.dict_size} latents x {len(channels)} channels, top {settings.top_n} and "
        f"{settings.samples} sampled each, over {settings.n_tokens:,} tokens on {device}")
    for batch in replayed_batches(cfg, info.tokenizer, runners, settings.n_tokens, device):
        for rows in range(0, len(batch.keys), max(1, CODE_CHUNK_ELEMENTS // width)):
            chunk = slice(rows, rows + max(1, CODE_CHUNK_ELEMENTS // width))
            offer_codes(found, code_fn(batch.x[chunk]).reshape(-1, width), batch.keys[chunk], generator)
        for row, ids in enumerate(batch.input_ids.to(torch.int32)):
            token_ids[batch.first_sequence + row] = ids
        found.n_tokens += len(batch.keys)
        if (now := time.perf_counter()) - last_log >= PROGRESS_EVERY_S:
            rate = found.n_tokens / (now - started)
            log(f"exemplars: {found.n_tokens:,}/{settings.n_tokens:,} tokens, {rate:,.0f} tokens/s, "
                f"ETA {(settings.n_tokens - found.n_tokens) / max(rate, 1e-9):.0f}s")
            last_log = now
    found.top.flush()
    found.sample.flush()
    _keep_referenced(found, token_ids, info.tokenizer)
    log(f"exemplars: done over {found.n_tokens:,} tokens in {time.perf_counter() - started:.1f}s")
    return found


def offer_codes(found: Exemplars, codes: torch.Tensor, keys: torch.Tensor, generator: torch.Generator) -> None:
    """codes [n, C*F] of the tokens `keys` [n]. Only firings (code > 0) that beat their channel's current
    threshold become candidates, so after the first tokens an update touches few entries; every firing draws its
    sampling priority, whether or not it is kept (the sample stays uniform)."""
    fired = codes > 0
    found.firing_counts += fired.sum(dim=0)
    found.activation_sums += codes.sum(dim=0, dtype=torch.float64)
    rows, channels = (codes > found.top.threshold().clamp(min=0)).nonzero(as_tuple=True)
    values = codes[rows, channels]
    found.top.offer(channels, values, values, keys[rows])
    if found.settings.samples:
        priorities = torch.rand(codes.shape, generator=generator, device=codes.device)
        rows, channels = (fired & (priorities > found.sample.threshold())).nonzero(as_tuple=True)
        found.sample.offer(channels, priorities[rows, channels], codes[rows, channels], keys[rows])


def _keep_referenced(found: Exemplars, token_ids: dict[int, torch.Tensor], tokenizer: object) -> None:
    keys = torch.cat([found.top.keys[found.top.held()], found.sample.keys[found.sample.held()]])
    for sequence in torch.unique(keys // found.seq_len).tolist():
        found.sequences[sequence] = token_ids[sequence].tolist()
    used = sorted({token for ids in found.sequences.values() for token in ids})
    found.vocabulary = {token: tokenizer.decode([token], clean_up_tokenization_spaces=False)  # type: ignore[attr-defined]
                        for token in used}
