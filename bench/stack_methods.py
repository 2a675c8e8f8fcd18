"""The three methods on the planted source (issue 14), through the real trainer: wall time of each, each
dictionary's recovery of the features planted in its own snapshot, and the planted recovery (emergence exact)
the evolution analysis reads from the crosscoder, the aligned independent stack and the SAE-Track stack.

    python bench/stack_methods.py

The crosscoder is the planted test's shipped TopK recipe (crosscoder=topk over 8 snapshots, F=512, lr 4e-3,
200k tokens). Independent: 8 x F=128, k 6, the same 200k tokens (one pass). SAE-Track: F=128 and F=256, k 6,
200k tokens from scratch, then each link either the paper's ratios (a twentieth of the tokens at a tenth of the
rate) or 51200 tokens at the first link's rate.
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
    from crosscoder.analysis.alignment.sae_match import write_matched_stack
    from crosscoder.analysis.features.planted import planted_config, planted_recovery
    from crosscoder.analysis.report.stack import stack_planted_recovery
    from crosscoder.data.planted import planted_truth
    from crosscoder.dictionary.stack import load_stack_decoders, read_stack
    from crosscoder.training.sae_track import train_sae_track
    from tests.unit.analysis.test_planted_recovery import _per_snapshot_recovered, _train_clean, family_run_config

    root = Path(tempfile.mkdtemp(prefix="stack_methods_"))
    warm_up = family_run_config(root / "warm-up", "topk", 4e-3)  # DeepSpeed's one-time set-up, not timed
    warm_up.trainer.total_tokens = 2 * warm_up.trainer.batch_size
    _train_clean(warm_up)
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

    for dict_size, link_tokens, link_lr in ((128, 0, 0.0), (256, 0, 0.0), (256, 51200, 4e-3)):
        cfg = family_run_config(root / f"sae_track-{dict_size}-{link_tokens}", "topk", 4e-3)
        cfg.method.name, cfg.crosscoder.dict_size, cfg.crosscoder.k = "sae_track", dict_size, 6
        cfg.method.link_tokens, cfg.method.link_lr = link_tokens, link_lr
        started = time.perf_counter()
        chain = train_sae_track(cfg, log=lambda _: None)
        seconds = time.perf_counter() - started
        _, metas = read_stack(chain.dictionary_dir)
        decoders, _, _ = load_stack_decoders(chain.dictionary_dir)
        shares = _per_snapshot_recovered(list(decoders.unbind(1)), truth.decoder)
        score = stack_planted_recovery(chain.dictionary_dir)
        links = "paper ratios" if not link_tokens else f"links {link_tokens} tokens at lr {link_lr:g}"
        print(f"sae_track F={dict_size}, {links}: {seconds:.1f}s, {chain.tokens_seen} tokens, per-snapshot "
              f"recovered {', '.join(f'{share:.2f}' for share in shares)}; recovered {score.fraction_recovered:.3f}, "
              f"emergence exact {score.emergence_accuracy:.3f}")


if __name__ == "__main__":
    main()
