"""Forwards that run a snapshot to its logits with the hooked activation read, or replaced by a given tensor.

A `SnapshotRunner` normally stops the forward at its hook (the activation is all it needs); the spliced-in
language-model loss (crosscoder.evaluation) must continue past the hook. These forwards use the runner's own block
and hook point: `hook_resid_pre` replaces the input of block L (the first positional argument, or the
`hidden_states` keyword), `hook_resid_post` its output (the first element when the block returns a tuple, as most
HF blocks do). The runner must hold a causal LM (`load_runners(..., with_lm_head=True)`), so the forward ends in
logits. The capture-and-stop path of `SnapshotRunner.__call__` is untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crosscoder.sources import SnapshotRunner


def _replace_pre(replacement: torch.Tensor) -> Any:  # noqa: ANN401 (a torch hook)
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        value = replacement.to(hidden.dtype)
        if args:
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}
    return hook


def _replace_post(replacement: torch.Tensor) -> Any:  # noqa: ANN401 (a torch hook)
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:  # noqa: ANN401
        hidden = output[0] if isinstance(output, tuple) else output
        value = replacement.to(hidden.dtype)
        return (value, *output[1:]) if isinstance(output, tuple) else value
    return hook


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
                            replacement: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits of the snapshot with its hooked activation [B, T, d] replaced by `replacement` at every
    position (callers keep the clean activation where they do not want a change)."""
    _check_shape(runner, input_ids, replacement)
    if runner.hook.position == "pre":
        handle = runner.block.register_forward_pre_hook(_replace_pre(replacement), with_kwargs=True)
    else:
        handle = runner.block.register_forward_hook(_replace_post(replacement))
    try:
        return _logits(runner, input_ids, attention_mask)
    finally:
        handle.remove()


@torch.no_grad()
def logits_and_activation(runner: SnapshotRunner, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean forward: ([B, T, V] logits, [B, T, d] hooked activation), read without stopping the forward."""
    captured: list[torch.Tensor] = []
    if runner.hook.position == "pre":
        def read_pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
        handle = runner.block.register_forward_pre_hook(read_pre, with_kwargs=True)
    else:
        def read_post(module: nn.Module, args: tuple, output: Any) -> None:  # noqa: ANN401
            captured.append(output[0] if isinstance(output, tuple) else output)
        handle = runner.block.register_forward_hook(read_post)
    try:
        logits = _logits(runner, input_ids, attention_mask)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"hook on snapshot {runner.name!r} fired {len(captured)} times in one forward")
    return logits, captured[0]
