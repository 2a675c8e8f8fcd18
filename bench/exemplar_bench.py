"""The exemplar pass's time and peak memory at F = 32,768, side by side for several N (and one smaller F): the
store grows as O(channels x F x N), the rest of the pass does not.

Each configuration runs in its own subprocess on the embedded toy LM's 8 snapshots (d = 64, built once into
CROSSCODER_CACHE if missing): a TopK crosscoder (k = 64) with random weights is exported with the default run's
configuration, then `exemplar_pass` replays T tokens through the real entry point. Peak memory is the process's
maximum RSS after the pass minus its RSS just before it (the snapshots and the dictionary already loaded), set
against the store's own size, channels x F x (N + K) x 16 bytes (score, value and key per entry).

    python bench/exemplar_bench.py [--tokens T] [--samples K]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

CONFIGS = [(32768, 5), (32768, 20), (32768, 80), (8192, 20)]
ENTRY_BYTES = 16  # float32 score + float32 value + int64 key


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def one(dict_size: int, top_n: int, samples: int, tokens: int, workdir: Path) -> dict:
    import torch
    from omegaconf import OmegaConf

    from crosscoder.analysis.interpretation.exemplars import ExemplarSettings, exemplar_pass
    from crosscoder.cli.compose import compose_run_config
    from crosscoder.data.kinds import describe_sources
    from crosscoder.dictionary.crosscoder import Crosscoder
    from crosscoder.dictionary.io import DictionaryMeta, export_dictionary

    torch.set_num_threads(1)
    cfg = compose_run_config([f"hydra.run.dir={workdir}"]).validate()  # the embedded default run
    info = describe_sources(cfg.sources, log=lambda _: None)
    torch.manual_seed(0)
    model = Crosscoder(len(info.specs), info.d_model, dict_size, "topk", k=64)
    meta = DictionaryMeta(sources=[asdict(spec) for spec in info.specs], hook=info.hook, d_model=info.d_model,
                          dict_size=dict_size, activation="topk", k=64, aux_k=0, tokens_seen=0, train_step=0,
                          input_scale=[1.0] * len(info.specs),
                          training=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    dictionary = export_dictionary(model.state_dict(), meta, workdir / f"dictionary-{dict_size}")
    settings = ExemplarSettings(top_n=top_n, samples=samples, n_tokens=tokens)
    exemplar_pass(dictionary, ExemplarSettings(top_n=1, samples=0, n_tokens=64), log=lambda _: None)  # warm up
    before = _rss_bytes()
    started = time.perf_counter()
    found = exemplar_pass(dictionary, settings, log=lambda _: None)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    channels = len(found.channels)
    return {"dict_size": dict_size, "top_n": top_n, "samples": samples, "channels": channels, "tokens": tokens,
            "seconds": seconds, "peak_over_start": max(peak - before, 0),
            "store": channels * dict_size * (top_n + max(samples, 1)) * ENTRY_BYTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--one", nargs=2, type=int, metavar=("F", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.samples, args.tokens, Path(args.workdir))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for dict_size, top_n in CONFIGS:
            done = subprocess.run([sys.executable, __file__, "--one", str(dict_size), str(top_n), "--tokens",
                                   str(args.tokens), "--samples", str(args.samples), "--workdir", workdir],
                                  capture_output=True, text=True, check=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"done F={dict_size} N={top_n}", file=sys.stderr, flush=True)
    base = rows[1]
    print(f"exemplar pass over {args.tokens:,} tokens, K={args.samples} sampled per latent and channel, "
          f"{base['channels']} channels (shared + 8 snapshots), 1 thread")
    print(f"{'F':>7} {'N':>4} {'seconds':>8} {'tokens/s':>9} {'peak MiB':>9} {'store MiB':>10} {'peak/store':>11} "
          f"{'peak vs F=32768,N=20':>21}")
    for row in rows:
        print(f"{row['dict_size']:>7} {row['top_n']:>4} {row['seconds']:>8.1f} {row['tokens'] / row['seconds']:>9,.0f} "
              f"{row['peak_over_start'] / 2**20:>9.1f} {row['store'] / 2**20:>10.1f} "
              f"{row['peak_over_start'] / row['store']:>11.2f} "
              f"{row['peak_over_start'] / max(base['peak_over_start'], 1):>20.2f}x")


if __name__ == "__main__":
    main()
