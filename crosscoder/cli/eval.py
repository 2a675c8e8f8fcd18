"""`crosscoder-eval <dictionary> [--tokens N] [--device D]`: the spliced-in LM loss of an exported dictionary.

Re-runs the snapshots the dictionary's run configuration names on held-out tokens (crosscoder.evaluation.spliced) and
writes <dictionary>/eval.json; `crosscoder-analyze` then shows it in the report. Given a stack (independent
dictionaries, an SAE-Track chain: crosscoder.dictionary.stack), each of its dictionaries is evaluated on its own
snapshot and gets its own eval.json. Bad input (no such dictionary, a corrupt one, planted sources, snapshots that
are gone) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

from crosscoder.analysis.report.dictionary import check_dictionary_dir
from crosscoder.cli.arguments import ArgumentParser, check_device
from crosscoder.constants import CONFIG_FILE
from crosscoder.data.workers import resolve_worker_device
from crosscoder.dictionary.stack import STACK_MANIFEST_FILE, is_stack, stack_members
from crosscoder.errors import ConfigError, DictionaryError, exit_bad_input
from crosscoder.evaluation.spliced import METRIC_KEYS, SplicedEval, evaluate_dictionary, write_eval
from crosscoder.storage import exit_if_storage_failed

PROG = "crosscoder-eval"
DEFAULT_TOKENS = 4096
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Spliced-in LM loss per snapshot of an exported crosscoder dictionary: CE clean, with the hooked "
                    "activation replaced by the reconstruction, by zero and by the mean; fraction of CE recovered "
                    "and KL(clean || spliced), on held-out tokens. Writes <dictionary>/eval.json (in each "
                    "dictionary of a stack).",
    )
    parser.add_argument("dictionary", help="an exported dictionary folder (config.json, weights, decoder norms), "
                                           "or a stack of them (stack.json): each is evaluated")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                        help=f"held-out token positions to evaluate (default {DEFAULT_TOKENS})")
    parser.add_argument("--device", default="auto", help="where the snapshots run: auto (a GPU if any), cpu, cuda:N")
    return parser


def _fail(message: str) -> NoReturn:
    exit_bad_input(PROG, message)


def _table(results: list[SplicedEval]) -> str:
    header = f"{'snapshot':<16}" + "".join(f"{key:>18}" for key in METRIC_KEYS)
    rows = [f"{name:<16}" + "".join(f"{value:>18.4f}" for value in figures.figures().values())
            for result in results for name, figures in zip(result.snapshots, result.per_snapshot, strict=True)]
    return "\n".join([header, *rows])


def _dictionaries(path: str) -> list[Path]:
    """The folder itself, or each dictionary of a stack in snapshot order (its manifest checked first)."""
    if is_stack(path):
        return stack_members(path)
    folder = Path(path)
    inner = [] if (folder / CONFIG_FILE).is_file() else sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}"))
    if inner:  # the folders of a stack whose export never finished
        raise DictionaryError(f"{folder} holds dictionaries ({', '.join(p.name for p in inner)}) but no "
                              f"{STACK_MANIFEST_FILE}, so it is not a complete stack; pass one of them, e.g. "
                              f"{inner[0]}")
    return [check_dictionary_dir(path)]


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.tokens <= 0:
        _fail(f"--tokens={args.tokens} must be > 0")
    if not DEVICE_PATTERN.match(args.device):
        _fail(f"--device={args.device!r} is not auto, cpu, cuda, cuda:N or mps")
    check_device(parser, args.device)
    log = lambda message: print(message, flush=True)  # noqa: E731
    results, paths = [], []
    try:
        for dictionary in _dictionaries(args.dictionary):
            results.append(evaluate_dictionary(dictionary, args.tokens, resolve_worker_device(args.device), log))
            paths.append(write_eval(dictionary, results[-1]))
    except (DictionaryError, FileNotFoundError, ConfigError) as error:  # each names the file or the value
        _fail(str(error))
    except RuntimeError as error:  # e.g. --device=cuda:3 on a machine without it
        _fail(f"cannot run the snapshots on --device={args.device}: {error}")
    except OSError as error:  # eval.json: a full disk, read-only, no permission
        exit_if_storage_failed(PROG, error, args.dictionary)
        raise
    print(_table(results), flush=True)
    for path in paths:
        print(f"eval: {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
