"""Large PDFs in page ranges: count the pages, plan the ranges, parse one range.

A PDF with more pages than a part holds is parsed as several jobs, one page range each, so a
huge document neither holds one worker for an hour nor loses all its work when one range
fails (``tasks.parts`` runs them; ``models.ledger`` counts them in). Everything here is a plain
function of a path, meant to run in ``pipelines.sandbox``'s limited child like any parse:
pypdf on a hostile file is parsing too.

A range is parsed by copying its pages into a PDF of their own (pypdf) and handing that to
``pipelines.parsing.parse_document``, so every guard, the type sniffing and the garbage check
apply to a part exactly as to a whole document. Page numbers are then shifted back to the
original's (the effect of unstructured's ``starting_page_number``, which ``parse_document``
does not expose).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pipelines.errors import CorruptDocument, EmptyDocument, EncryptedDocument
from pipelines.types import ParsedDocument

if TYPE_CHECKING:
    from pypdf import PdfReader

PDF_MAGIC: Final = b"%PDF-"
_PDF_HEADER_WINDOW: Final = 1024  # readers accept "%PDF-" anywhere in the first 1 kB
MAX_PARTS: Final = 2000
"""A document is never cut into more parts than this: ranges grow instead (see ``plan``)."""


@dataclass(frozen=True, slots=True)
class PageRange:
    """Pages ``first`` to ``last`` (1-based, inclusive) of a document: part ``index``."""

    index: int
    first: int
    last: int

    @property
    def label(self) -> str:
        return f"pages {self.first}-{self.last}" if self.last > self.first else f"page {self.first}"


def looks_like_pdf(path: Path) -> bool:
    """Whether the file starts like a PDF (a cheap test before pypdf is asked anything)."""
    with path.open("rb") as handle:
        return PDF_MAGIC in handle.read(_PDF_HEADER_WINDOW)


def count_pages(path: Path) -> int | None:
    """The PDF's page count from its page tree (nothing rendered); None when pypdf cannot
    read the file or it needs a password: the whole-document parse then judges it and gives
    the proper error."""
    try:
        return len(_open(path).pages)
    except Exception:  # noqa: BLE001 - an unreadable file is not split; parse_document judges it
        return None


def _open(path: Path) -> PdfReader:
    """A reader of the PDF at ``path``; one encrypted with an empty user password (only an
    owner password: common in filings) is decrypted, as every PDF reader does. Raises
    ``EncryptedDocument`` when a password is needed."""
    from pypdf import PasswordType, PdfReader

    reader = PdfReader(path)
    if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        raise EncryptedDocument(f"{path.name}: the PDF is encrypted and needs a password")
    return reader


def plan(page_count: int, *, part_pages: int, max_parts: int = MAX_PARTS) -> list[PageRange]:
    """Consecutive ranges of ``part_pages`` pages covering ``page_count`` pages (the last one
    shorter); larger ranges when that would make more than ``max_parts`` parts."""
    if page_count < 1 or part_pages < 1 or max_parts < 1:
        raise ValueError("page_count, part_pages and max_parts must be positive")
    size = max(part_pages, -(-page_count // max_parts))
    return [
        PageRange(index=i, first=first, last=min(first + size - 1, page_count))
        for i, first in enumerate(range(1, page_count + 1, size))
    ]


def write_pages(source: Path, target: Path, *, first: int, last: int) -> None:
    """Copy pages ``first``..``last`` (1-based, inclusive) of ``source`` into a new PDF."""
    from pypdf import PdfWriter

    reader = _open(source)
    count = len(reader.pages)
    if not 1 <= first <= last <= count:
        raise CorruptDocument(f"pages {first}-{last} are not in the document: it has {count} "
                              f"page{'s' if count != 1 else ''}")
    writer = PdfWriter()
    for number in range(first - 1, last):
        writer.add_page(reader.pages[number])
    with target.open("wb") as handle:
        writer.write(handle)


def parse_pages(
    path: Path, *, first: int, last: int, filename: str, **parse_options: Any
) -> ParsedDocument:
    """Parse pages ``first``..``last`` of the PDF at ``path`` with
    ``pipelines.parsing.parse_document`` (``parse_options`` are its keyword arguments), page
    numbers as in the whole document. A range with no text is an empty part, not an error
    (figures, blank pages): a document with no text at all fails later, when it has no chunk
    to embed."""
    from pipelines.parsing import parse_document

    handle, name = tempfile.mkstemp(prefix="sluice-part-", suffix=".pdf")
    os.close(handle)
    part = Path(name)
    try:
        try:
            write_pages(path, part, first=first, last=last)
        except (CorruptDocument, EncryptedDocument):
            raise
        except Exception as exc:  # noqa: BLE001 - pypdf's failure on this file, kept as message
            raise CorruptDocument(f"{filename}: pages {first}-{last} cannot be copied out "
                                  f"({type(exc).__name__}: {exc})") from exc
        try:
            parsed = parse_document(part, filename=filename, **parse_options)
        except EmptyDocument:
            return ParsedDocument(elements=[], content_type="application/pdf",
                                  page_count=last - first + 1)
    finally:
        part.unlink(missing_ok=True)
    shift = first - 1
    elements = [
        dataclasses.replace(e, page=e.page + shift) if e.page is not None else e
        for e in parsed.elements
    ]
    return ParsedDocument(elements=elements, content_type=parsed.content_type,
                          page_count=last - first + 1)
