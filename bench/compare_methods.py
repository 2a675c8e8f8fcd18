"""The three methods on the embedded default (the tiny local GPT-NeoX, 8 snapshots), through the real entry points,
at the same token count, then one `crosscoder-compare` report (issue 14).

    python bench/compare_methods.py [--tokens 600000] [--out bench-out/compare_methods] [-- extra overrides]

Runs `crosscoder.train` three times with `crosscoder=topk` (the family How LLMs Learn uses): method=crosscoder,
method=independent, method=sae_track (its first link sized so that the chain's tokens equal the others':
first + 7 x first / 20 = tokens); aligns the independent stack with `crosscoder-match`; compares the crosscoder,
the aligned independent stack and the SAE-Track stack. Prints each method's wall time and tokens, the agreement
of each stack with the crosscoder, and where the report is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_SNAPSHOTS = 8
LINK_RATIO = 20


def _run(command: list[str]) -> float:
    started = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, cwd=REPO, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=600_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "compare_methods")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    out = args.out.resolve()
    first = args.tokens * LINK_RATIO // (LINK_RATIO + N_SNAPSHOTS - 1)
    methods = {
        "crosscoder": ["method=crosscoder"],
        "independent": ["method=independent"],
        "sae_track": ["method=sae_track", f"method.first_tokens={first}"],
    }
    walls = {}
    for name, overrides in methods.items():
        run_dir = out / name
        walls[name] = _run([sys.executable, "-m", "crosscoder.train", "crosscoder=topk", *overrides,
                            f"trainer.total_tokens={args.tokens}", f"hydra.run.dir={run_dir}", *args.overrides])
    aligned = out / "independent" / "dictionary_sae_match"
    _run([sys.executable, "-m", "crosscoder.cli.match", str(out / "independent" / "dictionary"),
          "--out", str(aligned)])
    inputs = [out / "crosscoder" / "dictionary", aligned, out / "sae_track" / "dictionary"]
    _run([sys.executable, "-m", "crosscoder.cli.compare", *map(str, inputs), "--names", "crosscoder",
          "independent+match", "sae_track", "--out", str(out / "compare")])
    figures = json.loads((out / "compare" / "compare.json").read_text())
    for name, seconds in walls.items():
        summary = json.loads((out / name / "summary.json").read_text())
        print(f"{name}: {seconds:.1f}s for the whole command, {summary['wall_seconds']:.1f}s training "
              f"({summary['tokens_seen']} tokens)")
    print(json.dumps({"inputs": figures["inputs"], "agreement": figures["agreement"]}, indent=1)[:6000])
    print(f"report: {out / 'compare' / 'report.html'}")


if __name__ == "__main__":
    main()
