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


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Document:
    """Sentence generator bound to one document's topic and cast of names."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.nouns_sg, self.nouns_pl, self.adjs = _TOPICS[rng.choice(sorted(_TOPICS))]
        self.cast = rng.sample(_NAMES, k=rng.randint(1, 3))

    def noun_phrase(self) -> tuple[str, bool]:
        """Return a noun phrase and whether it is plural."""
        rng = self.rng
        if rng.random() < 0.3:
            return rng.choice(self.cast), False
        plural = rng.random() < 0.5
        noun = rng.choice(self.nouns_pl if plural else self.nouns_sg)
        det = rng.choice(["the", "some", "two"] if plural else ["the", "a", "this"])
        if rng.random() < 0.35:
            noun = f"{rng.choice(self.adjs)} {noun}"
        return f"{det} {noun}", plural

    def clause(self) -> str:
        rng = self.rng
        subject, plural = self.noun_phrase()
        if rng.random() < 0.3:
            verb = rng.choice(_INTRANSITIVE)[plural]
            return f"{subject} {verb}"
        verb = rng.choice(_VERBS)[plural]
        obj, _ = self.noun_phrase()
        if rng.random() < 0.2:  # bracketed aside: the bracket must be closed
            obj = f"{obj} ({rng.choice(self.adjs)} and {rng.choice(self.adjs)})"
        return f"{subject} {verb} {obj}"

    def sentence(self) -> str:
        rng = self.rng
        kind = rng.random()
        if kind < 0.45:
            text = self.clause()
            if rng.random() < 0.3:
                text = f"{text} and {self.clause()}"
            return _capitalize(text) + "."
        if kind < 0.6:  # quoted speech by a recurring name
            quote = _capitalize(self.clause())
            return f'{rng.choice(self.cast)} {rng.choice(_SPEECH_VERBS)}, "{quote}."'
        if kind < 0.75:  # counting sequence
            start = rng.randint(0, 9)
            words = _NUMBER_WORDS[start : start + rng.randint(3, 6)]
            return f"{rng.choice(self.cast)} counts {' '.join(words)}."
        if kind < 0.9:  # arithmetic fact
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            if rng.random() < 0.5:
                return f"{a} plus {b} is {a + b}."
            a, b = max(a, b), min(a, b)
            return f"{a} minus {b} is {a - b}."
        i = rng.randrange(len(self.nouns_sg))  # same noun twice: copy within sentence
        count = rng.randint(2, 9)
        return f"{rng.choice(self.cast)} has {count} {self.nouns_pl[i]} and likes the {self.nouns_sg[i]}."


def generate_corpus(n_documents: int, seed: int) -> list[str]:
    """Generate ``n_documents`` synthetic documents; same seed, same output."""
    if n_documents < 0:
        raise ValueError(f"n_documents must be >= 0, got {n_documents}")
    rng = random.Random(seed)  # private RNG: never touches global random state
    documents: list[str] = []
    for _ in range(n_documents):
        doc = _Document(rng)
        documents.append(" ".join(doc.sentence() for _ in range(rng.randint(3, 8))))
    return documents
