"""`crosscoder-compare <input> <input> [...] [--out DIR] [--names ...] [--tokens N] [--threshold T] [--device D]`:
one HTML report comparing dictionaries trained on the same snapshots (crosscoder dictionary folders and aligned
stacks; crosscoder.analysis.alignment.compare)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from crosscoder.analysis.alignment.compare import (
    DEFAULT_MATCH_THRESHOLD,
    DEFAULT_REPLAY_TOKENS,
    IncompatibleInputsError,
    compare,
)
from crosscoder.analysis.report.compare import COMPARE_JSON, write_compare_report
from crosscoder.cli.arguments import ArgumentParser, check_device
from crosscoder.errors import DictionaryError, exit_bad_input
from crosscoder.storage import exit_if_storage_failed

PROG = "crosscoder-compare"
DEFAULT_OUT = "compare"
"""The report folder's name, by default in the folder holding all the inputs."""


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Compare dictionaries trained on the same snapshots (a crosscoder, stacks of per-snapshot SAEs "
                    "aligned by SAE-Track or crosscoder-match): emergence and classes, per-snapshot explained "
                    "variance and L0 on the same replayed tokens, and how each aligned stack's latents match each "
                    "crosscoder's; writes report.html and compare.json.",
    )
    parser.add_argument("inputs", nargs="+", help="2 or more exported dictionary folders or aligned stack folders")
    parser.add_argument("--out", default=None,
                        help=f"report folder (default: {DEFAULT_OUT}/ in the deepest folder holding every input)")
    parser.add_argument("--names", nargs="+", default=None,
                        help="one label per input (default: the folder names, with their parent when they repeat)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_REPLAY_TOKENS, metavar="N",
                        help="tokens replayed for explained variance and L0 (planted draws or the snapshots re-run "
                             f"on the run's token stream; default {DEFAULT_REPLAY_TOKENS}; 0 skips)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_MATCH_THRESHOLD,
                        help="similarity a crosscoder latent and a stack latent need to count as matched")
    parser.add_argument("--device", default="cpu",
                        help="where the dictionaries (and snapshots) run for the replay and the decoder similarities "
                             "are computed")
    return parser


def default_names(paths: list[Path]) -> list[str]:
    """Folder names; `parent/name` where a name repeats; `#i` appended where even that does."""
    names = [path.name or str(path) for path in paths]
    if len(set(names)) < len(names):
        names = [f"{path.resolve().parent.name}/{path.name}" for path in paths]
    if len(set(names)) < len(names):
        names = [f"{name} #{i + 1}" for i, name in enumerate(names)]
    return names


def default_out(paths: list[Path]) -> Path:
    """`compare/` in the deepest folder holding every input (e.g. runs/compare for runs/a/dictionary and runs/b)."""
    return Path(os.path.commonpath([str(path.resolve().parent) for path in paths])) / DEFAULT_OUT


def _fail(message: str) -> NoReturn:
    exit_bad_input(PROG, message)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The labels, after refusing bad arguments (usage error, exit 2)."""
    if len(args.inputs) < 2:
        parser.error(f"give at least 2 inputs to compare, got {len(args.inputs)}")
    if args.tokens < 0:
        parser.error(f"--tokens={args.tokens} must be >= 0")
    if not 0.0 < args.threshold <= 1.0:
        parser.error(f"--threshold={args.threshold} must be in (0, 1]")
    check_device(parser, args.device)
    names = args.names if args.names is not None else default_names([Path(p) for p in args.inputs])
    if len(names) != len(args.inputs) or len(set(names)) != len(names):
        parser.error(f"--names needs {len(args.inputs)} distinct labels, got {names}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    names = _check_args(parser, args)
    paths = [Path(p) for p in args.inputs]
    out = Path(args.out) if args.out is not None else default_out(paths)
    log = lambda message: print(message, flush=True)  # noqa: E731
    try:
        comparison = compare(paths, names, n_tokens=args.tokens, threshold=args.threshold, device=args.device,
                             log=log)
        for result in comparison.agreements:
            summary = result.summary()
            log(f"{result.stack} vs {result.crosscoder}: {summary['matched']} of {summary['crosscoder_live']} live "
                f"latents matched ({summary['matched_share']:.1%})")
        report = write_compare_report(comparison, out)
    except IncompatibleInputsError as error:
        _fail(f"the inputs differ: {error}")
    except (DictionaryError, FileNotFoundError) as error:  # names the file; an unaligned stack names crosscoder-match
        _fail(str(error))
    except ValueError as error:  # e.g. weights and decoder norms of different shapes
        _fail(str(error))
    except OSError as error:  # the report folder: a full disk, read-only, no permission
        exit_if_storage_failed(PROG, error, out)
        raise
    print(f"report: {report} ({COMPARE_JSON} beside it)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
