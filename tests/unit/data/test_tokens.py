"""Token streams: BOS-led packed sequences, seeded order, disjoint document shards, resumable starts,
local text files; a corpus (or shard) too short for one sequence, and a hub stream that yields none, are errors."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from crosscoder.config import DataConfig
from crosscoder.data import tokens
from crosscoder.data.tokens import TokenBatch, iter_documents, iter_token_batches, special_token_ids
from crosscoder.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tiny_snapshots: list) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_snapshots[0].path)


def _toy(**overrides: object) -> DataConfig:
    """A small toy stream: short rows, few documents."""
    defaults: dict[str, object] = {"kind": "toy", "seq_len": 16, "model_batch_size": 4, "toy_documents": 150}
    return DataConfig(**{**defaults, **overrides})


def _take(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, n: int, shard: int = 0,
          n_shards: int = 1) -> list[TokenBatch]:
    return list(itertools.islice(iter_token_batches(cfg, tokenizer, shard=shard, n_shards=n_shards), n))


def _write_corpus(folder: Path) -> tuple[list[Path], list[str]]:
    """A .txt file (blank-line separated documents) and a .jsonl file; returns the paths and all documents."""
    txt_docs = [f"Plain document number {i} talks about apples and rivers." for i in range(6)]
    json_docs = [f"Json document {i} says the dogs run home." for i in range(5)]
    txt = folder / "a.txt"
    txt.write_text("\n\n".join(txt_docs[:3]) + "\n\n\n" + "\n\n".join(txt_docs[3:]) + "\n")
    jsonl = folder / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(json_docs)) + "\n")
    return [txt, jsonl], txt_docs + json_docs


def test_rows_start_with_bos_and_have_seq_len_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Every row is BOS + seq_len - 1 tokens, fully attended, in [model_batch_size, seq_len] batches."""
    bos, _ = special_token_ids(tokenizer)
    batches = _take(_toy(), tokenizer, 5)
    assert len(batches) == 5
    for batch in batches:
        assert batch.input_ids.shape == (4, 16) and batch.input_ids.dtype == torch.long
        assert torch.all(batch.input_ids[:, 0] == bos)
        assert torch.equal(batch.attention_mask, torch.ones_like(batch.input_ids))
    # Packed: rows continue the token stream, so BOS is not the only token and documents are concatenated.
    body = torch.cat([b.input_ids[:, 1:] for b in batches]).flatten()
    assert (body != bos).sum() > 0.8 * body.numel()


def test_packing_continues_the_document_stream(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """Row bodies, concatenated, are the documents' tokens each followed by EOS, in the seeded order."""
    paths, _ = _write_corpus(tmp_path)
    cfg = DataConfig(kind="text_files", paths=[str(p) for p in paths], seq_len=9, model_batch_size=3)
    documents = list(itertools.islice(iter_documents(cfg), 11))
    expected: list[int] = []
    for document in documents:
        expected += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batches = _take(cfg, tokenizer, 3)
    stream = torch.cat([b.input_ids[:, 1:] for b in batches]).flatten().tolist()
    assert len(stream) == 3 * 3 * 8
    assert stream == expected[: len(stream)]


def test_same_seed_same_batches_different_seed_different(tokenizer: PreTrainedTokenizerBase) -> None:
    """Two iterators with one seed yield identical batches; another seed changes them."""
    first = _take(_toy(seed=7), tokenizer, 4)
    second = _take(_toy(seed=7), tokenizer, 4)
    other = _take(_toy(seed=8), tokenizer, 4)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, second, strict=True))
    assert not torch.equal(torch.stack([b.input_ids for b in first]),
                           torch.stack([b.input_ids for b in other]))


def test_seed_changes_only_the_order_of_a_fixed_corpus(tmp_path: Path) -> None:
    """For local files the seed shuffles the document order; each epoch holds every document once."""
    paths, documents = _write_corpus(tmp_path)
    n = len(documents)

    def epochs(seed: int) -> list[str]:
        cfg = DataConfig(kind="text_files", paths=[str(p) for p in paths], seed=seed)
        return list(itertools.islice(iter_documents(cfg), 2 * n))

    a, b = epochs(1), epochs(2)
    assert a == epochs(1)
    assert sorted(a[:n]) == sorted(a[n:]) == sorted(b[:n]) == sorted(documents)
    assert a[:n] != b[:n]
    assert a[:n] != a[n:]  # each epoch is reshuffled


def test_shards_split_the_documents(tokenizer: PreTrainedTokenizerBase) -> None:
    """Shard k of n reads every n-th document of the seeded order: disjoint, together the whole epoch."""
    cfg = _toy(seed=3, toy_documents=60)
    whole = list(itertools.islice(iter_documents(cfg), 60))
    shards = [list(itertools.islice(iter_documents(cfg, shard, 3), 20)) for shard in range(3)]
    for k in range(3):
        assert shards[k] == whole[k::3]
    batches = [_take(cfg, tokenizer, 2, shard=k, n_shards=3) for k in range(3)]
    assert not torch.equal(batches[0][0].input_ids, batches[1][0].input_ids)


def test_start_skips_whole_batches(tokenizer: PreTrainedTokenizerBase) -> None:
    """A stream started at batch k yields exactly the uninterrupted stream's batches k, k+1, ..."""
    cfg = _toy(seed=5)
    whole = _take(cfg, tokenizer, 6)
    resumed = list(itertools.islice(iter_token_batches(cfg, tokenizer, start=4), 2))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(whole[4:], resumed, strict=True))


def test_more_shards_than_documents_is_refused() -> None:
    with pytest.raises(ConfigError, match="produced 3 documents, fewer than the 4 stream shards"):
        next(iter_documents(_toy(toy_documents=3), 0, 4))


def test_text_files_txt_and_jsonl(tmp_path: Path) -> None:
    """.txt splits on blank lines, .jsonl reads `text_field`; blank lines and other fields are ignored."""
    paths, documents = _write_corpus(tmp_path)
    cfg = DataConfig(kind="text_files", paths=[str(p) for p in paths])
    first_epoch = list(itertools.islice(iter_documents(cfg), len(documents)))
    assert sorted(first_epoch) == sorted(documents)

    other_field = tmp_path / "c.jsonl"
    other_field.write_text(json.dumps({"body": "only body", "text": "not this"}) + "\n")
    cfg = DataConfig(kind="text_files", paths=[str(other_field)], text_field="body")
    assert next(iter_documents(cfg)) == "only body"


def test_text_files_token_batches(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """A text_files stream yields BOS-led batches of the configured shape."""
    paths, _ = _write_corpus(tmp_path)
    cfg = DataConfig(kind="text_files", paths=[str(p) for p in paths], seq_len=12, model_batch_size=2)
    batches = _take(cfg, tokenizer, 3)
    assert [tuple(b.input_ids.shape) for b in batches] == [(2, 12)] * 3
    assert all(torch.all(b.input_ids[:, 0] == tokenizer.bos_token_id) for b in batches)


def test_missing_text_file_is_named(tmp_path: Path) -> None:
    """A data.paths entry that does not exist is a ConfigError naming it; no paths at all is one too."""
    paths, _ = _write_corpus(tmp_path)
    missing = str(tmp_path / "nope.txt")
    cfg = DataConfig(kind="text_files", paths=[str(paths[0]), missing])
    with pytest.raises(ConfigError, match=re.escape(repr(missing))):
        next(iter_documents(cfg))
    with pytest.raises(ConfigError, match=r"data\.paths"):
        next(iter_documents(DataConfig(kind="text_files", paths=[])))


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    """Files with no documents are a ConfigError rather than an endless loop."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ConfigError, match="no documents"):
        next(iter_documents(DataConfig(kind="text_files", paths=[str(empty)])))


def test_a_corpus_shorter_than_one_sequence_is_an_error(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """A corpus whose whole epoch tokenizes to fewer than seq_len - 1 tokens would fill every row with the same
    text repeated: a ConfigError naming the files, the token count and data.seq_len, raised when the stream
    starts (after one epoch is tokenized). Exactly one sequence's worth is fine."""
    text = "tiny corpus"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    short = tmp_path / "short.txt"
    short.write_text(text + "\n")
    cfg = DataConfig(kind="text_files", paths=[str(short)], seq_len=n + 2, model_batch_size=2)
    with pytest.raises(ConfigError, match=rf"data\.paths=\[{re.escape(repr(str(short)))}\]: the 1 document\(s\) "
                                          rf"tokenize to {n} tokens .*fewer than one sequence of "
                                          rf"data\.seq_len={n + 2} "):
        next(iter_token_batches(cfg, tokenizer))
    cfg.seq_len = n + 1  # BOS + the corpus once
    [batch] = _take(cfg, tokenizer, 1)
    assert batch.input_ids.shape == (2, n + 1)


def test_a_short_stream_shard_is_named(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """With several stream shards (ranks x workers) the check is per shard: the one holding only a short
    document is named, the others stream."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Hi.\n\n" + " ".join(["a much longer document about rivers"] * 20) + "\n")
    cfg = DataConfig(kind="text_files", paths=[str(corpus)], seq_len=32, model_batch_size=1, seed=0)
    short_shard = next(k for k in range(2) if next(iter_documents(cfg, k, 2)) == "Hi.")
    with pytest.raises(ConfigError, match=rf"in stream shard {short_shard} of 2 .*data\.seq_len=32"):
        next(iter_token_batches(cfg, tokenizer, shard=short_shard, n_shards=2))
    assert len(_take(cfg, tokenizer, 2, shard=1 - short_shard, n_shards=2)) == 2


def test_a_hub_stream_that_ends_before_one_batch_is_an_error(tokenizer: PreTrainedTokenizerBase,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub dataset is read once: if it ends before one batch, that is a ConfigError naming it, not an empty
    stream."""
    monkeypatch.setattr(tokens, "_iter_hf_dataset", lambda cfg, shard, n_shards: iter(["just a few words"]))
    cfg = DataConfig(kind="hf_dataset", dataset="someone/tiny", seq_len=16, model_batch_size=2)
    with pytest.raises(ConfigError, match=r"data\.dataset='someone/tiny' .*ended before one batch"):
        next(iter_token_batches(cfg, tokenizer))
