"""Independent dictionaries: one single-snapshot dictionary per snapshot, trained side by side from one stream
(`method=independent`; How LLMs Learn, Inaba et al. 2025, and the input of SAE Match).

Dictionary s is a whole `Crosscoder` over one source (any activation family, S = 1) and sees only x[:, s]: the
losses add, and no parameter is shared, so each dictionary's gradient is that of its own loss (the one coupling
is the global gradient-norm clip, as it is between a crosscoder's snapshots). One pass over the tokens trains all
of them. Split by snapshot (crosscoder.parallel.layout), a rank holds and trains only its share's dictionaries: nothing
is summed over the snapshot group, so each rank's work is its own snapshots'.

Each dictionary's initial weights come from its own seed (the run's seed and the snapshot's index), so every
layout starts from the same dictionaries. Codes are [B, S, F] (latent i of snapshot s is dictionary s's, and
means nothing across snapshots until crosscoder-match aligns them); the export is a stack (crosscoder.dictionary.stack).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crosscoder.dictionary.crosscoder import Crosscoder, CrosscoderOutput

DICTIONARY_PREFIX = "dictionaries."
SEED_STRIDE = 1_000_003
"""Dictionary s of a run seeded r draws its initial weights with seed r * SEED_STRIDE + s."""


class IndependentDictionaries(nn.Module):
    """The dictionaries of `snapshot_share` (of `n_sources` snapshots), each a `Crosscoder(1, ...)`."""

    dictionaries_per_snapshot = True
    codes_per_snapshot = True

    def __init__(self, n_sources: int, d_model: int, dict_size: int, *, seed: int = 0,
                 snapshot_share: range | None = None, **options: Any) -> None:  # noqa: ANN401
        """`options`: Crosscoder keyword arguments (activation, k, aux_k, init, ...) for every dictionary."""
        super().__init__()
        share = range(n_sources) if snapshot_share is None else snapshot_share
        if not (len(share) and share.start >= 0 and share.stop <= n_sources):
            raise ValueError(f"snapshot_share={share} is not a non-empty part of the {n_sources} sources")
        self.total_sources, self.snapshot_share = n_sources, share
        self.n_sources, self.d_model, self.dict_size = len(share), d_model, dict_size
        dictionaries = []
        for snapshot in share:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * SEED_STRIDE + snapshot)
                dictionaries.append(Crosscoder(1, d_model, dict_size, **options))
        self.dictionaries = nn.ModuleList(dictionaries)
        if len(share) < n_sources:  # DeepSpeed's gradient norm sums each rank's own dictionaries over the group
            for param in self.parameters():
                param.model_parallel = True

    @property
    def aux_k(self) -> int:
        return self.dictionaries[0].aux_k

    def set_input_scale(self, scale: torch.Tensor) -> None:
        for index, dictionary in enumerate(self.dictionaries):
            dictionary.set_input_scale(scale[index : index + 1])

    @torch.no_grad()
    def initialize_encoder_bias(self, batches: list[torch.Tensor], firing_fraction: float) -> None:
        for index, dictionary in enumerate(self.dictionaries):
            dictionary.initialize_encoder_bias([batch[:, index : index + 1] for batch in batches], firing_fraction)

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [dictionary.W_dec for dictionary in self.dictionaries]

    def decoder_norms(self) -> torch.Tensor:
        """[F, S] each dictionary's decoder norms in its normalised space, side by side."""
        return torch.cat([dictionary.decoder_norms() for dictionary in self.dictionaries], dim=1)

    def forward(self, x: torch.Tensor, l1_coeff: float = 0.0, dead_mask: torch.Tensor | None = None
                ) -> CrosscoderOutput:
        """x: raw activations [B, S, d]; dead_mask: [S, F] bool, each dictionary's latents AuxK may revive."""
        if x.dim() != 3 or x.shape[1:] != (self.n_sources, self.d_model):
            raise ValueError(f"expected input [batch, {self.n_sources}, {self.d_model}], got {list(x.shape)}")
        outputs = [dictionary(x[:, index : index + 1], l1_coeff, None if dead_mask is None else dead_mask[index])
                   for index, dictionary in enumerate(self.dictionaries)]
        return CrosscoderOutput(
            loss=torch.stack([out.loss for out in outputs]).sum(),
            mse_loss=torch.stack([out.mse_loss for out in outputs]).sum(),
            sparsity_loss=torch.stack([out.sparsity_loss for out in outputs]).sum(),
            aux_loss=torch.stack([out.aux_loss for out in outputs]).sum(),
            codes=torch.stack([out.codes for out in outputs], dim=1),
            normalized_input=torch.cat([out.normalized_input for out in outputs], dim=1),
            normalized_reconstruction=torch.cat([out.normalized_reconstruction for out in outputs], dim=1),
        )

    def global_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's state dict with each dictionary named by its snapshot's index among all the snapshots."""
        renamed = {}
        for name, tensor in state.items():
            local, rest = name.removeprefix(DICTIONARY_PREFIX).split(".", 1)
            renamed[f"{DICTIONARY_PREFIX}{self.snapshot_share.start + int(local)}.{rest}"] = tensor
        return renamed


def split_dictionary_states(state: dict[str, torch.Tensor], n_snapshots: int) -> list[dict[str, torch.Tensor]]:
    """The whole run's state (global names, see `global_state`) as one Crosscoder state dict per snapshot."""
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(n_snapshots)]
    for name, tensor in state.items():
        index, rest = name.removeprefix(DICTIONARY_PREFIX).split(".", 1)
        states[int(index)][rest] = tensor
    missing = [index for index, part in enumerate(states) if not part]
    if missing:
        raise ValueError(f"the state holds no dictionary for snapshot(s) {missing}")
    return states
