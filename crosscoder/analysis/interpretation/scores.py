"""LLM-free scores of what a latent is, from its exemplars (crosscoder.analysis.interpretation.exemplars).

- Top-token entropy H = -sum_t p(t) log p(t), p(t) the share of the top activations' mass on token t
  (activation-weighted): 0 for a latent whose top exemplars are all one token, log N when each is another token.
"""

from __future__ import annotations

import torch

from crosscoder.analysis.interpretation.exemplars import Exemplars

ROWS_PER_CHUNK = 4096


def exemplar_tokens(found: Exemplars) -> torch.Tensor:
    """[channels x F, N] the token id of each top exemplar (-1 where a slot is empty)."""
    sequences = sorted(found.sequences)
    if not sequences:
        return torch.full_like(found.top.keys, -1)
    stacked = torch.tensor([found.sequences[s] for s in sequences], dtype=torch.long)
    held = found.top.held().cpu()
    keys = found.top.keys.cpu().clamp(min=0)
    rows = torch.searchsorted(torch.tensor(sequences), keys // found.seq_len).clamp(max=len(sequences) - 1)
    return torch.where(held, stacked[rows, keys % found.seq_len], -1)


def top_token_entropy(found: Exemplars) -> torch.Tensor:
    """[channels x F] H over each latent's top exemplars at each channel (nats; NaN where it never fired):
    H = -sum_j w_j log(sum_k [t_k = t_j] w_k), w the top activations normalised to sum 1."""
    tokens = exemplar_tokens(found)
    weights = torch.where(found.top.held(), found.top.values, 0.0).cpu().double()
    entropy = torch.empty(len(tokens), dtype=torch.float64)
    for start in range(0, len(tokens), ROWS_PER_CHUNK):
        chunk = slice(start, start + ROWS_PER_CHUNK)
        w = weights[chunk] / weights[chunk].sum(dim=1, keepdim=True)
        same = tokens[chunk][:, :, None] == tokens[chunk][:, None, :]  # [rows, N, N]
        token_mass = (same.double() * w[:, None, :]).sum(dim=2)
        entropy[chunk] = -(w * torch.where(w > 0, token_mass.clamp(min=1e-300).log(), 0.0)).sum(dim=1)
    return entropy
