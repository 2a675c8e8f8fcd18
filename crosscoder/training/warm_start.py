"""Warm start (`crosscoder.init_from`): a run whose crosscoder starts from an exported dictionary's weights, with a
fresh optimizer and schedule. SAE-Track's chains are built of these (each snapshot's dictionary continues the
previous one's); it also continues a dictionary on new tokens.

The exported weights are folded for raw activations (W_enc[s] c_s, W_dec[:, s] / c_s, b_dec[s] / c_s, with the
dictionary's own input scales c); the crosscoder trains in normalised space, so they are unfolded with those
scales, and the run then measures its own input scales as usual: the latents continue in normalised space.
"""

from __future__ import annotations

from pathlib import Path

import torch

from crosscoder.config import RunConfig
from crosscoder.dictionary.io import DictionaryMeta, load_dictionary, read_meta
from crosscoder.errors import ConfigError, DictionaryError

CARRIED_BUFFERS = ("input_scale", "folded")
"""State the run sets for itself: its own input scales, unfolded."""


def check_warm_start(cfg: RunConfig, n_sources: int, d_model: int) -> DictionaryMeta | None:
    """The metadata of `crosscoder.init_from` (None when unset), refused with one line naming the setting when
    the dictionary is unreadable or cannot start this crosscoder (checked before any model loads)."""
    path = cfg.crosscoder.init_from
    if not path:
        return None
    folder = Path(path).expanduser()
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, DictionaryError) as error:
        raise ConfigError(f"crosscoder.init_from={path!r}: {error}") from error
    wanted = {"activation": cfg.crosscoder.activation, "dict_size": cfg.crosscoder.dict_size, "d_model": d_model,
              "snapshots": n_sources}
    found = {"activation": meta.activation, "dict_size": meta.dict_size, "d_model": meta.d_model,
             "snapshots": len(meta.sources)}
    differ = [f"{key} {found[key]} (this run: {wanted[key]})" for key in wanted if found[key] != wanted[key]]
    if differ:
        raise ConfigError(f"crosscoder.init_from={path!r} cannot start this crosscoder: its " + ", ".join(differ))
    if cfg.parallel.snapshot_parallel > 1:
        raise ConfigError("crosscoder.init_from loads the whole crosscoder on every rank: use "
                          "parallel.snapshot_parallel=1")
    return meta


def normalized_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The exported dictionary's learned tensors in normalised space (module docstring), without the buffers a
    run sets for itself (CARRIED_BUFFERS)."""
    model, meta = load_dictionary(Path(path).expanduser())
    scale = torch.tensor(meta.input_scale, dtype=model.W_enc.dtype)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items() if name not in CARRIED_BUFFERS}
    state["W_enc"] /= scale[:, None, None]
    state["W_dec"] *= scale[None, :, None]
    state["b_dec"] *= scale[:, None]
    return state


@torch.no_grad()
def warm_start(model: torch.nn.Module, path: str | Path) -> None:
    """Load `path`'s weights into the (unfolded) crosscoder `model`; every learned tensor must be replaced."""
    weights = normalized_weights(path)
    state = model.state_dict()
    missing = sorted(set(state) - set(weights) - set(CARRIED_BUFFERS))
    if missing or set(weights) - set(state):
        raise DictionaryError(f"{path} holds {sorted(weights)}, the crosscoder needs {sorted(state)}: re-export it")
    for name, tensor in weights.items():
        state[name].copy_(tensor.to(state[name].dtype))
