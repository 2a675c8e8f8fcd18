"""`crosscoder-match <stack> [--out DIR] [--cost mse|cosine] [--threshold 0.7]`: SAE Match over a stack of
single-snapshot dictionaries (analysis.alignment.sae_match), writing the aligned stack crosscoder-analyze reads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from crosscoder.analysis.alignment.sae_match import COSTS, DEFAULT_MATCH_COSINE, MATCH_QUALITY_FILE, write_matched_stack
from crosscoder.cli.arguments import ArgumentParser
from crosscoder.errors import DictionaryError, exit_bad_input
from crosscoder.storage import exit_if_storage_failed

PROG = "crosscoder-match"
OUT_SUFFIX = "_sae_match"


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="SAE Match: permute each snapshot's dictionary so latent i is the same feature across the stack "
                    "(linear assignment on the decoders with input scales and JumpReLU thresholds folded in, "
                    "chained from the first snapshot); writes an aligned stack and match_quality.json.",
    )
    parser.add_argument("stack", help="a stack folder (stack.json and one exported dictionary per snapshot)")
    parser.add_argument("--out", default=None, help=f"the aligned stack's folder (default: <stack>{OUT_SUFFIX})")
    parser.add_argument("--cost", choices=COSTS, default="mse",
                        help="mse: squared distance of the folded decoders (SAE Match); cosine: 1 - cosine")
    parser.add_argument("--threshold", type=float, default=DEFAULT_MATCH_COSINE,
                        help="decoder cosine a matched pair needs to count as a good match in the quality figures")
    return parser


def _fail(message: str) -> NoReturn:
    exit_bad_input(PROG, message)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not -1.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold={args.threshold} must be a cosine in [-1, 1]")
    stack = Path(args.stack)
    out = Path(args.out) if args.out is not None else stack.with_name(stack.name + OUT_SUFFIX)
    try:
        result = write_matched_stack(stack, out, cost=args.cost, threshold=args.threshold)
    except (DictionaryError, FileNotFoundError) as error:  # the message names the file
        _fail(str(error))
    except ValueError as error:  # --out inside the stack, non-finite costs
        _fail(f"{stack}: {error}")
    except OSError as error:  # the output folder: a full disk, read-only, no permission
        exit_if_storage_failed(PROG, error, out)
        raise
    for pair in result.pairs:
        print(f"{pair.a} -> {pair.b}: {pair.share_above_threshold:.1%} of matched pairs at cosine >= "
              f"{pair.threshold}, mean cosine {pair.mean_cosine:.3f}, relative mse {pair.relative_mse:.3g}", flush=True)
    print(f"aligned stack: {result.out_dir} ({MATCH_QUALITY_FILE} inside)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
