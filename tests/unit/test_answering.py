"""Extractive answers: the real model on real passages, and the mechanics with a fake encoder."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from pipelines.answering import (
    NO_ANSWER,
    ExtractiveGenerator,
    Generator,
    candidate_sentences,
    compose_answer,
)
from pipelines.chunking import chunk_text_stream
from pipelines.embedding import Embedder
from pipelines.types import Passage

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
NORWICH = DATA / "docs" / "unstructured" / "norwich-city.txt"


def _norwich_passages(*needles: str) -> list[Passage]:
    """Real chunks of the Norwich City article, the ones containing ``needles``, in that order."""
    chunks = list(chunk_text_stream(NORWICH.read_text(encoding="utf-8").splitlines()))
    picked: list[Passage] = []
    for needle in needles:
        chunk = next(c for c in chunks if needle in c.text)
        if any(p.chunk_id == chunk.order for p in picked):
            continue
        picked.append(
            Passage(
                chunk_id=chunk.order,
                document_id="norwich",
                filename=NORWICH.name,
                page=chunk.page,
                text=chunk.text,
                score=1.0 / (1 + len(picked)),
            )
        )
    return picked


PASSAGE_NEEDLES = ("born in Bangor", "Huddersfield Town in 1990", "Hall of Fame", "gaptoothed")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.default()


@pytest.fixture(scope="module")
def passages() -> list[Passage]:
    return _norwich_passages(*PASSAGE_NEEDLES)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Where was Iwan Roberts born?", r"Bangor"),
        ("Which club did Roberts move to in 1990?", r"Huddersfield"),
        ("When was Roberts elected to the Norwich City Hall of Fame?", r"2002"),
    ],
)
def test_answerable_question_cites_the_supporting_sentence(
    embedder: Embedder, passages: list[Passage], question: str, expected: str
) -> None:
    answer = compose_answer(question, passages, encode=embedder.encode)
    assert answer.answered, answer
    assert 1 <= len(answer.citations) <= 3
    assert any(re.search(expected, c.quote) for c in answer.citations), answer
    for number, citation in enumerate(answer.citations, start=1):
        assert f"{citation.quote} [{number}]" in answer.answer
        assert citation.quote in next(p.text for p in passages if p.chunk_id == citation.chunk_id)
        assert citation.document_id == "norwich" and citation.filename == NORWICH.name


@pytest.mark.parametrize(
    "question",
    [
        "What is the boiling point of liquid nitrogen?",
        "How do I reset my home router password?",
        "What were Apple's total net sales in the third quarter of 2023?",
    ],
)
def test_off_topic_question_is_not_answered(
    embedder: Embedder, passages: list[Passage], question: str
) -> None:
    answer = compose_answer(question, passages, encode=embedder.encode)
    assert (answer.answered, answer.answer, answer.citations) == (False, NO_ANSWER, [])


def test_extractive_generator_is_a_generator(embedder: Embedder, passages: list[Passage]) -> None:
    generator: Generator = ExtractiveGenerator(encode=embedder.encode, max_sentences=1)
    answer = generator.generate("Where was Iwan Roberts born?", passages)
    assert answer.answered and len(answer.citations) == 1


# Mechanics with a deterministic bag-of-words encoder: the model is beside the point here.

VOCABULARY = ["sales", "rose", "fell", "iphone", "mac", "quarter", "goals", "weather"]


def bag_of_words(texts: Sequence[str]) -> npt.NDArray[np.float32]:
    rows = []
    for text in texts:
        words = re.findall(r"[a-z]+", text.lower())
        row = np.array([words.count(v) for v in VOCABULARY], dtype=np.float32) + 1e-3
        rows.append(row / np.linalg.norm(row))
    return np.vstack(rows)


def _passage(chunk_id: int, text: str) -> Passage:
    return Passage(
        chunk_id=chunk_id,
        document_id=f"d{chunk_id}",
        filename="f.txt",
        page=chunk_id,
        text=text,
        score=0.5,
    )


def test_sentences_are_deduplicated_capped_and_in_reading_order() -> None:
    passages = [
        _passage(1, "The weather was mild. Mac sales rose this quarter."),
        _passage(2, "iPhone sales rose this quarter. Mac sales rose this quarter!"),
    ]
    answer = compose_answer(
        "Which sales rose this quarter?",
        passages,
        encode=bag_of_words,
        max_sentences=3,
        min_score=0.3,
    )
    assert answer.answered
    quotes = [c.quote for c in answer.citations]
    # The exact repeat in passage 2 is dropped; the weather sentence is too weak to join.
    assert quotes == ["Mac sales rose this quarter.", "iPhone sales rose this quarter."]
    assert [c.chunk_id for c in answer.citations] == [1, 2]
    assert answer.answer == "Mac sales rose this quarter. [1] iPhone sales rose this quarter. [2]"
    assert all(0.3 <= c.score <= 1.05 for c in answer.citations)


def test_threshold_and_empty_inputs() -> None:
    passages = [_passage(1, "The weather was mild all week long.")]
    assert not compose_answer("How many goals?", passages, encode=bag_of_words).answered
    assert not compose_answer("How many goals?", [], encode=bag_of_words).answered
    assert not compose_answer("Goals?", [_passage(1, "12 34. ok")], encode=bag_of_words).answered
    with pytest.raises(ValueError):
        compose_answer("q", passages, encode=bag_of_words, max_sentences=0)


def test_candidate_sentences_split_rows_and_long_runs() -> None:
    text = "Net sales rose. Costs fell a lot.\nQ1 100 200\n" + " ".join(["word"] * 200)
    candidates = candidate_sentences(text)
    assert candidates[:3] == ["Net sales rose.", "Costs fell a lot.", "Q1 100 200"]
    assert [len(c.split()) for c in candidates[3:]] == [80, 80, 40]
