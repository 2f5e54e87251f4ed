"""Measure how our element classification agrees with unstructured's published expected output.

unstructured's repository keeps the elements its own CI expects for a few example documents
(``example-docs/_expected_outputs_and_failed_docs``). They were produced with spaCy's
``en_core_web_sm``; comparing our categories with theirs measures what replacing the model
costs. Elements are aligned by text (``difflib`` over the two sequences of whitespace-normalised
texts); agreement is the share of expected elements that we produce with the same text *and*
the same category, so a missing or split element counts as a disagreement.
"""

from __future__ import annotations

import base64
import difflib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Labelled = tuple[str, str]  # (text, category)


@dataclass(frozen=True, slots=True)
class Agreement:
    expected: int
    produced: int
    text_matched: int
    category_matched: int

    @property
    def category_agreement(self) -> float:
        """Share of expected elements matched in text and category."""
        return self.category_matched / self.expected if self.expected else 1.0

    @property
    def category_agreement_of_matched(self) -> float:
        """Share of text-matched elements whose category also matches."""
        return self.category_matched / self.text_matched if self.text_matched else 0.0


def load_expected(path: Path) -> list[Labelled]:
    """(text, category) of the elements in an expected-output JSON file.

    Chunked outputs keep their source elements base64+zlib-encoded in ``orig_elements``; those
    are decoded (once each: an element split over chunks recurs), since chunks carry no
    element categories. Page breaks carry no text and are
    skipped.
    """
    items: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    elements: dict[str, dict[str, Any]] = {}  # by element_id: a split element recurs per chunk
    for item in items:
        encoded = item.get("metadata", {}).get("orig_elements")
        source = json.loads(zlib.decompress(base64.b64decode(encoded))) if encoded else [item]
        for element in source:
            elements.setdefault(element["element_id"], element)
    return [
        (_norm(e["text"]), e["type"])
        for e in elements.values()
        if e["type"] != "PageBreak" and _norm(e["text"])
    ]


def compare(expected: Sequence[Labelled], produced: Sequence[Labelled]) -> Agreement:
    matcher = difflib.SequenceMatcher(
        a=[text for text, _ in expected], b=[text for text, _ in produced], autojunk=False
    )
    text_matched = category_matched = 0
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            text_matched += 1
            category_matched += expected[block.a + k][1] == produced[block.b + k][1]
    return Agreement(len(expected), len(produced), text_matched, category_matched)


def _norm(text: str) -> str:
    return " ".join(text.split())


def labelled(elements: Sequence[Any]) -> list[Labelled]:
    """(text, category) of our elements (``pipelines.types.Element``)."""
    return [(_norm(e.text), e.category) for e in elements if _norm(e.text)]
