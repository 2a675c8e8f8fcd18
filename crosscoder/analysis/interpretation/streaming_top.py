"""The k best entries per channel of a stream of (channel, score) candidates, in O(channels x k) memory.

Every update keeps only the candidates that beat their channel's current k-th score (for sparse codes, a few per
token) and buffers them; once the buffer holds `flush_at` candidates (or on `flush()`), they are gathered per
channel and merged with what each channel holds in one `topk`. Buffering makes the merge's cost, which grows
with the channels it touches, count once per many updates instead of once per update. The exemplar
pass keeps two: the top activations (score = the activation) and a uniform sample of the firings (score = a
random priority: the k largest of independent uniform draws are a uniform sample without replacement).
"""

from __future__ import annotations

import torch


class StreamingTopK:
    """Per channel, the k largest scores offered so far, each with its value and key (a token's key)."""

    def __init__(self, channels: int, k: int, device: torch.device, flush_at: int = 1 << 19) -> None:
        self.scores = torch.full((channels, k), -torch.inf, device=device)
        self.values = torch.zeros((channels, k), device=device)
        self.keys = torch.full((channels, k), -1, dtype=torch.long, device=device)
        self.flush_at = flush_at
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._pending_count = 0

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def threshold(self) -> torch.Tensor:
        """[channels] the score a candidate must beat to enter its channel (-inf while the channel has room)."""
        return self.scores[:, -1]

    def offer(self, channels: torch.Tensor, scores: torch.Tensor, values: torch.Tensor, keys: torch.Tensor) -> None:
        """Candidates [m] (channel, score, value, key), in any order; those that do not beat their channel's
        k-th score are dropped, the others buffered (read the entries after `flush()`)."""
        better = scores > self.threshold()[channels]
        if not better.any():
            return
        self._pending.append((channels[better], scores[better], values[better].float(), keys[better]))
        self._pending_count += int(better.sum())
        if self._pending_count >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        """Merge the buffered candidates into the channels' entries."""
        if not self._pending:
            return
        channels, scores, values, keys = (torch.cat(parts) for parts in zip(*self._pending, strict=True))
        self._pending, self._pending_count = [], 0
        # By channel, best first within each (two stable sorts), and at most k per channel: a dense channel's
        # thousands of candidates never widen the merge.
        for order in (torch.argsort(scores, descending=True, stable=True), None):
            order = torch.argsort(channels, stable=True) if order is None else order
            channels, scores, values, keys = channels[order], scores[order], values[order], keys[order]
        touched, counts = torch.unique_consecutive(channels, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(channels), device=channels.device) - torch.repeat_interleave(starts, counts)
        row = torch.repeat_interleave(torch.arange(len(touched), device=channels.device), counts)
        first_k = slot < self.k
        row, slot, scores, values, keys = row[first_k], slot[first_k], scores[first_k], values[first_k], keys[first_k]
        width = min(int(counts.max()), self.k)
        new_scores = torch.full((len(touched), width), -torch.inf, device=scores.device)
        new_values = torch.zeros((len(touched), width), device=scores.device)
        new_keys = torch.full((len(touched), width), -1, dtype=torch.long, device=scores.device)
        new_scores[row, slot], new_values[row, slot], new_keys[row, slot] = scores, values, keys
        merged_scores = torch.cat([self.scores[touched], new_scores], dim=1)
        best_scores, best = merged_scores.topk(self.k, dim=1)
        self.scores[touched] = best_scores
        self.values[touched] = torch.cat([self.values[touched], new_values], dim=1).gather(1, best)
        self.keys[touched] = torch.cat([self.keys[touched], new_keys], dim=1).gather(1, best)

    def held(self) -> torch.Tensor:
        """[channels, k] which slots hold an entry (after `flush()`)."""
        return self.scores > -torch.inf
