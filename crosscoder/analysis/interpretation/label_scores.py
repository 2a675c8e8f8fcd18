"""How well each latent picks out each label of the concept oracle (the labelled toy corpus): the AUROC of its
shared code for every (label kind, value), over the replayed toy stream.

AUROC_i(l) is the probability that a token carrying label l gets a higher code than one that does not (ties
count one half), computed exactly from average ranks. It holds the codes of every replayed token ([T, F], so T
is bounded by memory: 20,000 tokens x 4,096 latents is 330 MB), which suits the toy model it exists for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from crosscoder.data.activations import paired_activations, valid_token_mask
from crosscoder.data.labels import iter_labelled_batches
from crosscoder.data.tokens import special_token_ids
from crosscoder.dictionary.io import load_dictionary
from crosscoder.dictionary.provenance import dictionary_sources
from crosscoder.errors import ConfigError
from crosscoder.sources.models import load_runners
from crosscoder.toy.corpus import LABEL_KINDS

LABELS_FILE = "labels.json"
"""Each oracle label's best latents, in an analysis folder (crosscoder-analyze --label-tokens)."""
MIN_TOKENS = 10
"""Tokens a label needs on each side (carrying it, not carrying it) to be scored."""


@dataclass
class LabelScores:
    labels: list[tuple[str, int]]
    """(kind, value) of each scored label."""
    auroc: torch.Tensor
    """[labels, F] each latent's AUROC for each label."""
    positives: list[int]
    """Tokens carrying each label."""
    n_tokens: int

    def best(self, top: int = 3) -> list[dict]:
        """Per label, the `top` latents that pick it out best."""
        values, latents = self.auroc.topk(min(top, self.auroc.shape[1]), dim=1)
        return [{"kind": kind, "value": value, "positives": positives,
                 "latents": latents[row].tolist(), "auroc": values[row].tolist()}
                for row, ((kind, value), positives) in enumerate(zip(self.labels, self.positives, strict=True))]


def auroc_per_column(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """[F] the AUROC of each column of `scores` [T, F] for the boolean `positive` [T], ties counted one half."""
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    columns = scores.T.contiguous().double()  # [F, T]
    ordered = columns.sort(dim=1).values
    below = torch.searchsorted(ordered, columns, right=False)
    up_to = torch.searchsorted(ordered, columns, right=True)
    ranks = (below + up_to + 1).double() / 2  # 1-based average ranks
    rank_sum = (ranks * positive.double()[None, :]).sum(dim=1)
    return (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


@torch.no_grad()
def label_scores(dictionary_dir: str | Path, n_tokens: int, device: str | torch.device = "cpu",
                 log: Callable[[str], None] = print) -> LabelScores:
    """The AUROC of every latent's shared code for every oracle label over the first `n_tokens` valid tokens
    of the dictionary's own toy stream; ConfigError for a dictionary not trained on the toy corpus."""
    device = torch.device(device)
    model, meta = load_dictionary(dictionary_dir, device)
    cfg, info = dictionary_sources(meta, log)
    if cfg.data.kind != "toy":
        raise ConfigError(f"oracle labels exist for the embedded toy corpus only; this dictionary read "
                          f"data.kind={cfg.data.kind!r}")
    runners = load_runners(cfg.sources, info.specs, device)
    bos, pad = special_token_ids(info.tokenizer)
    codes, labels, seen = [], [], 0
    for labelled in iter_labelled_batches(cfg.data, info.tokenizer):
        valid = valid_token_mask(labelled.batch, bos, pad)  # row-major, as paired_activations orders its rows
        keep = min(int(valid.sum()), n_tokens - seen)
        x = paired_activations(labelled.batch, runners, bos, pad, device)[:keep]
        code = model.encode(x)
        codes.append((code.amax(dim=1) if code.dim() == 3 else code).cpu())
        labels.append(labelled.labels[valid][:keep])
        seen += keep
        if seen >= n_tokens:
            break
    all_codes, all_labels = torch.cat(codes), torch.cat(labels).long()
    scored, aurocs, positives = [], [], []
    for index, kind in enumerate(LABEL_KINDS):
        for value in sorted(set(all_labels[:, index].tolist()) - {0}):
            positive = all_labels[:, index] == value
            if min(int(positive.sum()), len(positive) - int(positive.sum())) < MIN_TOKENS:
                continue
            scored.append((kind, value))
            aurocs.append(auroc_per_column(all_codes, positive))
            positives.append(int(positive.sum()))
    log(f"labels: {len(scored)} oracle labels scored over {seen:,} tokens")
    return LabelScores(scored, torch.stack(aurocs) if aurocs else torch.zeros(0, meta.dict_size), positives, seen)
