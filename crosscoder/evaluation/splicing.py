"""Forwards that run a snapshot to its logits with the hooked activation read, or replaced by a given tensor.

A `SnapshotRunner` normally stops the forward at its hook (the activation is all it needs); the spliced-in
language-model loss (evaluation.spliced) must continue past the hook. These forwards use the runner's hook sites
(crosscoder.sources.hooks: a block's input for `hook_resid_pre`, its output for `hook_resid_post`, the sublayer module's
output for `hook_attn_out` / `hook_mlp_out`), one hook at a time: `hook` indexes the runner's hooks. The runner
must hold a causal LM (`load_runners(..., with_lm_head=True)`), so the forward ends in logits.
"""

from __future__ import annotations

import torch

from crosscoder.sources.hooks import SnapshotRunner


def _check_shape(runner: SnapshotRunner, input_ids: torch.Tensor, replacement: torch.Tensor) -> None:
    expected = (*input_ids.shape, runner.d_model)
    if tuple(replacement.shape) != expected:
        raise ValueError(f"the replacement of snapshot {runner.name!r}'s hooked activation is "
                         f"{list(replacement.shape)}, expected {list(expected)} (batch, positions, d_model)")


def _logits(runner: SnapshotRunner, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    output = runner.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"snapshot {runner.name!r} was loaded without its LM head ({type(runner.model).__name__}); "
                        "load it with load_runners(..., with_lm_head=True) to run it to logits")
    return logits


@torch.no_grad()
def logits_with_replacement(runner: SnapshotRunner, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            replacement: torch.Tensor, hook: int = 0) -> torch.Tensor:
    """[B, T, V] logits of the snapshot with its activation [B, T, d] at hook `hook` replaced by `replacement` at
    every position (callers keep the clean activation where they do not want a change)."""
    _check_shape(runner, input_ids, replacement)
    handle = runner.sites[hook].register_replace(replacement)
    try:
        return _logits(runner, input_ids, attention_mask)
    finally:
        handle.remove()


@torch.no_grad()
def logits_and_activation(runner: SnapshotRunner, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          hook: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean forward: ([B, T, V] logits, [B, T, d] activation at hook `hook`), read without stopping it."""
    captured: list[torch.Tensor] = []
    handle = runner.sites[hook].register_read(captured.append, input_ids.shape)
    try:
        logits = _logits(runner, input_ids, attention_mask)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{runner.hooks[hook].name} on snapshot {runner.name!r} fired {len(captured)} times in "
                           "one forward")
    return logits, captured[0]
