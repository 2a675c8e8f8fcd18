"""A crosscoder and independent per-snapshot dictionaries (+ SAE Match) on the planted source, side by side at
the same tokens (issue 14): wall time of each through the real trainer, each dictionary's recovery of the
features planted in its own snapshot, and the planted recovery (emergence exact) of the aligned stack.

    python bench/stack_methods.py            # TopK, k 6; 128 latents per dictionary, 512 for the crosscoder

The crosscoder is the planted test's shipped TopK recipe (crosscoder=topk over 8 snapshots, F=512, lr 4e-3).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.path.insert(0, str(REPO))
    from crosscoder.analysis.planted import planted_config, planted_recovery
    from crosscoder.analysis.sae_match import write_matched_stack
    from crosscoder.analysis.stack_report import stack_planted_recovery
    from crosscoder.stack import load_stack_decoders, read_stack
    from crosscoder.toy.planted import planted_truth
    from tests.analysis.test_planted_recovery import _per_snapshot_recovered, _train_clean, family_run_config

    root = Path(tempfile.mkdtemp(prefix="stack_methods_"))
    started = time.perf_counter()
    crosscoder = _train_clean(family_run_config(root / "crosscoder", "topk", 4e-3))
    crosscoder_seconds = time.perf_counter() - started
    score = planted_recovery(crosscoder)
    print(f"crosscoder  F=512 k=16: {crosscoder_seconds:.1f}s, recovered {score.fraction_recovered:.3f}, "
          f"emergence exact {score.emergence_accuracy:.3f}")

    cfg = family_run_config(root / "independent", "topk", 4e-3)
    cfg.method.name, cfg.crosscoder.dict_size, cfg.crosscoder.k = "independent", 128, 6
    started = time.perf_counter()
    stack = _train_clean(cfg)
    stack_seconds = time.perf_counter() - started
    _, metas = read_stack(stack)
    decoders, _, _ = load_stack_decoders(stack)
    truth = planted_truth(planted_config(metas[0].training))
    shares = _per_snapshot_recovered(list(decoders.unbind(1)), truth.decoder)
    print(f"independent 8 x F=128 k=6: {stack_seconds:.1f}s ({stack_seconds / crosscoder_seconds:.2f}x the "
          f"crosscoder), per-snapshot recovered {', '.join(f'{share:.2f}' for share in shares)}")
    for cost in ("mse", "cosine"):
        matched = write_matched_stack(stack, root / f"aligned-{cost}", cost=cost)
        aligned = stack_planted_recovery(matched.out_dir)
        pairs = ", ".join(f"{pair.share_above_threshold:.2f}" for pair in matched.pairs)
        print(f"  + crosscoder-match --cost {cost}: pairs above 0.7 {pairs}; recovered "
              f"{aligned.fraction_recovered:.3f}, emergence exact {aligned.emergence_accuracy:.3f}")


if __name__ == "__main__":
    main()
