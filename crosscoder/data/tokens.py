"""Token streams: documents packed into fixed-length sequences that each start with BOS.

The order is deterministic (seeded), so every snapshot and every rerun sees the same tokens. The stream is
cut into shards by document: with N ranks of W activation workers, worker w of rank r reads shard r*W + w of
N*W, so no two read the same document and none tokenizes another's.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from crosscoder.config import DataConfig
from crosscoder.errors import ConfigError

T = TypeVar("T")


@dataclass
class TokenBatch:
    input_ids: torch.Tensor
    """[B, T] token ids; position 0 of every row is BOS."""
    attention_mask: torch.Tensor
    """[B, T] 1 for real tokens, 0 for padding."""


def iter_documents(cfg: DataConfig, shard: int = 0, n_shards: int = 1) -> Iterator[str]:
    """This shard's documents: every `n_shards`-th of the seeded order, so shards are disjoint and together
    the whole corpus. Local corpora repeat forever, in a new seeded order each epoch; a hub dataset is read
    once."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in [0, {n_shards})")
    if cfg.kind == "hf_dataset":
        return _iter_hf_dataset(cfg, shard, n_shards)
    return iter_local(local_corpus(cfg, n_shards), cfg.seed, shard, n_shards)


def local_corpus(cfg: DataConfig, n_shards: int) -> list[str]:
    """Every document of a local corpus, with at least one for each of the `n_shards` stream shards."""
    documents = _load_documents(cfg)
    if not documents:
        raise ConfigError(f"data.kind={cfg.kind!r} produced no documents")
    if len(documents) < n_shards:
        raise ConfigError(f"data.kind={cfg.kind!r} produced {len(documents)} documents, fewer than the "
                          f"{n_shards} stream shards (ranks x workers)")
    return documents


def iter_local(documents: Sequence[T], seed: int, shard: int, n_shards: int) -> Iterator[T]:
    """This shard's documents of a local corpus, epoch after epoch, each epoch in a new seeded order."""
    epoch = 0
    while True:
        order = list(range(len(documents)))
        random.Random(seed + epoch).shuffle(order)
        for index in order[shard::n_shards]:
            yield documents[index]
        epoch += 1


def _load_documents(cfg: DataConfig) -> list[str]:
    if cfg.kind == "toy":
        from crosscoder.toy import generate_corpus

        # A seed distinct from the tiny LM's training corpus: the crosscoder reads held-out text.
        return generate_corpus(cfg.toy_documents, seed=cfg.seed)
    if not cfg.paths:
        raise ConfigError("data.paths must list at least one file for data.kind=text_files")
    documents: list[str] = []
    for index, raw in enumerate(cfg.paths):
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.paths[{index}]={raw!r} does not exist")
        # UTF-8 whatever the locale: the same files give the same tokens on every machine.
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as lines:
                documents += [json.loads(line)[cfg.text_field] for line in lines if line.strip()]
        else:
            documents += [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    return documents


def _iter_hf_dataset(cfg: DataConfig, shard: int, n_shards: int) -> Iterator[str]:
    try:
        import datasets
        from datasets.distributed import split_dataset_by_node
    except ImportError as error:
        raise ConfigError("data.kind=hf_dataset needs the `datasets` package: pip install -e '.[hub]'") from error
    stream = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split, streaming=True)
    # By whole files when they divide evenly among the shards, else every n-th example.
    stream = split_dataset_by_node(stream.shuffle(seed=cfg.seed, buffer_size=10_000), rank=shard,
                                   world_size=n_shards)
    for row in stream:
        yield row[cfg.text_field]


def special_token_ids(tokenizer) -> tuple[int, int | None]:  # noqa: ANN001
    """(BOS id, pad id); models without a BOS token (e.g. Pythia) use EOS as BOS."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token")
    return bos, tokenizer.pad_token_id


TOKENIZE_CHUNK = 64
"""Documents per tokenizer call: one call per document spends most of its time in Python overhead."""


def tokenized(documents: Iterator[str], tokenizer) -> Iterator[list[int]]:  # noqa: ANN001
    """Token ids of each document, in order, tokenized a chunk of documents at a time."""
    while chunk := list(itertools.islice(documents, TOKENIZE_CHUNK)):
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def iter_token_batches(
    cfg: DataConfig, tokenizer, shard: int = 0, n_shards: int = 1, start: int = 0  # noqa: ANN001
) -> Iterator[TokenBatch]:
    """Packed [model_batch_size, seq_len] batches of one document shard (see `iter_documents`).

    `start` skips the shard's first `start` batches (a resumed stream): they are tokenized, never yielded.
    A local shard whose whole epoch is shorter than one sequence is a ConfigError once that epoch is tokenized
    (every row would hold the same few tokens, repeated); so is a hub dataset that ends before one batch.
    """
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in [0, {n_shards})")
    bos, _ = special_token_ids(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = cfg.seq_len - 1
    epoch_documents: int | None = None  # documents of this shard per epoch of a local corpus
    if cfg.kind == "hf_dataset":
        documents = _iter_hf_dataset(cfg, shard, n_shards)
    else:
        corpus = local_corpus(cfg, n_shards)
        documents = iter_local(corpus, cfg.seed, shard, n_shards)
        epoch_documents = len(range(shard, len(corpus), n_shards))
    pending: list[int] = []
    rows: list[list[int]] = []
    batch_index = 0
    first_epoch_tokens = 0
    for n_documents, document_ids in enumerate(tokenized(documents, tokenizer), 1):
        pending += document_ids + [eos]
        if epoch_documents is not None and n_documents <= epoch_documents:
            first_epoch_tokens += len(document_ids) + 1
            if n_documents == epoch_documents and first_epoch_tokens < body:
                raise ConfigError(_short_corpus(cfg, shard, n_shards, epoch_documents, first_epoch_tokens))
        while len(pending) >= body:
            rows.append([bos] + pending[:body])
            pending = pending[body:]
            if len(rows) == cfg.model_batch_size:
                if batch_index >= start:
                    input_ids = torch.tensor(rows, dtype=torch.long)
                    yield TokenBatch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
                rows = []
                batch_index += 1
    if batch_index == 0:  # only a finite (hub) stream gets here
        raise ConfigError(f"data.dataset={cfg.dataset!r} (split {cfg.split!r}, stream shard {shard} of {n_shards}) "
                          f"ended before one batch of data.model_batch_size={cfg.model_batch_size} sequences of "
                          f"data.seq_len={cfg.seq_len} tokens")


def _short_corpus(cfg: DataConfig, shard: int, n_shards: int, n_documents: int, n_tokens: int) -> str:
    """Why a local corpus cannot fill one sequence, naming the files (or the toy corpus) and data.seq_len."""
    corpus = f"data.paths={cfg.paths}" if cfg.kind == "text_files" else f"data.toy_documents={cfg.toy_documents}"
    of_shard = f" in stream shard {shard} of {n_shards} (ranks x workers)" if n_shards > 1 else ""
    return (f"{corpus}: the {n_documents} document(s){of_shard} tokenize to {n_tokens} tokens (EOS included), "
            f"fewer than one sequence of data.seq_len={cfg.seq_len} (BOS + {cfg.seq_len - 1}): every sequence would "
            "repeat the same text; give more text or a smaller data.seq_len")
