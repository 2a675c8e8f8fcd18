"""`crosscoder-analyze <dictionary dir> [--out DIR]`: the feature-evolution report of an exported dictionary."""

from __future__ import annotations

import argparse
import sys

from crosscoder.analysis.plots import MAX_HEATMAP_ROWS
from crosscoder.analysis.report import analyze_dictionary, check_dictionary_dir
from crosscoder.constants import ANALYSIS_DIR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosscoder-analyze",
        description="Feature-evolution analysis of an exported crosscoder dictionary: trajectories, emergence, "
                    "classes, drift, snapshot similarity; writes PNGs, features.csv, summary.json and report.html.",
    )
    parser.add_argument("dictionary", help="an exported dictionary folder (config.json, weights, decoder norms)")
    parser.add_argument("--out", default=None, help=f"output folder (default: <dictionary>/{ANALYSIS_DIR})")
    parser.add_argument("--max-rows", type=int, default=MAX_HEATMAP_ROWS,
                        help="latents shown in the trajectory heatmap (sampled evenly beyond this)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_dictionary_dir(args.dictionary)
    except FileNotFoundError as error:
        parser.error(str(error))  # exit status 2, message names the path
    try:
        result = analyze_dictionary(args.dictionary, args.out, max_heatmap_rows=args.max_rows,
                                    log=lambda message: print(message, flush=True))
    except (ValueError, FileNotFoundError) as error:  # e.g. an unsupported format_version
        parser.error(f"{args.dictionary}: {error}")
    print(f"report: {result.report}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
