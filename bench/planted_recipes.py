"""Planted recovery of recipes through the real trainer: one line per run (issue 13's recipe search).

Each argument is a JSON object of dotted overrides laid over the planted test's run
(tests/unit/analysis/test_planted_recovery.planted_run_config: 128 planted features over 8 snapshots, d=64,
F=512, batch 512, 200k tokens, ReLU; every recipe key left unset takes the family's recipe,
crosscoder.config.recipes); a line reports the share of planted features
recovered at cosine >= 0.9, the share with their emergence snapshot exact, and the final L0, dead share and EV.

    python bench/planted_recipes.py '{"crosscoder.activation": "batchtopk"}' \\
        '{"crosscoder.activation": "jumprelu", "trainer.lr": 0.002, "sources.planted.seed": 7}'
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(overrides: dict) -> str:
    from crosscoder.analysis.features.planted import planted_recovery
    from crosscoder.cli.train import train
    from crosscoder.constants import RUN_SUMMARY_FILE
    from tests.unit.analysis.test_planted_recovery import planted_run_config

    cfg = planted_run_config(Path(tempfile.mkdtemp(prefix="planted_recipe_")) / "run")
    for key, value in overrides.items():
        *parents, name = key.split(".")
        target = cfg
        for part in parents:
            target = getattr(target, part)
        if not hasattr(target, name):
            raise SystemExit(f"unknown setting {key!r}")
        setattr(target, name, value)
    started = time.perf_counter()
    result = train(cfg)
    recovery = planted_recovery(result.dictionary_dir)
    summary = json.loads((result.output_dir / RUN_SUMMARY_FILE).read_text())
    return (f"{json.dumps(overrides)}: recovered {recovery.fraction_recovered:.3f}, emergence exact "
            f"{recovery.emergence_accuracy:.3f}, L0 {summary['l0']:.2f}, dead {summary['dead_fraction']:.2f}, "
            f"EV {summary['explained_variance/mean']:.3f} ({time.perf_counter() - started:.0f} s)")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lines = [run(json.loads(arg)) for arg in sys.argv[1:]]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
