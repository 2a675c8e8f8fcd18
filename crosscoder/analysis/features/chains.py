"""A stack's latent slots cut into chains: where latent i of one dictionary and latent i of the next are not the
same feature, slot i is two latents of the evolution analysis, not one.

An aligned stack gives every snapshot's dictionary the same F slots, but the features do not keep to them: when a
feature vanishes, SAE Match still pairs its slot with some leftover latent of the next dictionary, and a feature
that emerges later takes over a slot another feature held before (SAE-Track reuses a latent the same way). Read
as one crosscoder, such a slot is present throughout and its flattened decoder matches neither feature. So a
slot is cut wherever the decoder cosine of consecutive snapshots falls below `min_cosine` and wherever it
starts or stops holding anything (a latent that never fired in a snapshot's dictionary holds nothing there,
though its decoder keeps the direction it last learned); each run of snapshots between cuts is one chain, zero
outside its run, and the analysis sees chains. A stack whose slots never break reads exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosscoder.analysis.features.evolution import ZERO_NORM, consecutive_cosine

CHAIN_MIN_COSINE = 0.7
"""Consecutive decoder cosine below which a slot is cut (the SAE Match quality threshold)."""
MAX_CHAIN_ELEMENTS = 1 << 30
"""The chains' decoder [F', S, d] is dense: refuse (clearly) a layout past 4 GiB of float32."""


@dataclass
class Chains:
    decoder: torch.Tensor
    """[F', S, d] each chain's decoder vectors, zero outside its snapshots."""
    norms: torch.Tensor
    """[F', S] the chains' decoder norms (the dictionaries' own, zero outside)."""
    slot: torch.Tensor
    """[F'] the dictionaries' latent index each chain lives in."""
    first: torch.Tensor
    """[F'] the chain's first snapshot."""
    last: torch.Tensor
    """[F'] its last snapshot."""

    def spread(self, per_slot: torch.Tensor) -> torch.Tensor:
        """A per-slot, per-snapshot value [S, F] (firing frequencies) laid out per chain [S, F'], zero outside."""
        snapshots = torch.arange(per_slot.shape[0])[:, None]
        inside = (snapshots >= self.first[None, :]) & (snapshots <= self.last[None, :])
        return per_slot[:, self.slot] * inside


def chain_segments(w_dec: torch.Tensor, norms: torch.Tensor, min_cosine: float = CHAIN_MIN_COSINE,
                   present: torch.Tensor | None = None) -> Chains:
    """Cut each slot of an aligned stack's decoder [F, S, d] (norms [F, S]) where consecutive cosines break or the
    slot starts or stops holding anything. `present` [F, S]: where each slot's latent holds a feature at all
    (it fired in that snapshot's dictionary); elsewhere its vector counts as zero. Runs of zeros are no chain,
    except that a slot zero everywhere stays one (dead) chain, as a dead latent of a crosscoder does."""
    if present is not None:
        w_dec, norms = w_dec * present[..., None], norms * present
    n_slots, n_snapshots, width = w_dec.shape
    nonzero = w_dec.norm(dim=-1) > ZERO_NORM  # [F, S]
    cosine = consecutive_cosine(w_dec)  # [F, S-1], NaN where a vector is zero
    cut = (cosine < min_cosine) | (nonzero[:, 1:] != nonzero[:, :-1])
    segment = torch.cat([torch.zeros(n_slots, 1, dtype=torch.long), cut.long().cumsum(dim=1)], dim=1)  # [F, S]
    per_slot = segment[:, -1] + 1
    offset = torch.cat([torch.zeros(1, dtype=torch.long), per_slot.cumsum(0)[:-1]])
    chain = offset[:, None] + segment  # [F, S] the chain holding (slot, snapshot)
    n_chains = int(per_slot.sum())
    if n_chains * n_snapshots * width > MAX_CHAIN_ELEMENTS:
        raise ValueError(f"the stack's {n_slots} slots break into {n_chains} chains over {n_snapshots} snapshots: "
                         f"a dense [chains, S, d] layout of {n_chains * n_snapshots * width} floats is too large")
    snapshots = torch.arange(n_snapshots).expand(n_slots, n_snapshots)
    decoder = w_dec.new_zeros(n_chains, n_snapshots, width)
    decoder[chain, snapshots] = w_dec
    chain_norms = norms.new_zeros(n_chains, n_snapshots)
    chain_norms[chain, snapshots] = norms
    slot = torch.arange(n_slots).repeat_interleave(per_slot)
    first = torch.full((n_chains,), n_snapshots, dtype=torch.long).scatter_reduce(
        0, chain.flatten(), snapshots.flatten(), "amin")
    last = torch.full((n_chains,), -1, dtype=torch.long).scatter_reduce(0, chain.flatten(), snapshots.flatten(), "amax")
    holds = decoder.norm(dim=-1).amax(dim=1) > ZERO_NORM
    keep = holds | ~nonzero.any(dim=1)[slot]  # drop runs of zeros; keep a never-present slot as its dead chain
    return Chains(decoder=decoder[keep], norms=chain_norms[keep], slot=slot[keep], first=first[keep], last=last[keep])
