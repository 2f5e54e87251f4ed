"""What unstructured's element classifier needs from a part-of-speech tagger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Tagger(Protocol):
    """Tags tokenised words with Penn Treebank tags and knows its abbreviations."""

    name: str
    abbreviations: frozenset[str]

    def tag(self, words: Sequence[str]) -> list[str]:
        """One Penn Treebank tag per word."""
        ...
