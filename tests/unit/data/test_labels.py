"""The labelled toy corpus (the concept oracle): the texts are unchanged, the labelled stream is the token stream,
and the labels say what the text holds: checked by reading the facts back from the tokens (sums, counting runs,
names seen before), with a one-token shift of the labels as the control that must fail."""

from __future__ import annotations

import hashlib
import itertools
import re

import pytest
import torch
from transformers import AutoTokenizer

from crosscoder.config import DataConfig
from crosscoder.data.labels import LabelledBatch, iter_labelled_batches
from crosscoder.data.tokens import iter_token_batches
from crosscoder.toy.corpus import (
    LABEL_KINDS,
    OPERAND_A,
    OPERAND_B,
    RESULT,
    ROLES,
    TOPICS,
    generate_corpus,
    generate_labelled_corpus,
)

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen"]


def test_the_texts_are_the_ones_the_toy_lm_was_always_trained_on() -> None:
    """Labelling changed no text (the sha256 of the generator's output before labels existed)."""
    for seed, digest in ((0, "02ad04d58655f87b5078c0d99eb65566b687451f6d9a0d2ee37df5f7b58ebe2e"),
                         (7, "6654967e334b5caa6990f77f309642235efc6c7d00a004cc312821be80a6e9f2")):
        assert hashlib.sha256("\x00".join(generate_corpus(500, seed)).encode()).hexdigest() == digest
    document = generate_labelled_corpus(3, 1)[2]
    assert [document.text[a:b] for a, b, _ in document.spans] == re.findall(r"\w+|[^\w\s]", document.text)


@pytest.fixture(scope="module")
def stream(tiny_snapshots: list) -> tuple[list[LabelledBatch], object]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_snapshots[0].path)
    cfg = DataConfig(kind="toy", seq_len=32, model_batch_size=8, toy_documents=300, seed=5)
    labelled = list(itertools.islice(iter_labelled_batches(cfg, tokenizer), 12))
    plain = list(itertools.islice(iter_token_batches(cfg, tokenizer), 12))
    for mine, theirs in zip(labelled, plain, strict=True):  # the same tokens, the same sequences
        assert torch.equal(mine.batch.input_ids, theirs.input_ids)
    return labelled, tokenizer


def _words(batches: list[LabelledBatch], tokenizer: object, labels: torch.Tensor | None = None
           ) -> list[tuple[str, dict[str, int]]]:
    """(text, labels) of each run of consecutive tokens with equal labels, row by row, an empty unlabelled entry
    after each row; a run the row's start or end may have cut (a word split over two sequences) is left out."""
    words = []
    for index, item in enumerate(batches):
        row_labels = item.labels if labels is None else labels[index]
        for ids, rows in zip(item.batch.input_ids.tolist(), row_labels.tolist(), strict=True):
            position = 0
            for key, group in itertools.groupby(zip(ids, rows, strict=True), key=lambda pair: tuple(pair[1])):
                tokens = [token for token, _ in group]
                start, position = position, position + len(tokens)
                if start <= 1 or position == len(ids):  # BOS, or cut by the row's start or end
                    continue
                text = tokenizer.decode(tokens).strip()  # type: ignore[attr-defined]
                words.append((text, dict(zip(LABEL_KINDS, key, strict=True))))
            words.append(("", dict.fromkeys(LABEL_KINDS, 0)))  # the row ends: no run goes on into the next
    return words


def _facts_hold(words: list[tuple[str, dict[str, int]]]) -> tuple[int, int]:
    """(facts read back from the labels, of them the ones that hold): sums and differences, counting runs."""
    read, held = 0, 0
    for first, second, third, _, fifth in zip(words, words[1:], words[2:], words[3:], words[4:], strict=False):
        if first[1]["arithmetic"] == OPERAND_A and third[1]["arithmetic"] == OPERAND_B and \
                fifth[1]["arithmetic"] == RESULT and second[1]["role"] == ROLES.index("operator") + 1:
            read += 1
            a, b, result = (int(w[0]) if w[0].isdigit() else -99 for w in (first, third, fifth))
            held += (a + b if second[0] == "plus" else a - b) == result
    for word, labels in words:
        if labels["count_position"]:
            read += 1
            held += word in NUMBER_WORDS
    return read, held


def test_the_labels_say_what_the_text_holds(stream: tuple[list[LabelledBatch], object]) -> None:
    batches, tokenizer = stream
    words = _words(batches, tokenizer)
    read, held = _facts_hold(words)
    assert read > 100 and held == read
    # counting runs go up one word at a time; a repeated name was named before in its document
    grouped = itertools.groupby(words, key=lambda word: word[1]["count_position"] > 0)
    runs = [[word for word, _ in group] for counting, group in grouped if counting]
    for run in runs[1:-1]:  # the first and last may be cut by a sequence boundary
        positions = [NUMBER_WORDS.index(word) for word in run]
        assert positions == list(range(positions[0], positions[0] + len(run))) or len(run) == 1
    kinds = {kind: sum(labels[kind] > 0 for _, labels in words) for kind in LABEL_KINDS}
    assert all(count > 0 for count in kinds.values()), kinds
    topics = {labels["topic"] for _, labels in words if labels["topic"]}
    assert topics == set(range(1, len(TOPICS) + 1))
    for kind, opening, closing in (("quoted", '"', '"'), ("bracketed", "(", ")")):
        spans = _spans(batches, tokenizer, LABEL_KINDS.index(kind))  # a closing token may be merged with a "."
        assert len(spans) > 5 and all(text.startswith(opening) and closing in text[1:] + after
                                      for text, after in spans), spans


def _spans(batches: list[LabelledBatch], tokenizer: object, kind: int) -> list[tuple[str, str]]:
    """The text of each run of tokens labelled `kind` that no row boundary cuts, and of the token after it."""
    spans = []
    for item in batches:
        for ids, flags in zip(item.batch.input_ids.tolist(), item.labels[:, :, kind].tolist(), strict=True):
            position = 0
            for inside, group in itertools.groupby(zip(ids, flags, strict=True), key=lambda pair: pair[1] > 0):
                tokens = [token for token, _ in group]
                start, position = position, position + len(tokens)
                if inside and start > 1 and position < len(ids):
                    spans.append((tokenizer.decode(tokens).strip(),  # type: ignore[attr-defined]
                                  tokenizer.decode(ids[position : position + 1])))  # type: ignore[attr-defined]
    return spans


def test_labels_of_other_tokens_do_not_hold(stream: tuple[list[LabelledBatch], object]) -> None:
    """The control: the same checks with each batch given the next batch's labels fail."""
    batches, tokenizer = stream
    misaligned = torch.stack([batches[(index + 1) % len(batches)].labels for index in range(len(batches))])
    read, held = _facts_hold(_words(batches, tokenizer, misaligned))
    assert held < 0.5 * max(read, 1)
