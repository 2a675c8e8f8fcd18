"""`crosscoder-analyze <dictionary dir> [--out DIR]`: the feature-evolution report of an exported dictionary, or of
an aligned stack of single-snapshot dictionaries (crosscoder.analysis.report.stack)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from crosscoder.analysis.diagnostics.progress import DEFAULT_PROGRESS_TOKENS
from crosscoder.analysis.diagnostics.scaling import LatentScaling
from crosscoder.analysis.features.evolution import Evolution
from crosscoder.analysis.features.planted import planted_recovery
from crosscoder.analysis.inputs.contexts import CONTEXTS_TITLE, contexts_section, top_contexts
from crosscoder.analysis.inputs.replay import has_activations
from crosscoder.analysis.interpretation.exemplar_files import EXEMPLARS_DIR, write_exemplars
from crosscoder.analysis.interpretation.exemplars import ExemplarSettings, exemplar_pass
from crosscoder.analysis.interpretation.label_scores import LABELS_FILE, label_scores
from crosscoder.analysis.report.adjacent import DEFAULT_ADJACENT_TOKENS, adjacent_or_none
from crosscoder.analysis.report.by_hook import hook_views
from crosscoder.analysis.report.dictionary import analyze_dictionary, check_dictionary_dir, load_evolution
from crosscoder.analysis.report.html import leading_features
from crosscoder.analysis.report.plots import MAX_HEATMAP_ROWS
from crosscoder.analysis.report.progress import progress_or_none
from crosscoder.analysis.report.scaling import DEFAULT_SCALING_TOKENS, dictionary_scaling
from crosscoder.analysis.report.stack import SKIPPED_FOR_STACKS, stack_planted_recovery
from crosscoder.cli.arguments import ArgumentParser, check_device
from crosscoder.constants import ANALYSIS_DIR
from crosscoder.dictionary.io import DictionaryMeta, read_meta
from crosscoder.dictionary.provenance import unsupported_reason
from crosscoder.dictionary.stack import is_stack
from crosscoder.errors import ConfigError, DictionaryError, exit_bad_input
from crosscoder.storage import exit_if_storage_failed, write_text_atomic

PROG = "crosscoder-analyze"
CONTEXTS_PER_CELL = 3
"""Contexts shown per latent and snapshot in the report."""


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Feature-evolution analysis of an exported crosscoder dictionary: trajectories, emergence, "
                    "classes, drift, snapshot similarity; writes PNGs, features.csv, summary.json and report.html.",
    )
    parser.add_argument("dictionary", help="an exported dictionary folder (config.json, weights, decoder norms), or "
                                           "an aligned stack folder (stack.json: crosscoder-match's output or an "
                                           "SAE-Track chain)")
    parser.add_argument("--out", default=None, help=f"output folder (default: <dictionary>/{ANALYSIS_DIR})")
    parser.add_argument("--max-rows", type=int, default=MAX_HEATMAP_ROWS,
                        help="latents shown in the trajectory heatmap (sampled evenly beyond this)")
    parser.add_argument("--contexts", type=int, default=3, metavar="N",
                        help="top-activating contexts of the N leading latents per class, from re-running the "
                             "snapshots on the run's token stream (0 disables; skipped for sources without text)")
    parser.add_argument("--context-tokens", type=int, default=20000, metavar="T",
                        help="tokens streamed for the top contexts")
    parser.add_argument("--scaling-tokens", type=int, default=DEFAULT_SCALING_TOKENS, metavar="T",
                        help="tokens to fit latent scaling on (shrinkage artefacts: a latent whose decoder norm says "
                             "absent in a snapshot that still holds its direction), from planted draws or the "
                             f"snapshots re-run on the run's token stream (default {DEFAULT_SCALING_TOKENS}; 0 "
                             "disables; skipped for dictionaries whose activations cannot be re-created)")
    parser.add_argument("--progress-tokens", type=int, default=DEFAULT_PROGRESS_TOKENS, metavar="T",
                        help="aligned stacks only: tokens replayed for SAE-Track's progress measure (each final "
                             "latent's top tokens' code cosine at every snapshot, minus random tokens'), from planted "
                             f"draws or the snapshots re-run on the run's token stream (default "
                             f"{DEFAULT_PROGRESS_TOKENS}; 0 disables; skipped when activations cannot be re-created)")
    parser.add_argument("--adjacent-tokens", type=int, default=DEFAULT_ADJACENT_TOKENS, metavar="T",
                        help="tokens replayed for the adjacent-source statistics (the best-correlated latent of the "
                             "next source for each latent: features passing through, appearing, disappearing), from "
                             f"planted draws or the snapshots re-run (default {DEFAULT_ADJACENT_TOKENS}; 0 disables; "
                             "skipped when activations cannot be re-created)")
    parser.add_argument("--exemplars", type=int, default=0, metavar="N",
                        help="exemplar files: the top N activating tokens of every latent at every channel (a "
                             "crosscoder's shared code and each source's own code; each dictionary of a stack), "
                             "with a uniform sample of its firings, into <out>/exemplars/ as Parquet (0 disables; "
                             "skipped for sources without text)")
    parser.add_argument("--exemplar-tokens", type=int, default=ExemplarSettings.n_tokens, metavar="T",
                        help=f"tokens replayed for the exemplars (default {ExemplarSettings.n_tokens})")
    parser.add_argument("--exemplar-samples", type=int, default=ExemplarSettings.samples, metavar="K",
                        help="firings sampled uniformly per latent and channel: the quantile exemplars (default "
                             f"{ExemplarSettings.samples})")
    parser.add_argument("--label-tokens", type=int, default=0, metavar="T",
                        help="the embedded toy corpus only: score every latent's AUROC for every oracle label (topic, "
                             "role, number, quotes, brackets, counting, arithmetic, repeated names) over T replayed "
                             "tokens, into <out>/labels.json (0 disables)")
    parser.add_argument("--device", default="cpu",
                        help="where the snapshots and the crosscoder run for contexts, latent scaling, the "
                             "progress measure and the adjacent statistics")
    return parser


def contexts_sections(dictionary: Path, evo: Evolution, meta: DictionaryMeta, per_class: int, n_tokens: int,
                      device: str, log: Callable[[str], None]) -> list[tuple[str, str]]:
    """The top-contexts report section, or none (with a note) when the dictionary's sources cannot give text."""
    reason = unsupported_reason(meta)
    if reason is not None:
        log(f"skipping top contexts: {reason}")
        return []
    features = [i for members in leading_features(evo, per_class).values() for i in members]
    if not features:
        log("skipping top contexts: no live latents")
        return []
    try:
        result = top_contexts(dictionary, features, n_tokens=n_tokens, top_k=CONTEXTS_PER_CELL, device=device,
                              log=log)
    except ConfigError as error:  # e.g. snapshots no longer where the run found them
        log(f"skipping top contexts: {error}")
        return []
    return [(CONTEXTS_TITLE, contexts_section(result, evo))]


def scaling_or_none(dictionary: Path, evo: Evolution, meta: DictionaryMeta, n_tokens: int, device: str,
                    log: Callable[[str], None]) -> LatentScaling | None:
    """Latent scaling, or None (with a note) when the dictionary's activations cannot be re-created."""
    reason = has_activations(meta)
    if reason is not None:
        log(f"skipping latent scaling: {reason}")
        return None
    try:
        return dictionary_scaling(dictionary, evo, n_tokens, device, log)
    except ConfigError as error:  # e.g. snapshots no longer where the run found them
        log(f"skipping latent scaling: {error}")
        return None


def exemplars_or_none(dictionary: Path, meta: DictionaryMeta, settings: ExemplarSettings, out_dir: Path,
                      device: str, log: Callable[[str], None]) -> Path | None:
    """The exemplar folder written under `out_dir`, or None (with a note) when the sources give no text."""
    reason = unsupported_reason(meta)
    if reason is not None:
        log(f"skipping exemplars: {reason}")
        return None
    try:
        found = exemplar_pass(dictionary, settings, device, log)
    except ConfigError as error:  # e.g. snapshots no longer where the run found them
        log(f"skipping exemplars: {error}")
        return None
    return write_exemplars(found, out_dir / EXEMPLARS_DIR, dictionary)


def labels_or_none(dictionary: Path, n_tokens: int, out_dir: Path, device: str,
                   log: Callable[[str], None]) -> Path | None:
    """labels.json (each oracle label's best latents by AUROC) under `out_dir`, or None (with a note) for a
    dictionary not trained on the toy corpus."""
    try:
        scores = label_scores(dictionary, n_tokens, device, log)
    except ConfigError as error:
        log(f"skipping oracle labels: {error}")
        return None
    best = scores.best()
    by_kind: dict[str, dict] = {}
    for item in best:
        if item["auroc"] and item["auroc"][0] > by_kind.get(item["kind"], {"auroc": [-1.0]})["auroc"][0]:
            by_kind[item["kind"]] = item
    log("oracle labels, the best latent per kind: " + ", ".join(
        f"{kind}={item['value']}: latent {item['latents'][0]} AUROC {item['auroc'][0]:.3f}"
        for kind, item in by_kind.items()))
    path = out_dir / LABELS_FILE
    write_text_atomic(path, json.dumps({"n_tokens": scores.n_tokens, "labels": best}, indent=2))
    return path


def _fail(message: str) -> NoReturn:
    exit_bad_input(PROG, message)


def main(argv: list[str] | None = None) -> None:
    """Analyse one exported dictionary; a missing, truncated or corrupt dictionary file exits 2 naming it."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.contexts < 0 or args.context_tokens <= 0 or min(args.scaling_tokens, args.progress_tokens,
                                                             args.adjacent_tokens) < 0:
        parser.error(f"--contexts={args.contexts} must be >= 0, --context-tokens={args.context_tokens} > 0, "
                     f"--scaling-tokens={args.scaling_tokens}, --progress-tokens={args.progress_tokens} and "
                     f"--adjacent-tokens={args.adjacent_tokens} >= 0")
    if args.exemplars < 0 or args.exemplar_tokens <= 0 or args.exemplar_samples < 0 or args.label_tokens < 0:
        parser.error(f"--exemplars={args.exemplars}, --exemplar-samples={args.exemplar_samples} and "
                     f"--label-tokens={args.label_tokens} must be >= 0, --exemplar-tokens={args.exemplar_tokens} > 0")
    check_device(parser, args.device)
    stack = is_stack(args.dictionary)  # latent i is one feature across its dictionaries only once aligned
    try:
        dictionary = Path(args.dictionary) if stack else check_dictionary_dir(args.dictionary)
    except FileNotFoundError as error:
        _fail(str(error))  # the message names the path
    log = lambda message: print(message, flush=True)  # noqa: E731
    try:
        by_hook = not stack and bool(hook_views(read_meta(dictionary)))
    except (DictionaryError, FileNotFoundError) as error:
        _fail(str(error))
    if by_hook:
        _analyze_by_hook(args, log)
        return
    try:
        log(f"loading {dictionary}")
        evolution = load_evolution(dictionary)  # once, for picking the context latents and for the report
        if stack:
            log(f"skipping: {SKIPPED_FOR_STACKS}")
        extra = contexts_sections(dictionary, *evolution, args.contexts, args.context_tokens, args.device, log) \
            if args.contexts and not stack else []
        try:  # a dictionary (or stack) of planted features is scored against them
            planted = stack_planted_recovery(dictionary) if stack else planted_recovery(dictionary)
        except ValueError as error:  # its metadata names a planted problem it does not fit
            log(f"skipping planted recovery: {error}")
            planted = None
        if planted is not None:
            log(f"planted features recovered (cosine >= {planted.threshold}): {planted.fraction_recovered:.1%}, "
                f"emergence snapshot exact: {planted.emergence_accuracy:.1%}")
        scaling = scaling_or_none(dictionary, *evolution, args.scaling_tokens, args.device, log) \
            if args.scaling_tokens and not stack else None
        progress = progress_or_none(dictionary, args.progress_tokens, args.device, log) \
            if args.progress_tokens and stack else None
        adjacent = adjacent_or_none(dictionary, args.adjacent_tokens, args.device, log) if args.adjacent_tokens \
            else None
        result = analyze_dictionary(args.dictionary, args.out, max_heatmap_rows=args.max_rows, extra_sections=extra,
                                    recovery=planted, evolution=evolution, log=log, scaling=scaling,
                                    progress=progress, adjacent=adjacent)
        if args.label_tokens and not stack:
            labels_or_none(dictionary, args.label_tokens, Path(result.report).parent, args.device, log)
        if args.exemplars:
            settings = ExemplarSettings(top_n=args.exemplars, samples=args.exemplar_samples,
                                        n_tokens=args.exemplar_tokens)
            written = exemplars_or_none(dictionary, evolution[1], settings, Path(result.report).parent, args.device,
                                        log)
            if written is not None:
                log(f"exemplars: {written}")
    except (DictionaryError, FileNotFoundError) as error:  # a file missing, truncated or corrupt: it is named
        _fail(str(error))
    except ValueError as error:  # e.g. weights and decoder norms of different shapes
        _fail(f"{args.dictionary}: {error}")
    except OSError as error:  # the report folder: a full disk, read-only, no permission
        exit_if_storage_failed(PROG, error, args.out or args.dictionary)
        raise
    print(f"report: {result.report}", flush=True)


def _analyze_by_hook(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """A snapshots x hooks crosscoder: the evolution one hook at a time (crosscoder.analysis.report.by_hook). The
    analyses that pick latents from one evolution or pair neighbouring sources (top contexts, latent scaling, the
    adjacent statistics) are not run on it: its neighbouring sources alternate hook and snapshot."""
    log(f"{args.dictionary}: snapshots x hooks, analysed one hook at a time; skipping top contexts, latent scaling "
        "and adjacent statistics (they read the sources as one axis)")
    try:
        result = analyze_dictionary(args.dictionary, args.out, max_heatmap_rows=args.max_rows, log=log)
    except (DictionaryError, FileNotFoundError) as error:
        _fail(str(error))
    except ValueError as error:
        _fail(f"{args.dictionary}: {error}")
    except OSError as error:
        exit_if_storage_failed(PROG, error, args.out or args.dictionary)
        raise
    for hook, hook_result in result.by_hook.items():
        log(f"{hook}: {hook_result.evolution.class_counts()} ({hook_result.report})")
    print(f"report: {result.report}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
