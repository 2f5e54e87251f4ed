"""Values passed between the pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Element:
    """One structural element of a parsed document (a title, a paragraph, a table...)."""

    text: str
    category: str  # unstructured's element type: Title, NarrativeText, ListItem, Table...
    page: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    elements: list[Element]
    content_type: str
    page_count: int | None = None


@dataclass(frozen=True, slots=True)
class ChunkDraft:
    """A chunk of text ready to embed, before it has a database id."""

    text: str
    order: int
    page: int | None
    section: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Passage:
    """A retrieved chunk, as handed to answering."""

    chunk_id: int
    document_id: str
    filename: str
    page: int | None
    text: str
    score: float


@dataclass(frozen=True, slots=True)
class Citation:
    document_id: str
    filename: str
    page: int | None
    chunk_id: int
    score: float
    quote: str


@dataclass(frozen=True, slots=True)
class Answer:
    answer: str
    citations: list[Citation]
    answered: bool
