"""Deterministic synthetic English-like corpus for the toy language model.

The grammar is small but layered, so a tiny LM picks its structure up in
stages that a crosscoder across training snapshots can show emerging:

* unigram statistics: frequent function words ("the", "a", "and", ".");
* topic words clustered per document (each document has one topic);
* names that recur within a document (each document has its own cast);
* subject-verb agreement ("the dog runs" / "the dogs run");
* matching delimiters (quotes and brackets opened and closed);
* counting sequences ("three four five six");
* arithmetic facts ("3 plus 4 is 7").

Nothing is downloaded: the same ``seed`` always yields the same documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Topic -> (singular nouns, plural nouns, adjectives).
_TOPICS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "animals": (
        ["dog", "cat", "bird", "horse", "fox", "mouse"],
        ["dogs", "cats", "birds", "horses", "foxes", "mice"],
        ["wild", "small", "furry", "quick"],
    ),
    "food": (
        ["apple", "bread", "cake", "soup", "pie", "lemon"],
        ["apples", "breads", "cakes", "soups", "pies", "lemons"],
        ["sweet", "warm", "fresh", "sour"],
    ),
    "music": (
        ["song", "drum", "piano", "band", "choir", "flute"],
        ["songs", "drums", "pianos", "bands", "choirs", "flutes"],
        ["loud", "soft", "happy", "slow"],
    ),
    "weather": (
        ["cloud", "storm", "wind", "rain", "sun", "river"],
        ["clouds", "storms", "winds", "rains", "suns", "rivers"],
        ["cold", "dark", "bright", "heavy"],
    ),
    "city": (
        ["street", "car", "train", "tower", "shop", "bridge"],
        ["streets", "cars", "trains", "towers", "shops", "bridges"],
        ["busy", "old", "tall", "new"],
    ),
}
# (singular, plural) verb forms: agreement is the learnable signal.
_VERBS: list[tuple[str, str]] = [
    ("sees", "see"), ("likes", "like"), ("finds", "find"),
    ("follows", "follow"), ("wants", "want"), ("has", "have"),
]
_INTRANSITIVE: list[tuple[str, str]] = [
    ("runs", "run"), ("sleeps", "sleep"), ("waits", "wait"), ("is here", "are here"),
]
_NAMES: list[str] = [
    "Alice", "Bob", "Carol", "Dave", "Emma", "Frank", "Grace", "Henry",
    "Ivy", "Jack", "Kate", "Leo", "Mia", "Noah", "Olga", "Paul",
]
_NUMBER_WORDS: list[str] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
]
_SPEECH_VERBS: list[str] = ["said", "asked", "shouted", "whispered"]


LABEL_KINDS: tuple[str, ...] = ("topic", "role", "number", "quoted", "bracketed", "count_position", "arithmetic",
                                 "repeated_name")
"""What the generator plants per word, ordered by how much context each needs to be read off (the oracle's
"simple first, complex later"): the document's topic (any topic word names it), a word's syntactic role and
grammatical number (the word and its neighbours), inside a quote or a bracket (the last delimiter, however far),
the place in a counting run (the run so far), an arithmetic operand or result (the whole fact), a name that
appeared earlier in the document (the document so far). Token identity, the simplest, is the token itself."""
TOPICS = tuple(sorted(_TOPICS))
"""Topic label v (1-based) is TOPICS[v - 1]."""
ROLES = ("subject", "verb", "object", "determiner", "adjective", "name", "number_word", "digit", "operator",
         "punctuation", "other")
"""Role label v (1-based) is ROLES[v - 1]."""
SINGULAR, PLURAL = 1, 2
OPERAND_A, OPERAND_B, RESULT = 1, 2, 3
Labels = dict[str, int]
"""A word's labels by kind (LABEL_KINDS); a kind that does not apply is absent (read as 0)."""


class _Pieces:
    """Text built from labelled pieces: each piece is a word or a delimiter with its labels; joining pieces
    gives exactly the text the unlabelled generator gave."""

    def __init__(self, *parts: tuple[str, Labels]) -> None:
        self.parts: list[tuple[str, Labels]] = list(parts)

    def __add__(self, other: _Pieces) -> _Pieces:
        return _Pieces(*self.parts, *other.parts)

    def with_labels(self, **labels: int) -> _Pieces:
        return _Pieces(*[(text, {**own, **labels}) for text, own in self.parts])

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.parts)

    def capitalized(self) -> _Pieces:
        (first, labels), *rest = self.parts
        return _Pieces((first[:1].upper() + first[1:], labels), *rest)


def _word(text: str, role: str, **labels: int) -> _Pieces:
    return _Pieces((text, {"role": ROLES.index(role) + 1, **labels}))


def _words(text: str, role: str, **labels: int) -> _Pieces:
    """Several words of one role, separated by spaces (each its own piece)."""
    words = text.split(" ")
    pieces = _word(words[0], role, **labels)
    for word in words[1:]:
        pieces = pieces + _space() + _word(word, role, **labels)
    return pieces


def _space() -> _Pieces:
    return _Pieces((" ", {}))


def _mark(text: str) -> _Pieces:
    return _word(text, "punctuation")


class _Document:
    """Sentence generator bound to one document's topic and cast of names."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.topic = rng.choice(sorted(_TOPICS))
        self.nouns_sg, self.nouns_pl, self.adjs = _TOPICS[self.topic]
        self.cast = rng.sample(_NAMES, k=rng.randint(1, 3))

    def name(self) -> _Pieces:
        """One of the cast (whether the document named it before is marked once the text is whole)."""
        return _word(self.rng.choice(self.cast), "name")

    def noun_phrase(self, role: str) -> tuple[_Pieces, bool]:
        """A noun phrase (its head in `role`) and whether it is plural."""
        rng = self.rng
        if rng.random() < 0.3:
            return self.name(), False
        plural = rng.random() < 0.5
        number = PLURAL if plural else SINGULAR
        noun = rng.choice(self.nouns_pl if plural else self.nouns_sg)
        det = rng.choice(["the", "some", "two"] if plural else ["the", "a", "this"])
        head = _word(noun, role, number=number)
        if rng.random() < 0.35:
            head = _word(rng.choice(self.adjs), "adjective") + _space() + head
        return _word(det, "determiner", number=number) + _space() + head, plural

    def clause(self) -> _Pieces:
        rng = self.rng
        subject, plural = self.noun_phrase("subject")
        number = PLURAL if plural else SINGULAR
        if rng.random() < 0.3:
            verb = _words(rng.choice(_INTRANSITIVE)[plural], "verb", number=number)
            return subject + _space() + verb
        verb = _word(rng.choice(_VERBS)[plural], "verb", number=number)
        obj, _ = self.noun_phrase("object")
        if rng.random() < 0.2:  # bracketed aside: the bracket must be closed
            aside = (_mark("(") + _word(rng.choice(self.adjs), "adjective") + _space() + _word("and", "other")
                     + _space() + _word(rng.choice(self.adjs), "adjective") + _mark(")")).with_labels(bracketed=1)
            obj = obj + _space() + aside
        return subject + _space() + verb + _space() + obj

    def sentence(self) -> _Pieces:
        rng = self.rng
        kind = rng.random()
        if kind < 0.45:
            pieces = self.clause()
            if rng.random() < 0.3:
                pieces = pieces + _space() + _word("and", "other") + _space() + self.clause()
            return pieces.capitalized() + _mark(".")
        if kind < 0.6:  # quoted speech by a recurring name
            quote = (self.clause().capitalized() + _mark(".")).with_labels(quoted=1)
            speaker = self.name()
            verb = _word(rng.choice(_SPEECH_VERBS), "verb")
            return speaker + _space() + verb + _mark(",") + _space() + _mark('"').with_labels(quoted=1) + quote \
                + _mark('"').with_labels(quoted=1)
        if kind < 0.75:  # counting sequence
            start = rng.randint(0, 9)
            words = _NUMBER_WORDS[start : start + rng.randint(3, 6)]
            counted = _Pieces()
            for place, number_word in enumerate(words, 1):
                counted = counted + (_space() if place > 1 else _Pieces()) + _word(number_word, "number_word",
                                                                                   count_position=place)
            return self.name() + _space() + _word("counts", "verb") + _space() + counted + _mark(".")
        if kind < 0.9:  # arithmetic fact
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            if rng.random() < 0.5:
                operator, result = "plus", a + b
            else:
                a, b = max(a, b), min(a, b)
                operator, result = "minus", a - b
            return (_word(str(a), "digit", arithmetic=OPERAND_A) + _space() + _word(operator, "operator") + _space()
                    + _word(str(b), "digit", arithmetic=OPERAND_B) + _space() + _word("is", "other") + _space()
                    + _word(str(result), "digit", arithmetic=RESULT) + _mark("."))
        i = rng.randrange(len(self.nouns_sg))  # same noun twice: copy within sentence
        count = rng.randint(2, 9)
        return (self.name() + _space() + _word("has", "verb") + _space() + _word(str(count), "digit") + _space()
                + _word(self.nouns_pl[i], "object", number=PLURAL) + _space() + _word("and", "other") + _space()
                + _word("likes", "verb") + _space() + _word("the", "determiner", number=SINGULAR) + _space()
                + _word(self.nouns_sg[i], "object", number=SINGULAR) + _mark("."))


@dataclass(frozen=True)
class LabelledDocument:
    text: str
    spans: list[tuple[int, int, Labels]]
    """(start, end, labels) of each word and delimiter, in text order: character offsets into `text`; the spaces
    between them carry no span."""


def generate_labelled_corpus(n_documents: int, seed: int) -> list[LabelledDocument]:
    """``n_documents`` synthetic documents with what was planted in each word (LABEL_KINDS); same seed, same
    output, and the same texts as `generate_corpus`."""
    if n_documents < 0:
        raise ValueError(f"n_documents must be >= 0, got {n_documents}")
    rng = random.Random(seed)  # private RNG: never touches global random state
    documents: list[LabelledDocument] = []
    for _ in range(n_documents):
        doc = _Document(rng)
        topic = TOPICS.index(doc.topic) + 1
        pieces = _Pieces()
        for index in range(rng.randint(3, 8)):
            pieces = pieces + (_space() if index else _Pieces()) + doc.sentence()
        spans, offset, named = [], 0, set()
        for text, labels in pieces.parts:
            if text != " ":
                if labels["role"] == ROLES.index("name") + 1:  # in text order: a speaker precedes its quote
                    labels = {**labels, "repeated_name": int(text in named)}
                    named.add(text)
                spans.append((offset, offset + len(text), {**labels, "topic": topic}))
            offset += len(text)
        documents.append(LabelledDocument(pieces.text, spans))
    return documents


def generate_corpus(n_documents: int, seed: int) -> list[str]:
    """Generate ``n_documents`` synthetic documents; same seed, same output."""
    return [document.text for document in generate_labelled_corpus(n_documents, seed)]
