"""What reading several hooks in one forward saves: cross-layer sources as `sources.hooks` reads them (one forward
per snapshot, stopped after the deepest hook) against one forward per hook (what a hook-per-run tool does).

Side by side in one process, on a random-init model of each layout (no download), the same token batches:

  one forward   SnapshotRunner(model, hooks).capture(...)
  per hook      SnapshotRunner(model, hook)(...) for each hook

and prints tokens/s of each and their ratio; both read the same activations (checked, exactly).

    python bench/hooks_bench.py                    # GPT-NeoX and Llama, d=512, 8 blocks, 4 residual hooks
    python bench/hooks_bench.py --layers 12 --hooks 0,3,6,9,11 --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import GPTNeoXConfig, GPTNeoXModel, LlamaConfig, LlamaModel

from crosscoder.config import HookPoint
from crosscoder.sources.hooks import SnapshotRunner


def _model(layout: str, width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(vocab_size=4096, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
                 intermediate_size=4 * width)
    model = GPTNeoXModel(GPTNeoXConfig(**shape)) if layout == "gpt_neox" else LlamaModel(LlamaConfig(**shape))
    return model.eval()


def _time(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hooks", default="1,3,5,7", help="blocks whose hook_resid_post is read")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hooks = [HookPoint(int(layer), "post") for layer in args.hooks.split(",")]
    input_ids = torch.randint(0, 4096, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    tokens = input_ids.numel()
    print(f"{len(hooks)} hooks ({', '.join(h.name for h in hooks)}), batch {args.batch} x {args.seq_len}, "
          f"d={args.width}, {args.layers} blocks, {torch.get_num_threads()} threads")
    print(f"{'layout':10s} {'one forward tok/s':>18s} {'per hook tok/s':>15s} {'ratio':>6s}")
    for layout in ("gpt_neox", "llama"):
        model = _model(layout, args.width, args.layers)
        together = SnapshotRunner(model, hooks, layout)
        alone = [SnapshotRunner(model, hook, layout) for hook in hooks]
        joint = together.capture(input_ids, mask)
        separate = [runner(input_ids, mask) for runner in alone]
        assert all(torch.equal(a, b) for a, b in zip(joint, separate, strict=True)), "the two paths disagree"
        one = _time(lambda runner=together: runner.capture(input_ids, mask), args.repeats)
        each = _time(lambda runners=alone: [runner(input_ids, mask) for runner in runners], args.repeats)
        print(f"{layout:10s} {tokens / one:18,.0f} {tokens / each:15,.0f} {each / one:6.2f}")


if __name__ == "__main__":
    main()
