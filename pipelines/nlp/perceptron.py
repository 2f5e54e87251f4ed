"""An averaged-perceptron part-of-speech tagger (Collins 2002; Honnibal's feature set).

Greedy left-to-right tagging. Each token is scored with a sum of weight rows, one per
feature: the word, its affixes and shape, its neighbours, and the two previous predicted tags.
Words that the training data shows to be (nearly) unambiguous are tagged from a dictionary.
Weights live in one dense numpy matrix indexed by feature id, which keeps both training and
tagging to a handful of vectorised operations per token.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pipelines.nlp.base import Tagger
from pipelines.nlp.tokenize import DEFAULT_ABBREVIATIONS
from pipelines.nlp.treebank import TaggedSentence

FORMAT_VERSION = 1
START = ("-START-", "-START2-")
END = ("-END-", "-END2-")
# A word is tagged from the dictionary when seen this often with one tag this dominant.
TAGDICT_MIN_COUNT = 20
TAGDICT_MIN_SHARE = 0.97
PRUNE_AT_OR_BELOW = 0.5  # features whose largest averaged weight is this small are dropped

Matrix = npt.NDArray[np.float32]


def normalize(word: str) -> str:
    """The vocabulary form of a word: lower case, with numbers and hyphenated words folded."""
    if "-" in word and word[0] != "-":
        return "!HYPHEN"
    if word.isdigit() and len(word) == 4:
        return "!YEAR"
    if word[:1].isdigit():
        return "!DIGITS"
    return word.lower()


def shape(word: str) -> str:
    """Word shape with runs collapsed: ``Xx`` for Paris, ``d.d`` for 3.14, ``X`` for USA."""
    out: list[str] = []
    for char in word[:12]:
        kind = "X" if char.isupper() else "x" if char.islower() else "d" if char.isdigit() else char
        if not out or out[-1] != kind:
            out.append(kind)
    return "".join(out)


def static_features(words: Sequence[str], context: Sequence[str], i: int) -> list[str]:
    """Features of token ``i`` that do not depend on predicted tags.

    ``context`` is the normalised sentence padded with two START and two END symbols, so the
    token itself sits at ``context[i + 2]``.
    """
    word, j = words[i], i + 2
    return [
        "bias",
        "w " + context[j],
        "s3 " + word[-3:],
        "s2 " + word[-2:],
        "s4 " + word[-4:],
        "s1 " + word[-1:],
        "p1 " + word[:1],
        "p3 " + word[:3],
        "ww-1 " + context[j - 1] + " " + context[j],
        "ww+1 " + context[j] + " " + context[j + 1],
        "sh " + shape(word),
        "w-1 " + context[j - 1],
        "s3-1 " + context[j - 1][-3:],
        "w-2 " + context[j - 2],
        "w+1 " + context[j + 1],
        "s3+1 " + context[j + 1][-3:],
        "w+2 " + context[j + 2],
    ]


def tag_features(prev: str, prev2: str, norm_word: str) -> list[str]:
    """Features of a token that depend on the two previous predicted tags."""
    return [
        "t-1 " + prev,
        "t-2 " + prev2,
        "t-1t-2 " + prev + " " + prev2,
        "t-1w " + prev + " " + norm_word,
    ]


def padded_context(words: Sequence[str]) -> list[str]:
    """The normalised words with two START symbols before and two END symbols after."""
    return [*START, *(normalize(w) for w in words), *END]


STATIC_FEATURES = len(static_features(["x"], padded_context(["x"]), 0))


class PerceptronTagger:
    """A trained tagger: ``tag(words) -> tags``. Build with ``train`` or ``load``."""

    name = "perceptron"

    def __init__(
        self,
        *,
        features: dict[str, int],
        weights: Matrix,
        classes: list[str],
        tagdict: dict[str, str],
        abbreviations: frozenset[str],
        meta: dict[str, object],
    ) -> None:
        self._features = features
        # One extra all-zero row stands for every feature unseen in training.
        self._weights = np.vstack([weights, np.zeros((1, weights.shape[1]), dtype=np.float32)])
        self._unknown = weights.shape[0]
        self.classes = classes
        self.tagdict = tagdict
        self.abbreviations = abbreviations
        self.meta = meta

    @property
    def feature_count(self) -> int:
        return self._unknown

    def tag(self, words: Sequence[str]) -> list[str]:
        context = padded_context(words)
        lookup, unknown, weights = self._features.get, self._unknown, self._weights
        known = [self.tagdict.get(word) for word in words]
        ambiguous = [i for i, tag in enumerate(known) if tag is None]
        static_scores: dict[int, Matrix] = {}
        if ambiguous:
            # One gather for every ambiguous token; tag features are added token by token.
            static = [
                [lookup(name, unknown) for name in static_features(words, context, i)]
                for i in ambiguous
            ]
            gathered = weights[np.array(static, dtype=np.intp)].sum(axis=1)
            static_scores = dict(zip(ambiguous, gathered, strict=True))
        prev, prev2 = START
        tags: list[str] = []
        for i, guess in enumerate(known):
            if guess is None:
                rows = [lookup(name, unknown) for name in tag_features(prev, prev2, context[i + 2])]
                guess = self.classes[int((static_scores[i] + weights[rows].sum(axis=0)).argmax())]
            tags.append(guess)
            prev2, prev = prev, guess
        return tags

    def save(self, path: Path) -> None:
        """Write the weights as a compressed ``.npz`` (float16 weights, features as text)."""
        names = sorted(self._features, key=self._features.__getitem__)
        meta = {
            **self.meta,
            "format_version": FORMAT_VERSION,
            "classes": self.classes,
            "tagdict": self.tagdict,
            "abbreviations": sorted(self.abbreviations),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
        np.savez_compressed(
            tmp,
            weights=self._weights[: self._unknown].astype(np.float16),
            features=np.frombuffer("\n".join(names).encode("utf-8"), dtype=np.uint8),
            meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        )
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> PerceptronTagger:
        with np.load(path) as data:
            meta = json.loads(data["meta"].tobytes().decode("utf-8"))
            if meta.get("format_version") != FORMAT_VERSION:
                found = meta.get("format_version")
                raise ValueError(f"{path}: tagger format {found}, expected {FORMAT_VERSION}")
            names = data["features"].tobytes().decode("utf-8").split("\n")
            weights = data["weights"].astype(np.float32)
        return cls(
            features={name: i for i, name in enumerate(names)},
            weights=weights,
            classes=list(meta.pop("classes")),
            tagdict=dict(meta.pop("tagdict")),
            abbreviations=frozenset(meta.pop("abbreviations")),
            meta=meta,
        )


def build_tagdict(sentences: Sequence[TaggedSentence]) -> dict[str, str]:
    """Frequent words that (nearly) always carry one tag: tagged by lookup, never learned."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for sentence in sentences:
        for word, tag in zip(sentence.words, sentence.tags, strict=True):
            counts[word][tag] += 1
    tagdict: dict[str, str] = {}
    for word, tags in counts.items():
        tag, mode = tags.most_common(1)[0]
        total = sum(tags.values())
        if total >= TAGDICT_MIN_COUNT and mode / total >= TAGDICT_MIN_SHARE:
            tagdict[word] = tag
    return tagdict


def treebank_abbreviations(sentences: Sequence[TaggedSentence]) -> frozenset[str]:
    """Tokens that keep a final period inside a sentence (``Mr.``, ``Inc.``): abbreviations."""
    found = {
        word.lower()
        for sentence in sentences
        for word in sentence.words[:-1]
        if len(word) > 1 and word.endswith(".") and any(c.isalpha() for c in word)
    }
    return DEFAULT_ABBREVIATIONS | found


@dataclass(frozen=True, slots=True)
class _Example:
    """A training sentence with its static feature ids computed once."""

    context: list[str]
    known: list[str | None]  # the tag-dictionary tag, or None where the model must decide
    gold: list[int]
    ambiguous: list[int]  # positions where known is None
    static: npt.NDArray[np.intp]  # (len(ambiguous), number of static features)


def train(
    sentences: Sequence[TaggedSentence], *, epochs: int = 8, seed: int = 0
) -> PerceptronTagger:
    """Train an averaged perceptron on gold-tagged sentences."""
    classes = sorted({tag for s in sentences for tag in s.tags})
    tagdict = build_tagdict(sentences)
    features: dict[str, int] = {}
    examples = [_example(s, tagdict, classes, features) for s in sentences]
    for prev in [*START, *classes]:
        for prev2 in [*START, *classes]:
            features.setdefault("t-1t-2 " + prev + " " + prev2, len(features))
    averaged = _averaged_weights(examples, features, classes, epochs=epochs, seed=seed)
    # Most features never earn a weight that matters: dropping them shrinks the file and the
    # resident matrix by two thirds at no measured cost in accuracy.
    keep = np.flatnonzero(np.abs(averaged).max(axis=1) > PRUNE_AT_OR_BELOW)
    names = sorted(features, key=features.__getitem__)
    return PerceptronTagger(
        features={names[row]: i for i, row in enumerate(keep)},
        weights=averaged[keep],
        classes=classes,
        tagdict=tagdict,
        abbreviations=treebank_abbreviations(sentences),
        meta={"epochs": epochs, "seed": seed},
    )


def _example(
    sentence: TaggedSentence, tagdict: dict[str, str], classes: list[str], features: dict[str, int]
) -> _Example:
    """Index the sentence's features (growing ``features``) and keep what training needs."""
    context = padded_context(sentence.words)
    known = [tagdict.get(word) for word in sentence.words]
    ambiguous = [i for i, tag in enumerate(known) if tag is None]
    static = [
        [
            features.setdefault(name, len(features))
            for name in static_features(sentence.words, context, i)
        ]
        for i in ambiguous
    ]
    prev, prev2 = START
    for i, tag in enumerate(sentence.tags):  # tag features as seen with gold history
        for name in tag_features(prev, prev2, context[i + 2]):
            features.setdefault(name, len(features))
        prev2, prev = prev, tag
    class_id = {tag: i for i, tag in enumerate(classes)}
    return _Example(
        context=context,
        known=known,
        gold=[class_id[tag] for tag in sentence.tags],
        ambiguous=ambiguous,
        static=np.array(static, dtype=np.intp).reshape(len(ambiguous), STATIC_FEATURES),
    )


def _averaged_weights(
    examples: Sequence[_Example],
    features: dict[str, int],
    classes: list[str],
    *,
    epochs: int,
    seed: int,
) -> Matrix:
    """Greedy left-to-right perceptron training; returns the averaged weights (features × classes).

    Each sentence's static scores are gathered in one operation and re-gathered for the rest
    of the sentence after an update, so scoring stays exact at a fraction of the cost.
    """
    unknown = len(features)
    weights = np.zeros((unknown + 1, len(classes)), dtype=np.float32)
    # totals[f, c] accumulates step * update; averaged = weights - totals / steps.
    totals = np.zeros(weights.shape, dtype=np.float64)
    order = list(range(len(examples)))
    rng = random.Random(seed)
    step = 0
    for _ in range(epochs):
        rng.shuffle(order)
        for k in order:
            ex = examples[k]
            scores = weights[ex.static].sum(axis=1)
            prev, prev2 = START
            a = 0
            for i, guess in enumerate(ex.known):
                if guess is None:
                    step += 1
                    names = tag_features(prev, prev2, ex.context[i + 2])
                    dyn = [features.get(name, unknown) for name in names]
                    best = int((scores[a] + weights[dyn].sum(axis=0)).argmax())
                    truth = ex.gold[i]
                    if best != truth:
                        seen = [row for row in dyn if row != unknown]
                        rows = np.concatenate((ex.static[a], seen)).astype(np.intp)
                        weights[rows, truth] += 1.0
                        weights[rows, best] -= 1.0
                        totals[rows, truth] += step
                        totals[rows, best] -= step
                        scores[a + 1 :] = weights[ex.static[a + 1 :]].sum(axis=1)
                    guess = classes[best]
                    a += 1
                prev2, prev = prev, guess
    return (weights[:unknown] - totals[:unknown] / max(step, 1)).astype(np.float32)


def accuracy(tagger: Tagger, sentences: Sequence[TaggedSentence]) -> float:
    """Share of tokens whose predicted tag equals the gold tag (tagging the gold tokens)."""
    right = total = 0
    for s in sentences:
        predicted = tagger.tag(s.words)
        right += sum(p == g for p, g in zip(predicted, s.tags, strict=True))
        total += len(s.tags)
    return right / total if total else 0.0
