"""Train, evaluate, cache and load the part-of-speech tagger."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.nlp import perceptron
from pipelines.nlp.perceptron import PerceptronTagger
from pipelines.nlp.tokenize import sent_tokenize
from pipelines.nlp.treebank import (
    DEV,
    TEST,
    TRAIN,
    TaggedSentence,
    read_conllu,
    split_path,
    treebank_fingerprint,
)

EPOCHS = 8


@dataclass(frozen=True, slots=True)
class TaggerReport:
    """What one training run produced and how well it tags and splits held-out text."""

    path: Path
    treebank_sha256: str
    train_sentences: int
    train_tokens: int
    dev_accuracy: float
    test_accuracy: float
    test_sentence_boundary_f1: float
    features: int
    weights_bytes: int
    train_seconds: float  # wall clock
    train_cpu_seconds: float  # this process's CPU time: comparable across loaded machines


def train_tagger(treebank_dir: Path, out_path: Path, *, epochs: int = EPOCHS) -> TaggerReport:
    """Train on the treebank's train split, write the weights to ``out_path``, report accuracy
    on its dev and test splits (gold tokens) and sentence-boundary F1 on its test split."""
    fit = _fit(treebank_dir, out_path, epochs=epochs)
    test = read_conllu(split_path(treebank_dir, TEST))
    return TaggerReport(
        path=out_path,
        treebank_sha256=fit.fingerprint,
        train_sentences=fit.sentences,
        train_tokens=fit.tokens,
        dev_accuracy=perceptron.accuracy(fit.tagger, read_conllu(split_path(treebank_dir, DEV))),
        test_accuracy=perceptron.accuracy(fit.tagger, test),
        test_sentence_boundary_f1=sentence_boundary_f1(test, fit.tagger.abbreviations),
        features=fit.tagger.feature_count,
        weights_bytes=out_path.stat().st_size,
        train_seconds=fit.seconds,
        train_cpu_seconds=fit.cpu_seconds,
    )


def ensure_tagger(treebank_dir: Path, cache_dir: Path) -> Path:
    """The path of a tagger trained on ``treebank_dir``, training it once per treebank version.

    The file is named by the treebank's sha256, so a changed treebank trains a new tagger and
    an unchanged one is never trained twice. Writes are atomic; two processes racing here
    both train and one file wins, which is harmless.
    """
    fingerprint = treebank_fingerprint(treebank_dir)
    path = cache_dir / f"pos-tagger-{fingerprint[:16]}-v{perceptron.FORMAT_VERSION}.npz"
    if not path.exists():
        _fit(treebank_dir, path, epochs=EPOCHS)
    return path


@dataclass(frozen=True, slots=True)
class _Fit:
    tagger: PerceptronTagger
    fingerprint: str
    sentences: int
    tokens: int
    seconds: float
    cpu_seconds: float


def _fit(treebank_dir: Path, out_path: Path, *, epochs: int) -> _Fit:
    fingerprint = treebank_fingerprint(treebank_dir)
    train = read_conllu(split_path(treebank_dir, TRAIN))
    started, cpu_started = time.perf_counter(), time.process_time()
    tagger = perceptron.train(train, epochs=epochs)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    tagger.meta["treebank_sha256"] = fingerprint
    tagger.save(out_path)
    tokens = sum(len(s.words) for s in train)
    return _Fit(tagger, fingerprint, len(train), tokens, seconds, cpu_seconds)


def load_tagger(path: Path) -> PerceptronTagger:
    """Load weights written by ``train_tagger``."""
    return PerceptronTagger.load(path)


def sentence_boundary_f1(
    sentences: Sequence[TaggedSentence], abbreviations: frozenset[str]
) -> float:
    """F1 of the sentence boundaries ``sent_tokenize`` finds inside each treebank paragraph.

    Paragraphs are rebuilt by joining their sentences' text with a space; paragraph ends are
    not counted, since every splitter gets them for free.
    """
    true_positive = predicted_total = gold_total = 0
    for paragraph in _paragraphs(sentences):
        gold = _boundaries(paragraph)
        predicted = _boundaries(sent_tokenize(" ".join(paragraph), abbreviations))
        true_positive += len(gold & predicted)
        gold_total += len(gold)
        predicted_total += len(predicted)
    if true_positive == 0:
        return 0.0
    precision, recall = true_positive / predicted_total, true_positive / gold_total
    return 2 * precision * recall / (precision + recall)


def _paragraphs(sentences: Sequence[TaggedSentence]) -> list[list[str]]:
    paragraphs: list[list[str]] = []
    for sentence in sentences:
        if sentence.starts_paragraph or not paragraphs:
            paragraphs.append([])
        paragraphs[-1].append(sentence.text)
    return paragraphs


def _boundaries(sentences: Sequence[str]) -> set[int]:
    """Offsets (ignoring whitespace) at which each sentence but the last ends."""
    ends: set[int] = set()
    offset = 0
    for sentence in sentences[:-1]:
        offset += len("".join(sentence.split()))
        ends.add(offset)
    return ends
