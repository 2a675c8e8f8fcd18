"""Hook sites: where in an HF decoder block a hook point reads, and how to read or replace the activation there.

Hook points are TransformerLens-style names of block L:

- `blocks.L.hook_resid_pre`: the residual stream entering block L (the block's first input);
- `blocks.L.hook_resid_post`: the residual stream leaving it (the block's output);
- `blocks.L.hook_attn_out`: what block L's attention sublayer adds to the residual stream;
- `blocks.L.hook_mlp_out`: what its MLP (or mixture of experts) sublayer adds.

"Adds to the residual stream" decides the module read for the two sublayer hooks, so that in a sequential or a
parallel block resid_post = resid_pre + attn_out + mlp_out (tested on every supported architecture):

- post-norm blocks (Gemma 2/3, OLMo 2: a `post_feedforward_layernorm`): the outputs of the norms applied to the
  sublayer outputs (`post_attention_layernorm`, `post_feedforward_layernorm`), which are what is added;
- BLOOM: its attention and MLP modules add the residual themselves, so their output projections are read
  (`self_attention.dense`, `mlp.dense_4h_to_h`);
- OPT: no MLP module, so its second linear layer (`fc2`, whose output is flattened to [B*T, d]);
- otherwise the attention module (`self_attn`, `attention`, `attn`, `self_attention`) and the MLP module
  (`mlp`, `block_sparse_moe`, `feed_forward`, `ffn`); a tuple output's first element;
- Granite scales each sublayer's output by `residual_multiplier` before adding it: the read is scaled likewise.

Falcon adds its attention output into the MLP output's tensor in place, so every read is a copy.

A `SnapshotRunner` reads all of one snapshot's hooks in one forward, which stops as soon as the last of them has
fired (no later blocks, no final norm, no logits; crosscoder.evaluation.splicing runs on to the logits).

Every hook of this module writes into the residual stream, so every source is `hidden_size` wide: the crosscoder
keeps one width d for all sources (crosscoder.sources.models refuses mixed widths).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crosscoder.config import HookPoint
from crosscoder.errors import ConfigError

ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn")


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


@dataclass
class HookSite:
    """One hook point in one loaded model: the module it reads, and whether it reads that module's input."""

    hook: HookPoint
    module: nn.Module
    reads_input: bool = False
    scale: float = 1.0
    """Granite's residual multiplier: the read is the module output times this."""

    def read(self, args: tuple, kwargs: dict, output: Any, batch_shape: torch.Size) -> torch.Tensor:  # noqa: ANN401
        """The activation [B, T, d] from a hook call's arguments (input sites) or output."""
        if self.reads_input:
            return args[0] if args else kwargs["hidden_states"]
        value = output[0] if isinstance(output, tuple) else output
        value = value.reshape(*batch_shape, value.shape[-1])  # OPT's fc2 runs on [B*T, d]
        return value * self.scale if self.scale != 1.0 else value

    def register_read(self, callback: Callable[[torch.Tensor], None], batch_shape: torch.Size
                      ) -> torch.utils.hooks.RemovableHandle:
        """Call `callback(activation)` when the forward reaches this site (it may raise to stop the forward). The
        activation is a copy: a forward that goes on may change the tensor in place (Falcon adds the attention
        output into its MLP output's tensor)."""
        if self.reads_input:
            return self.module.register_forward_pre_hook(
                lambda module, args, kwargs: callback(self.read(args, kwargs, None, batch_shape).clone()),
                with_kwargs=True)
        return self.module.register_forward_hook(
            lambda module, args, output: callback(self.read(args, {}, output, batch_shape).clone()))

    def register_replace(self, replacement: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
        """Replace the activation here by `replacement` [B, T, d] for the forwards until the handle is removed."""
        if self.reads_input:
            def replace_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                hidden = args[0] if args else kwargs["hidden_states"]
                value = replacement.to(hidden.dtype).clone()  # the forward may change it in place
                return ((value, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": value})
            return self.module.register_forward_pre_hook(replace_input, with_kwargs=True)

        def replace_output(module: nn.Module, args: tuple, output: Any) -> Any:  # noqa: ANN401
            hidden = output[0] if isinstance(output, tuple) else output
            value = (replacement / self.scale if self.scale != 1.0 else replacement).to(hidden.dtype)
            value = value.reshape(hidden.shape).clone()  # the forward may change it in place (Falcon)
            return (value, *output[1:]) if isinstance(output, tuple) else value
        return self.module.register_forward_hook(replace_output)


def _sublayer(block: nn.Module, hook: HookPoint, model_type: str) -> nn.Module | None:
    """The module whose output is what the hook's sublayer adds to the residual stream (module docstring)."""
    attention = hook.position == "attn_out"
    if isinstance(getattr(block, "post_feedforward_layernorm", None), nn.Module):
        return getattr(block, "post_attention_layernorm" if attention else "post_feedforward_layernorm", None)
    if model_type == "bloom":
        parent = _child(block, ATTENTION_NAMES if attention else MLP_NAMES)
        return getattr(parent, "dense" if attention else "dense_4h_to_h", None) if parent is not None else None
    if not attention and _child(block, MLP_NAMES) is None and isinstance(getattr(block, "fc2", None), nn.Module):
        return block.fc2  # OPT
    return _child(block, ATTENTION_NAMES if attention else MLP_NAMES)


def hook_site(model: nn.Module, block: nn.Module, hook: HookPoint, name: str = "") -> HookSite:
    """The site of `hook` in `block` of `model`; a ConfigError naming the snapshot when the block has no such
    sublayer (e.g. an attention hook on Mamba) or the architecture computes it where no hook can read it."""
    if hook.position == "pre":
        return HookSite(hook, block, reads_input=True)
    if hook.position == "post":
        return HookSite(hook, block)
    config = language_config(getattr(model, "config", None))
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type == "bloom" and getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise ConfigError(f"{hook.name}: snapshot {name!r} is a BLOOM with slow_but_exact and pretraining_tp > 1, "
                          "whose sublayer outputs never pass through one module; hook the residual stream instead")
    module = _sublayer(block, hook, model_type)
    if module is None:
        sublayer = "attention" if hook.position == "attn_out" else "MLP"
        raise ConfigError(f"{hook.name}: block {hook.layer} of snapshot {name!r} ({type(block).__name__}) has no "
                          f"{sublayer} sublayer this tool can read; use blocks.L.hook_resid_pre/post")
    return HookSite(hook, module, scale=float(getattr(config, "residual_multiplier", 1.0) or 1.0))


def language_config(config: Any) -> Any:  # noqa: ANN401 (an HF config)
    """The language model's settings: a multimodal checkpoint (Gemma 3's ForConditionalGeneration, LLaVA) nests
    them in its text config; a text-only model's are its own."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config(decoder=True) if callable(get_text_config) else config


def _language_model(model: nn.Module) -> nn.Module:
    """The decoder a multimodal model's text runs through (its vision tower has blocks too); the model itself
    where it has no separate one."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        return model
    return decoder if isinstance(decoder, nn.Module) else model


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (gpt_neox.layers, model.layers, transformer.h, ...)."""
    n_layers = getattr(language_config(model.config), "num_hidden_layers", None)
    for _, module in _language_model(model).named_modules():
        if isinstance(module, nn.ModuleList) and (n_layers is None or len(module) == n_layers):
            return module
    raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}")


class _StopForward(Exception):
    """Raised by the last hook to fire once every activation is captured, so later blocks never run."""


class SnapshotRunner:
    """Runs one snapshot up to its deepest hook and returns the hooked activations [B, T, d], one per hook."""

    def __init__(self, model: nn.Module, hooks: HookPoint | Sequence[HookPoint], name: str = "") -> None:
        self.hooks = [hooks] if isinstance(hooks, HookPoint) else list(hooks)
        blocks = find_blocks(model)
        for hook in self.hooks:
            if hook.layer >= len(blocks):
                raise ConfigError(f"sources.hook={hook.name}: snapshot {name!r} has only {len(blocks)} blocks "
                                  f"(0..{len(blocks) - 1})")
        self.model, self.name = model, name
        self.sites = [hook_site(model, blocks[hook.layer], hook, name) for hook in self.hooks]
        self.hook, self.block = self.hooks[0], blocks[self.hooks[0].layer]
        self.d_model = int(language_config(model.config).hidden_size)

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """[B, T, d] at each hook, in `hooks` order, from one forward that stops once all have fired."""
        captured: list[torch.Tensor | None] = [None] * len(self.sites)

        def keep(index: int) -> Callable[[torch.Tensor], None]:
            def callback(value: torch.Tensor) -> None:
                if captured[index] is not None:  # a module run twice per forward: which call is the hook?
                    raise RuntimeError(f"{self.hooks[index].name} fired twice in one forward of {self.name!r}")
                captured[index] = value
                if all(c is not None for c in captured):
                    raise _StopForward
            return callback

        handles = [site.register_read(keep(i), input_ids.shape) for i, site in enumerate(self.sites)]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [hook.name for hook, value in zip(self.hooks, captured, strict=True) if value is None]
        if missing:
            raise RuntimeError(f"hook(s) {missing} on snapshot {self.name!r} did not fire")
        return captured  # type: ignore[return-value]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, d] at the runner's one hook (`capture` reads several)."""
        if len(self.hooks) != 1:
            raise TypeError(f"snapshot {self.name!r} is read at {len(self.hooks)} hooks: use capture()")
        return self.capture(input_ids, attention_mask)[0]
