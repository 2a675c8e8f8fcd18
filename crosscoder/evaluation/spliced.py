"""Spliced-in language-model loss, per snapshot: how much of each snapshot's next-token loss the crosscoder keeps.

On held-out tokens (crosscoder.data.held_out), snapshot s is run to its logits four times: clean; with the hooked
activation replaced by the crosscoder's reconstruction x̂_s; by zero; and by the snapshot's mean activation over
the eval tokens. Per snapshot:

- CE clean, CE spliced, CE zero-ablated, CE mean-ablated: mean next-token cross-entropy (nats);
- fraction of CE recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 when the reconstruction is as good
  as the real activation, 0 when it is no better than deleting it (the same against the mean: `ce_recovered_mean`);
- KL(clean ‖ spliced): the mean over positions of the divergence of the spliced next-token distribution.

The code is shared, so x̂_s needs every snapshot's activation of the same token: all S activations are captured
first (the runners' capture-and-stop path), then encoded and decoded together with `model.decode(model.encode(x))`.
BOS and padding positions are left out exactly as training leaves them out (crosscoder.data.activations
.valid_token_mask): their activation stays clean and no CE is taken at them; a position counts when its own token
is valid and it has a next token. Only model sources (`hf`, `toy`) have a language model to evaluate; `planted`
ones are refused. The clean activations of the eval tokens are kept in memory (eval tokens x S x d floats), and
they are encoded EVAL_CHUNK_ROWS sequences at a time (BatchTopK selects within such a chunk).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crosscoder.config import MODEL_KINDS
from crosscoder.constants import EVAL_FILE, STREAM_POSITION_FILE
from crosscoder.data.activations import valid_token_mask
from crosscoder.data.held_out import held_out_batches
from crosscoder.data.tokens import TokenBatch, special_token_ids
from crosscoder.dictionary.io import load_dictionary, read_meta
from crosscoder.dictionary.provenance import dictionary_sources
from crosscoder.errors import ConfigError, DictionaryError
from crosscoder.evaluation.splicing import logits_and_activation, logits_with_replacement
from crosscoder.sources.hooks import SnapshotRunner
from crosscoder.sources.models import load_runners, source_runners
from crosscoder.storage import write_text_atomic

EVAL_CHUNK_ROWS = 8
"""Sequences per forward: a [rows, T, vocabulary] float32 logits tensor per forward bounds the memory."""
METRIC_KEYS = ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "ce_recovered", "ce_recovered_mean", "kl")
"""The per-snapshot figures, as logged to W&B (`eval/<key>/<snapshot>`) and written to eval.json."""

Reconstruct = Callable[[torch.Tensor], torch.Tensor]
"""Raw activations [n, S, d] -> their replacement [n, S, d] (the crosscoder's decode(encode(x)), or a control)."""


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-9 else math.nan  # no gap: nothing to recover


@dataclass
class SnapshotEval:
    """One snapshot's figures (nats; mean over the evaluated positions)."""

    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_mean: float
    kl: float

    @property
    def ce_recovered(self) -> float:
        return _recovered(self.ce_zero, self.ce_spliced, self.ce_clean)

    @property
    def ce_recovered_mean(self) -> float:
        return _recovered(self.ce_mean, self.ce_spliced, self.ce_clean)

    def figures(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in METRIC_KEYS}


@dataclass
class SplicedEval:
    snapshots: list[str]
    per_snapshot: list[SnapshotEval]
    n_positions: int
    """Positions the CE is averaged over (per snapshot; the same positions for every snapshot)."""
    tokens_from: str = ""
    """Where the held-out tokens came from (crosscoder.data.held_out)."""
    held_out: bool = True
    """False when the eval stream ran into text the run trained on (a local corpus's next epoch)."""
    steps: list[int | None] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """`eval/<figure>/<snapshot>` for W&B; figures that are undefined (NaN) are left out."""
        return {f"eval/{key}/{name}": value for name, result in zip(self.snapshots, self.per_snapshot, strict=True)
                for key, value in result.figures().items() if math.isfinite(value)}

    def to_json(self) -> dict[str, Any]:
        clean = lambda v: v if math.isfinite(v) else None  # noqa: E731 (JSON has no NaN)
        return {"snapshots": self.snapshots, "steps": self.steps, "n_positions": self.n_positions,
                "tokens_from": self.tokens_from, "held_out": self.held_out,
                "per_snapshot": {name: {k: clean(v) for k, v in result.figures().items()}
                                 for name, result in zip(self.snapshots, self.per_snapshot, strict=True)}}


def _take_rows(batches: Iterable[TokenBatch], n_positions: int, bos: int, pad: int | None) -> TokenBatch:
    """Whole sequences of `batches` until they hold at least `n_positions` evaluated positions."""
    ids, masks, have = [], [], 0
    for batch in batches:
        counted = _ce_positions(batch, bos, pad).sum(dim=1)
        for row in range(batch.input_ids.shape[0]):
            ids.append(batch.input_ids[row])
            masks.append(batch.attention_mask[row])
            have += int(counted[row])
            if have >= n_positions:
                return TokenBatch(torch.stack(ids), torch.stack(masks))
    if not ids:
        raise ConfigError("the held-out token stream gave no tokens")
    return TokenBatch(torch.stack(ids), torch.stack(masks))


def _ce_positions(batch: TokenBatch, bos: int, pad: int | None) -> torch.Tensor:
    """[B, T-1] True where position t is evaluated: its token is trained on (valid) and a real token follows."""
    return valid_token_mask(batch, bos, pad)[:, :-1] & batch.attention_mask[:, 1:].bool()


def _chunks(rows: TokenBatch, device: torch.device) -> list[TokenBatch]:
    return [TokenBatch(ids.to(device), mask.to(device)) for ids, mask in
            zip(rows.input_ids.split(EVAL_CHUNK_ROWS), rows.attention_mask.split(EVAL_CHUNK_ROWS), strict=True)]


class _Sums:
    """Running sums of CE per variant and of KL(clean || spliced) over the evaluated positions."""

    def __init__(self) -> None:
        self.ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0}
        self.kl, self.n = 0.0, 0

    def add(self, variant: str, logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor,
            clean_logprobs: torch.Tensor | None = None) -> torch.Tensor:
        logprobs = logits[:, :-1][where].float().log_softmax(dim=-1)  # [n, V]
        self.ce[variant] -= logprobs.gather(1, targets[where][:, None]).sum().item()
        if clean_logprobs is not None:  # KL(clean || this) = sum_v p_clean (log p_clean - log p_this)
            self.kl += (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum().item()
        return logprobs

    def result(self) -> SnapshotEval:
        n = max(self.n, 1)
        return SnapshotEval(ce_clean=self.ce["clean"] / n, ce_spliced=self.ce["spliced"] / n,
                            ce_zero=self.ce["zero"] / n, ce_mean=self.ce["mean"] / n, kl=self.kl / n)


def _replaced(clean: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The clean activation [B, T, d] with the valid positions set to `values` ([n, d] or a broadcast [d])."""
    out = clean.clone()
    out[valid] = values.to(out.dtype)
    return out


@torch.no_grad()
def spliced_eval(runners: list[SnapshotRunner], batches: Iterable[TokenBatch], reconstruct: Reconstruct,
                 n_positions: int, bos: int, pad: int | None, device: torch.device,
                 log: Callable[[str], None] = print) -> tuple[list[SnapshotEval], int]:
    """Per-snapshot figures over the first sequences of `batches` holding >= `n_positions` evaluated positions,
    and that number (module docstring). `runners` hold causal LMs, in the crosscoder's snapshot order; a runner
    with several hooks gives one source per hook, each spliced alone."""
    started = time.perf_counter()
    chunks = _chunks(_take_rows(batches, n_positions, bos, pad), device)
    valid = [valid_token_mask(chunk, bos, pad) for chunk in chunks]
    # All sources' activations of each token first: the shared code needs them together.
    clean = [torch.stack([a[v].float() for runner in runners for a in runner.capture(c.input_ids, c.attention_mask)],
                         dim=1) for c, v in zip(chunks, valid, strict=True)]  # per chunk [n, S, d]
    mean = torch.cat(clean).mean(dim=0)  # [S, d]: the mean-ablation values
    spliced = [reconstruct(x) for x in clean]
    results = []
    sources = source_runners(runners)
    for s, (runner, hook) in enumerate(sources):
        sums = _Sums()
        for chunk, v, x_hat in zip(chunks, valid, spliced, strict=True):
            ids, mask = chunk.input_ids, chunk.attention_mask
            where, targets = _ce_positions(chunk, bos, pad), ids[:, 1:]
            sums.n += int(where.sum())
            logits, activation = logits_and_activation(runner, ids, mask, hook)
            reference = sums.add("clean", logits, targets, where)
            for variant, values in (("spliced", x_hat[:, s]), ("zero", torch.zeros_like(mean[s])),
                                    ("mean", mean[s])):
                logits = logits_with_replacement(runner, ids, mask, _replaced(activation, v, values), hook)
                sums.add(variant, logits, targets, where, reference if variant == "spliced" else None)
        results.append(sums.result())
        elapsed = time.perf_counter() - started
        shown = runner.name if len(runner.hooks) == 1 else f"{runner.name} at {runner.hooks[hook].name}"
        log(f"eval: source {s + 1}/{len(sources)} {shown}: CE clean {results[-1].ce_clean:.4f}, spliced "
            f"{results[-1].ce_spliced:.4f}, zero {results[-1].ce_zero:.4f}, recovered {results[-1].ce_recovered:.3f} "
            f"| {(s + 1) * sums.n / max(elapsed, 1e-9):,.0f} tok/s")
    return results, sums.n


def crosscoder_reconstruction(model: torch.nn.Module) -> Reconstruct:
    """x -> model.decode(model.encode(x)): raw reconstructions [n, S, d] of an exported (folded) dictionary."""
    return lambda x: model.decode(model.encode(x)).float()


def evaluate_dictionary(dictionary_dir: str | Path, n_tokens: int, device: str | torch.device = "cpu",
                        log: Callable[[str], None] = print) -> SplicedEval:
    """The spliced-in evaluation of an exported dictionary on `n_tokens` held-out positions, re-running the
    snapshots its run configuration names; ConfigError when they cannot be run (e.g. planted sources)."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens} must be > 0")
    dictionary_dir, device = Path(dictionary_dir), torch.device(device)
    kind = (read_meta(dictionary_dir).training.get("sources") or {}).get("kind", "hf")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"sources.kind={kind!r}: the spliced-in LM loss needs snapshots that are language models "
                          f"({' or '.join(MODEL_KINDS)}); {kind} sources have none")
    model, meta = load_dictionary(dictionary_dir, device)
    cfg, info = dictionary_sources(meta, log)
    names = [spec.name for spec in info.specs]
    held_out = held_out_batches(cfg.data, info.tokenizer, _stream_positions(dictionary_dir))
    runners = load_runners(cfg.sources, info.specs, device, with_lm_head=True)
    bos, pad = special_token_ids(info.tokenizer)
    log(f"eval: spliced-in LM loss of {len(names)} snapshots at {meta.hook} on {n_tokens:,} tokens of "
        f"{held_out.source}, on {device}")
    results, n_positions = spliced_eval(runners, held_out.batches, crosscoder_reconstruction(model), n_tokens, bos,
                                        pad, device, log)
    if held_out.reused_training_text:
        log("eval: warning: the held-out stream ran past the corpus's first epoch into text the run trained on")
    return SplicedEval(snapshots=names, per_snapshot=results, n_positions=n_positions, tokens_from=held_out.source,
                       held_out=not held_out.reused_training_text, steps=[spec.step for spec in info.specs])


def _stream_positions(dictionary_dir: Path) -> list[dict[str, Any]] | None:
    """The dictionary's stream_position.json (where each rank's stream stood at the export), None if it has none."""
    path = dictionary_dir / STREAM_POSITION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DictionaryError(f"{path} is truncated or not valid JSON ({error}); re-export it") from error


def write_eval(dictionary_dir: str | Path, result: SplicedEval) -> Path:
    """eval.json in the dictionary folder (atomically: a reader never sees half of it)."""
    path = Path(dictionary_dir) / EVAL_FILE
    write_text_atomic(path, json.dumps(result.to_json(), indent=2))
    return path


def export_eval(dictionary_dir: Path, n_tokens: int, device: str, log: Callable[[str], None]) -> dict[str, float]:
    """The trainer's eval of one export: eval.json written, W&B figures returned; {} (with a note) when the
    snapshots cannot be evaluated. The global RNG is left as it was, so the run trains on exactly as without."""
    with torch.random.fork_rng(devices=[]):  # loading HF models draws initial weights from the global RNG
        try:
            result = evaluate_dictionary(dictionary_dir, n_tokens, device, log)
        except (ConfigError, torch.cuda.OutOfMemoryError) as error:  # e.g. the snapshots are gone; a full GPU
            log(f"skipping the spliced-in evaluation: {' '.join(str(error).split())}")
            return {}
    write_eval(dictionary_dir, result)
    return result.metrics()
