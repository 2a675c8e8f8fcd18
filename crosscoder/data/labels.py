"""The labelled toy corpus as tokens: the concept oracle, aligned token by token with what the stream yields.

`iter_labelled_batches` packs the embedded toy corpus (`data.kind=toy`) exactly as `iter_token_batches` does
(same documents, same order, same sequences) and carries, per token, the labels the generator planted in the word
the token belongs to (crosscoder.toy.corpus.LABEL_KINDS; 0 where a kind does not apply, and for BOS and EOS).
A token belongs to the word holding its last non-space character (byte-level BPE tokens carry the space before a
word); a token of spaces alone, to the word after it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from crosscoder.config import DataConfig
from crosscoder.data.tokens import TOKENIZE_CHUNK, TokenBatch, iter_local, special_token_ids
from crosscoder.errors import ConfigError
from crosscoder.toy.corpus import LABEL_KINDS, LabelledDocument, generate_labelled_corpus


@dataclass
class LabelledBatch:
    batch: TokenBatch
    labels: torch.Tensor
    """[B, T, len(LABEL_KINDS)] uint8: each token's labels, kind by kind in LABEL_KINDS order."""


def token_labels(document: LabelledDocument, offsets: list[tuple[int, int]]) -> list[list[int]]:
    """Each token's labels (LABEL_KINDS order) from its character offsets into the document's text."""
    starts, text = [start for start, _, _ in document.spans], document.text
    labels = []
    for start, end in offsets:
        last = next((i for i in range(end - 1, start - 1, -1) if not text[i].isspace()), end)  # spaces only: the
        index = bisect.bisect_right(starts, last) - 1                                          # next word's
        span = document.spans[index] if index >= 0 else None
        inside = span is not None and span[0] <= last < span[1]
        labels.append([span[2].get(kind, 0) if inside else 0 for kind in LABEL_KINDS])  # type: ignore[index]
    return labels


def _labelled_tokens(documents: Iterator[LabelledDocument], tokenizer: Any  # noqa: ANN401 (an HF tokenizer)
                     ) -> Iterator[tuple[list[int], list[list[int]]]]:
    """(token ids, labels) of each document, tokenized as crosscoder.data.tokens.tokenized does."""
    while chunk := [document for _, document in zip(range(TOKENIZE_CHUNK), documents, strict=False)]:
        encoded = tokenizer([document.text for document in chunk], add_special_tokens=False,
                            return_offsets_mapping=True)
        for document, ids, offsets in zip(chunk, encoded["input_ids"], encoded["offset_mapping"], strict=True):
            yield ids, token_labels(document, offsets)


def iter_labelled_batches(cfg: DataConfig, tokenizer: Any, shard: int = 0, n_shards: int = 1  # noqa: ANN401
                          ) -> Iterator[LabelledBatch]:
    """The toy stream's batches (as iter_token_batches yields them for this shard) with their labels."""
    if cfg.kind != "toy":
        raise ConfigError(f"labels exist for the embedded toy corpus only (data.kind=toy), not data.kind={cfg.kind!r}")
    bos, _ = special_token_ids(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body, none = cfg.seq_len - 1, [0] * len(LABEL_KINDS)
    corpus = generate_labelled_corpus(cfg.toy_documents, seed=cfg.seed)
    if len(corpus) < n_shards:
        raise ConfigError(f"data.toy_documents={cfg.toy_documents} is fewer than the {n_shards} stream shards")
    pending: list[int] = []
    pending_labels: list[list[int]] = []
    rows: list[list[int]] = []
    row_labels: list[list[list[int]]] = []
    for ids, labels in _labelled_tokens(iter_local(corpus, cfg.seed, shard, n_shards), tokenizer):
        pending += ids + [eos]
        pending_labels += labels + [none]
        while len(pending) >= body:
            rows.append([bos] + pending[:body])
            row_labels.append([none] + pending_labels[:body])
            pending, pending_labels = pending[body:], pending_labels[body:]
            if len(rows) == cfg.model_batch_size:
                input_ids = torch.tensor(rows, dtype=torch.long)
                yield LabelledBatch(TokenBatch(input_ids, torch.ones_like(input_ids)),
                                    torch.tensor(row_labels, dtype=torch.uint8))
                rows, row_labels = [], []
