"""Split parsed elements (or a stream of plain text) into chunks sized for the embedding model.

The rules follow unstructured's ``chunk_by_title``, over our own :class:`Element`:

* a Title starts a new chunk (a section boundary), except that consecutive headings stay
  together so a heading is never a chunk on its own when text follows it, and a chunk of
  fewer than ``min_words`` words takes the next section in with it (unstructured's
  ``combine_text_under_n_chars``): a filing's or a manual's one-line sections would otherwise
  each be a chunk of a few words, too little for the model to place;
* small consecutive elements of a section are packed into one chunk up to the budget;
* a Table is a chunk of its own (kept whole when it fits, with the heading just before it);
* an element over the budget is split at sentence boundaries (table rows for tables), falling
  back to word windows; only these splits carry ``overlap_words`` of overlap.

The budget is ``max_words`` words and ``max_tokens`` word-pieces, both. all-MiniLM-L6-v2 reads
at most 256 word-pieces and silently drops the rest; English prose runs at ~1.4 pieces a word,
so 160 words usually fit, but figures, URLs and chemical names run at 3 or more and need the
token budget too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pipelines.types import ChunkDraft, Element

DEFAULT_MAX_WORDS = 160
DEFAULT_MAX_TOKENS = 224
"""In :func:`estimate_tokens` units; leaves room for the estimate's error under the model's 254."""
SECTION_MAX_CHARS = 200
STREAM_PARAGRAPH_WORDS_FACTOR = 4
"""A streamed paragraph is cut at a sentence end once it holds this many chunks' worth of words."""

TITLE_CATEGORIES = frozenset({"Title"})
TABLE_CATEGORIES = frozenset({"Table"})

_ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st vs etc e.g i.e cf al inc ltd co corp no nos fig figs approx
    dept est vol p pp ed eds u.s u.k jan feb mar apr jun jul aug sep sept oct nov dec
    """.split()
)
_DOTTED = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
# A sentence end: terminal punctuation (plus closing quotes/brackets), whitespace, then
# something that can start a sentence.
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def word_count(text: str) -> int:
    return len(text.split())


_TOKEN_PIECE = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


def estimate_tokens(text: str) -> int:
    """Estimate the model's word-piece count for ``text`` without loading a tokenizer.

    Every punctuation mark and non-ASCII character is a piece, digits come in threes, and long
    words split further. Measured against the real all-MiniLM-L6-v2 tokenizer on 4,534
    40-word windows (prose, SEC filings, SciFact abstracts): real/estimate has mean 0.89 and
    p99 1.13, so it errs on the safe side. With the default budgets no chunk of 2,000 real
    ones (SEC 10-Q text, SciFact, a Wikipedia article) went over the model's 254.
    Pass the real tokenizer's count as ``count_tokens`` when it is at hand.
    """
    count = 0
    for piece in _TOKEN_PIECE.findall(text):
        if piece[0].isdigit():
            count += (len(piece) + 2) // 3
        elif piece[0].isalpha():
            count += 1 + max(0, len(piece) - 5) // 3
        else:
            count += 1
    return count


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with a rule-based splitter (no NLP model needed).

    Whitespace, line wraps included, is collapsed. A full stop after a common abbreviation
    ("e.g.", "Dr.", "U.S.") or an initial ("J. Smith") does not end a sentence.
    """
    text = " ".join(text.split())
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if match.group().startswith(".") and _is_abbreviation(text, match.start()):
            continue
        sentence = text[start : match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _is_abbreviation(text: str, dot_index: int) -> bool:
    word = text[text.rfind(" ", 0, dot_index) + 1 : dot_index].lstrip("\"'([\u201c\u2018")
    if len(word) == 1 and word.isalpha() and word.isupper():
        return True  # an initial
    if _DOTTED.fullmatch(word):
        return True  # "F.C.", "U.S.", "e.g."
    return word.lower() in _ABBREVIATIONS


TokenCounter = Callable[[str], int]


@dataclass(frozen=True, slots=True)
class _Budget:
    max_words: int
    max_tokens: int
    overlap_words: int
    count_tokens: TokenCounter
    min_words: int = 0

    def __post_init__(self) -> None:
        if self.max_words < 1 or self.max_tokens < 1:
            raise ValueError("max_words and max_tokens must be at least 1")
        if not 0 <= self.min_words <= self.max_words:
            raise ValueError("min_words must be between 0 and max_words")
        # A piece is measured when it is tested against the budget and again when it is
        # added; remembering the last few counts halves the chunker's time on long texts.
        object.__setattr__(self, "count_tokens", lru_cache(maxsize=64)(self.count_tokens))
        if not 0 <= self.overlap_words <= self.max_words // 2:
            raise ValueError("overlap_words must be between 0 and max_words // 2")

    def within(self, text: str, *, words: int = 0, tokens: int = 0) -> bool:
        return (
            words + word_count(text) <= self.max_words
            and tokens + self.count_tokens(text) <= self.max_tokens
        )


def word_windows(text: str, size: int) -> list[str]:
    """Consecutive windows of at most ``size`` words."""
    if size <= 0:
        raise ValueError("size must be positive")
    words = text.split()
    return [" ".join(words[i : i + size]) for i in range(0, len(words), size)]


def _budget_windows(
    text: str, *, max_words: int, max_tokens: int, count: TokenCounter
) -> list[str]:
    """Consecutive word windows within both limits (a single giant "word" stands alone)."""
    windows: list[str] = []
    current: list[str] = []
    tokens = 0
    for word in text.split():
        word_tokens = count(word)
        if current and (len(current) >= max_words or tokens + word_tokens > max_tokens):
            windows.append(" ".join(current))
            current, tokens = [], 0
        current.append(word)
        tokens += word_tokens
    if current:
        windows.append(" ".join(current))
    return windows


def _normalise(element: Element) -> str:
    if element.category in TABLE_CATEGORIES:
        lines = (" ".join(line.split()) for line in element.text.splitlines())
        return "\n".join(line for line in lines if line)
    return " ".join(element.text.split())


def _pieces(text: str, *, category: str, budget: _Budget) -> list[str]:
    """Split an over-budget element into units that fit after an overlap (rows or sentences)."""
    units = text.splitlines() if category in TABLE_CATEGORIES else split_sentences(text)
    max_words = budget.max_words - budget.overlap_words
    max_tokens = budget.max_tokens * max_words // budget.max_words
    pieces: list[str] = []
    for unit in units:
        if word_count(unit) <= max_words and budget.count_tokens(unit) <= max_tokens:
            pieces.append(unit)
        else:
            pieces.extend(
                _budget_windows(
                    unit, max_words=max_words, max_tokens=max_tokens, count=budget.count_tokens
                )
            )
    return pieces


@dataclass(slots=True)
class _ChunkBuilder:
    """The chunk being filled; ``flush`` turns it into a :class:`ChunkDraft`."""

    budget: _Budget
    order: int = 0
    section: str | None = None
    parts: list[str] = field(default_factory=list)
    words: int = 0
    tokens: int = 0
    has_body: bool = False  # holds something other than headings
    page: int | None = None
    page_end: int | None = None
    categories: list[str] = field(default_factory=list)
    split: bool = False

    def add(self, text: str, *, category: str, page: int | None, same_element: bool) -> None:
        if same_element and self.parts:
            joiner = "\n" if category in TABLE_CATEGORIES else " "
            self.parts[-1] = f"{self.parts[-1]}{joiner}{text}"
        else:
            self.parts.append(text)
        self.words += word_count(text)
        self.tokens += self.budget.count_tokens(text)
        self.has_body = self.has_body or category not in TITLE_CATEGORIES
        if page is not None:
            self.page = page if self.page is None else self.page
            self.page_end = page if self.page_end is None else max(self.page_end, page)
        if category not in self.categories:
            self.categories.append(category)

    def fits(self, text: str) -> bool:
        return self.budget.within(text, words=self.words, tokens=self.tokens)

    def tail_words(self, count: int) -> str:
        if count <= 0 or not self.parts:
            return ""
        return " ".join(self.parts[-1].split()[-count:])

    def flush(self) -> ChunkDraft | None:
        if not self.parts:
            return None
        metadata: dict[str, Any] = {
            "categories": list(self.categories),
            "page_end": self.page_end,
            "words": self.words,
        }
        if self.split:
            metadata["split"] = True
        chunk = ChunkDraft(
            text="\n\n".join(self.parts),
            order=self.order,
            page=self.page,
            section=self.section,
            metadata=metadata,
        )
        self.order += 1
        self.parts, self.words, self.tokens, self.has_body = [], 0, 0, False
        self.page = self.page_end = None
        self.categories, self.split = [], False
        return chunk


def _emit(builder: _ChunkBuilder) -> Iterator[ChunkDraft]:
    chunk = builder.flush()
    if chunk is not None:
        yield chunk


def _feed(
    builder: _ChunkBuilder, *, text: str, category: str, page: int | None
) -> Iterator[ChunkDraft]:
    """Add one element's normalised text, yielding every chunk it completes."""
    is_title = category in TITLE_CATEGORIES
    is_table = category in TABLE_CATEGORIES
    if (is_table and builder.has_body) or (
            is_title and builder.has_body and builder.words >= builder.budget.min_words):
        yield from _emit(builder)
    if is_title:
        builder.section = text[:SECTION_MAX_CHARS]
    if builder.budget.within(text):
        if not builder.fits(text):
            yield from _emit(builder)
        builder.add(text, category=category, page=page, same_element=False)
    else:
        yield from _feed_oversized(builder, text=text, category=category, page=page)
    if is_table:
        yield from _emit(builder)


def _feed_oversized(
    builder: _ChunkBuilder, *, text: str, category: str, page: int | None
) -> Iterator[ChunkDraft]:
    if builder.has_body:
        yield from _emit(builder)
    started = False  # once True, the builder's last part is this element's text
    for piece in _pieces(text, category=category, budget=builder.budget):
        if not builder.fits(piece):
            overlap = builder.tail_words(builder.budget.overlap_words) if started else ""
            builder.split = builder.split or started
            yield from _emit(builder)
            if overlap and builder.budget.within(f"{overlap} {piece}"):
                builder.add(overlap, category=category, page=page, same_element=False)
            builder.split = started
        builder.add(piece, category=category, page=page, same_element=started)
        started = True


def chunk_elements(
    elements: Sequence[Element],
    *,
    max_words: int = DEFAULT_MAX_WORDS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_words: int = 0,
    count_tokens: TokenCounter = estimate_tokens,
    min_words: int = 0,
) -> list[ChunkDraft]:
    """Chunk a parsed document's elements by section and budget (see the module doc).

    Each chunk has ``page`` = the page of its first element, ``section`` = the text of the
    most recent Title (at most 200 characters; None before the first), ``order`` = 0..n-1, and
    metadata ``categories`` (element categories in order of appearance), ``page_end`` (last
    page), ``words`` and, for pieces of a split element, ``split: True``. Elements with no text
    are skipped. ``count_tokens`` may be the model tokenizer's own count (without special
    tokens; it must add up over whitespace-separated words, as word-piece counts do);
    ``max_tokens`` is then at most 254 for all-MiniLM-L6-v2.
    """
    budget = _Budget(max_words, max_tokens, overlap_words, count_tokens, min_words)
    builder = _ChunkBuilder(budget=budget)
    chunks: list[ChunkDraft] = []
    for element in elements:
        text = _normalise(element)
        if text:
            chunks.extend(_feed(builder, text=text, category=element.category, page=element.page))
    chunks.extend(_emit(builder))
    return chunks


def chunk_text_stream(
    lines: Iterable[str],
    *,
    max_words: int = DEFAULT_MAX_WORDS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_words: int = 0,
    count_tokens: TokenCounter = estimate_tokens,
) -> Iterator[ChunkDraft]:
    """Chunk plain text incrementally: paragraphs end at blank lines, small ones are packed.

    Memory stays bounded by one line plus a few chunks: a paragraph that grows past
    ``STREAM_PARAGRAPH_WORDS_FACTOR * max_words`` words is chunked up to its last sentence end
    before more lines are read. Chunks carry no page or section.
    """
    budget = _Budget(max_words, max_tokens, overlap_words, count_tokens)
    builder = _ChunkBuilder(budget=budget)
    paragraph: list[str] = []
    paragraph_words = 0
    cap = STREAM_PARAGRAPH_WORDS_FACTOR * max_words
    for line in lines:
        stripped = " ".join(line.split())
        if stripped:
            paragraph.append(stripped)
            paragraph_words += word_count(stripped)
            if paragraph_words < cap:
                continue
            head, rest = _cut_at_last_sentence(" ".join(paragraph))
            yield from _feed(builder, text=head, category="NarrativeText", page=None)
            paragraph = [rest] if rest else []
            paragraph_words = word_count(rest)
        elif paragraph:
            yield from _feed(builder, text=" ".join(paragraph), category="NarrativeText", page=None)
            paragraph, paragraph_words = [], 0
    if paragraph:
        yield from _feed(builder, text=" ".join(paragraph), category="NarrativeText", page=None)
    yield from _emit(builder)


def _cut_at_last_sentence(text: str) -> tuple[str, str]:
    """Split off the last (possibly unfinished) sentence; all of it when there is only one."""
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return text, ""
    return " ".join(sentences[:-1]), sentences[-1]
