"""Held-out token batches: text from the run's data source that the crosscoder never trained on.

The spliced-in evaluation (crosscoder.evaluation.spliced) reads these; which tokens they are depends on the data kind:

- `toy`: new documents of the same generated grammar under a seed no training used (neither the crosscoder's
  `data.seed` nor the tiny LM's corpus seed). The toy corpus is small and a run passes over it several times
  (4000 documents are ~230k tokens; the default run trains on 600k), so no part of it is unread; fresh documents
  are held out by construction and the same at every export, so figures compare across exports.
- `text_files` / `hf_dataset`: the token stream after the trained tokens, on document shard 0 of the layout that
  produced them. Online, the dictionary's `stream_position.json` says how many blocks data rank 0 took (block j
  came from its worker j mod W), so shard 0 resumes after the last batch the run read from it; from a cache, the
  cache's manifest says how many blocks of its own stream (rank 0 of 1) it holds. Other shards' documents are
  disjoint from shard 0's by construction (crosscoder.data.tokens). A local corpus repeats forever: once shard 0's
  first epoch is used up the stream is trained text again, which `HeldOut.reused_training_text` then reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crosscoder.config import DataConfig
from crosscoder.constants import CACHE_MANIFEST_FILE
from crosscoder.data.tokens import TokenBatch, iter_token_batches, local_corpus, tokenized
from crosscoder.errors import ConfigError

HELD_OUT_SEED_OFFSET = 1_000_003
"""The toy held-out corpus is generated with data.seed + this (shifted past the tiny LM's corpus seed)."""


@dataclass
class HeldOut:
    """Token batches nobody trained on, and where they come from (one line, for eval.json and the report)."""

    batches: Iterator[TokenBatch]
    source: str
    reused_training_text: bool = False
    """Set once the stream has passed into text the run trained on (a local corpus's next epoch)."""


def held_out_seed(data_seed: int) -> int:
    """A corpus seed distinct from the crosscoder's data seed and from the tiny LM's own corpus seed."""
    from crosscoder.toy.tiny_lm import ToyLMConfig

    lm_seed = next(f.default for f in dataclasses.fields(ToyLMConfig) if f.name == "seed")
    seed = data_seed + HELD_OUT_SEED_OFFSET
    return seed + 1 if seed == lm_seed else seed


def held_out_batches(data: DataConfig, tokenizer: Any, positions: list[dict[str, Any]] | None  # noqa: ANN401
                     ) -> HeldOut:
    """The held-out batches of a run whose `data` group this is (module docstring); `positions` is the
    dictionary's stream_position.json (needed for an online text_files / hf_dataset run)."""
    if data.kind == "toy":
        seed = held_out_seed(data.seed)
        return HeldOut(iter_token_batches(replace(data, seed=seed), tokenizer),
                       f"{data.toy_documents} fresh toy documents (seed {seed}; the run trained on seed {data.seed})")
    shard, n_shards, start, what = _stream_after_training(data, positions)
    held_out = HeldOut(iter([]), f"{data.kind} stream shard {shard} of {n_shards} after the {start} batches {what}")
    batches = iter_token_batches(data, tokenizer, shard=shard, n_shards=n_shards, start=start)
    epoch = _first_epoch_batches(data, tokenizer, shard, n_shards) if data.kind == "text_files" else None
    held_out.batches = _flag_reuse(batches, held_out, start, epoch)
    return held_out


def _stream_after_training(data: DataConfig, positions: list[dict[str, Any]] | None) -> tuple[int, int, int, str]:
    """(shard, n_shards, first unread batch of that shard, how it was read) for document shard 0."""
    if data.cache.dir:
        manifest_file = Path(data.cache.dir).expanduser() / CACHE_MANIFEST_FILE
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
            blocks = max(s["first_block"] + s["n_blocks"] for s in manifest["shards"])
            workers = int(manifest["identity"]["stream"]["document_shards"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"cannot tell which tokens the run read: its activation cache manifest {manifest_file} "
                              f"is unreadable ({error})") from error
        return 0, workers, math.ceil(blocks / workers), "the activation cache holds from it"
    rank0 = [p for p in positions or [] if p.get("rank") == 0 and p.get("kind") == "online"]
    if not rank0:
        raise ConfigError("cannot tell which tokens the run read: the dictionary has no online stream position of "
                          "data rank 0 (stream_position.json)")
    position = rank0[0]
    workers = int(position["document_shards"])
    n_shards = int(position["world_size"]) * workers
    return 0, n_shards, math.ceil(int(position["next_block"]) / workers), "the run read from it"


def _first_epoch_batches(data: DataConfig, tokenizer: Any, shard: int, n_shards: int) -> int:  # noqa: ANN401
    """Whole batches in the first epoch of one shard of a local corpus (later ones repeat its documents)."""
    documents = local_corpus(data, n_shards)
    order = list(range(len(documents)))
    random.Random(data.seed).shuffle(order)  # epoch 0's order, as crosscoder.data.tokens.iter_local draws it
    tokens = sum(len(ids) + 1 for ids in tokenized(iter(documents[i] for i in order[shard::n_shards]), tokenizer))
    return tokens // (data.model_batch_size * (data.seq_len - 1))


def _flag_reuse(batches: Iterator[TokenBatch], held_out: HeldOut, start: int, epoch_batches: int | None
                ) -> Iterator[TokenBatch]:
    for index, batch in enumerate(batches, start=start):
        if epoch_batches is not None and index >= epoch_batches:
            held_out.reused_training_text = True
        yield batch
