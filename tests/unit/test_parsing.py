"""parse_document on real files: every supported format, and every failure with its code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.errors import (
    CorruptDocument,
    EmptyDocument,
    EncryptedDocument,
    PermanentError,
    UnsupportedType,
)
from pipelines.nlp import ensure_tagger
from pipelines.nlp.agreement import compare, labelled, load_expected
from pipelines.parsing import parse_document
from pipelines.types import ParsedDocument

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
DOCS = DATA / "docs" / "unstructured"
ENCRYPTION = DATA / "docs" / "pypdf-resources" / "encryption"
EXPECTED = DOCS / "_expected_outputs_and_failed_docs" / "expected-structured-output"


@pytest.fixture(scope="session")
def tagger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained once per test session (the cache is shared with test_nlp.py)."""
    cache = tmp_path_factory.getbasetemp() / "pos-tagger-cache"
    return ensure_tagger(DATA / "nlp" / "ud-english-ewt", cache)


def parse(path: Path, tagger_path: Path | None, *, pdf_strategy: str = "fast") -> ParsedDocument:
    return parse_document(
        path, filename=path.name, tagger_path=tagger_path, pdf_strategy=pdf_strategy
    )


DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
# file, MIME type we sniff, categories that must appear, a phrase that must appear
FORMATS = [
    ("pdf/layout-parser-paper-fast.pdf", "application/pdf", {"Title", "NarrativeText"}, "Layout"),
    ("fake.docx", DOCX, set(), "Lorem ipsum"),
    ("example-10k-1p.html", "text/html", {"Table", "NarrativeText"}, "Galaxy Gaming"),
    ("fake-email.eml", "message/rfc822", {"NarrativeText"}, "This is a test email"),
    ("fake-email.msg", "application/vnd.ms-outlook", {"NarrativeText"}, "This is a test email"),
    ("fake-power-point.pptx", PPTX, {"Title", "ListItem"}, "Adding a Bullet Slide"),
    ("stanley-cups.xlsx", XLSX, {"Table"}, "Stanley Cups"),
    ("tests-example.xls", "application/vnd.ms-excel", {"Table"}, "What is 2+2?"),
    ("stanley-cups.csv", "text/csv", {"Table"}, "Maple Leafs"),
    ("stanley-cups.tsv", "text/tsv", {"Table"}, "Maple Leafs"),
    ("README.md", "text/markdown", {"Title", "NarrativeText", "ListItem"}, "Example Docs"),
    ("README.org", "text/org", {"Title", "NarrativeText", "ListItem"}, "Example Docs"),
    ("README.rst", "text/x-rst", {"Title", "NarrativeText", "ListItem"}, "Example Docs"),
    ("fake-text.txt", "text/plain", {"Title", "NarrativeText", "ListItem"}, "a test document"),
    ("factbook.xml", "application/xml", set(), "United States"),
    ("winter-sports.epub", "application/epub", {"Title", "NarrativeText"}, "Winter Sports"),
    ("fake.odt", "application/vnd.oasis.opendocument.text", {"Table"}, "Lorem ipsum"),
    ("fake-doc.rtf", "text/rtf", {"Title", "Table"}, "My First Heading"),
]
KNOWN_CATEGORIES = {
    "Title", "NarrativeText", "ListItem", "UncategorizedText", "Table", "Address", "EmailAddress",
    "Header", "Footer", "CodeSnippet", "FigureCaption", "Formula", "Image", "PageNumber",
}


@pytest.mark.parametrize(
    ("name", "mime", "categories", "phrase"), FORMATS, ids=[f[0] for f in FORMATS]
)
def test_supported_formats_parse_to_text(
    tagger_path: Path, name: str, mime: str, categories: set[str], phrase: str
) -> None:
    doc = parse(DOCS / name, tagger_path)
    assert doc.content_type == mime
    assert doc.elements and all(e.text.strip() for e in doc.elements)
    found = {e.category for e in doc.elements}
    assert categories <= found <= KNOWN_CATEGORIES
    assert any(phrase in e.text for e in doc.elements)
    assert all(e.metadata["element_id"] for e in doc.elements)


def test_pdf_elements_carry_page_numbers(tagger_path: Path) -> None:
    doc = parse(DOCS / "pdf" / "layout-parser-paper-fast.pdf", tagger_path)
    assert doc.page_count == 2
    assert {e.page for e in doc.elements} == {1, 2}
    title = next(e for e in doc.elements if e.category == "Title" and "LayoutParser" in e.text)
    assert title.page == 1


def test_metadata_keeps_structure(tagger_path: Path) -> None:
    sheet = parse(DOCS / "stanley-cups.xlsx", tagger_path)
    table = next(e for e in sheet.elements if e.category == "Table")
    assert table.metadata["text_as_html"].startswith("<table")
    assert table.metadata["page_name"] == "Stanley Cups"
    assert sheet.page_count == 2
    readme = parse(DOCS / "README.md", tagger_path)
    item = next(e for e in readme.elements if e.category == "ListItem")
    assert item.metadata["section"] == "Example Docs"  # the nearest heading above it


def test_type_is_sniffed_from_bytes_not_from_the_blob_path(
    tagger_path: Path, tmp_path: Path
) -> None:
    blob = tmp_path / "3f2a9c"  # the blob store names files by hash, without an extension
    shutil.copy(DOCS / "README.md", blob)
    doc = parse_document(blob, filename="README.md", tagger_path=tagger_path)
    assert doc.content_type == "text/markdown"
    shutil.copy(DOCS / "fake.docx", blob)
    doc = parse_document(
        blob, filename="notes.txt", content_type="text/plain", tagger_path=tagger_path
    )
    assert doc.content_type == DOCX


@pytest.mark.parametrize(
    "name",
    [
        "r2-user-password.pdf",
        "r3-user-password.pdf",
        "r4-user-password.pdf",
        "r4-aes-user-password.pdf",
        "r6-both-passwords.pdf",
    ],
)
def test_pdf_needing_a_user_password_is_encrypted_document(tagger_path: Path, name: str) -> None:
    with pytest.raises(EncryptedDocument) as caught:
        parse(ENCRYPTION / name, tagger_path)
    assert caught.value.code == "encrypted_document"


def test_pdf_with_only_an_owner_password_parses(tagger_path: Path) -> None:
    assert parse(ENCRYPTION / "r4-owner-password.pdf", tagger_path).elements


@pytest.mark.parametrize(
    "name", ["password_protected.xlsx", "fake-encrypted.msg", "eml/fake-encrypted.eml"]
)
def test_encrypted_office_and_mail_are_encrypted_document(tagger_path: Path, name: str) -> None:
    with pytest.raises(EncryptedDocument):
        parse(DOCS / name, tagger_path)


@pytest.mark.parametrize(
    "name", ["empty.txt", "fake-text-all-whitespace.txt", "empty.xlsx", "eml/empty.eml"]
)
def test_files_without_text_are_empty_document(tagger_path: Path, name: str) -> None:
    with pytest.raises(EmptyDocument) as caught:
        parse(DOCS / name, tagger_path)
    assert caught.value.code == "empty_document"


@pytest.mark.parametrize(
    "name",
    ["img/example.jpg", "img/DA-1p.png", "CantinaBand3.wav", "simple.zip", "simple.json",
     "fake.doc"],
)
def test_unsupported_formats_are_unsupported_type(tagger_path: Path, name: str) -> None:
    with pytest.raises(UnsupportedType) as caught:
        parse(DOCS / name, tagger_path)
    assert caught.value.code == "unsupported_type"


@pytest.mark.parametrize(
    ("name", "keep"),
    [("fake.docx", 0.5), ("fake-power-point.pptx", 0.1), ("pdf/layout-parser-paper-fast.pdf", 0.2)],
)
def test_truncated_files_are_corrupt_document(
    tagger_path: Path, tmp_path: Path, name: str, keep: float
) -> None:
    data = (DOCS / name).read_bytes()
    truncated = tmp_path / "blob"
    truncated.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptDocument) as caught:
        parse_document(truncated, filename=Path(name).name, tagger_path=tagger_path)
    assert caught.value.code == "corrupt_document"
    assert Path(name).name in str(caught.value)
    assert str(truncated) not in str(caught.value)  # no storage paths in user-facing errors


def test_unexpected_library_errors_get_a_code_but_memory_errors_propagate(
    tagger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import unstructured.partition.auto

    def explode(**_: object) -> None:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(unstructured.partition.auto, "partition", explode)
    with pytest.raises(CorruptDocument, match="RuntimeError: parser bug") as caught:
        parse(DOCS / "fake-text.txt", tagger_path)
    assert isinstance(caught.value, PermanentError)

    def exhaust(**_: object) -> None:
        raise MemoryError

    monkeypatch.setattr(unstructured.partition.auto, "partition", exhaust)
    with pytest.raises(MemoryError):
        parse(DOCS / "fake-text.txt", tagger_path)


def test_unknown_pdf_strategy_is_a_caller_error(tagger_path: Path) -> None:
    with pytest.raises(ValueError, match="pdf_strategy"):
        parse(DOCS / "fake-text.txt", tagger_path, pdf_strategy="magic")


@pytest.mark.parametrize(
    ("expected", "source"),
    [
        ("local-single-file-basic-chunking/handbook-1p.docx.json", "handbook-1p.docx"),
        ("local-single-file-with-encoding/fake-html-cp1252.html.json", "fake-html-cp1252.html"),
    ],
)
def test_categories_agree_with_unstructured_expected_output(
    tagger_path: Path, expected: str, source: str
) -> None:
    doc = parse(DOCS / source, tagger_path)
    agreement = compare(load_expected(EXPECTED / expected), labelled(doc.elements))
    assert agreement.text_matched == agreement.expected
    assert agreement.category_agreement == 1.0


def test_fallback_tagger_still_parses_and_never_returns_empty_success(tagger_path: Path) -> None:
    try:
        doc = parse(DOCS / "pdf" / "layout-parser-paper-fast.pdf", None)
        assert doc.elements and {e.page for e in doc.elements} == {1, 2}
        with pytest.raises(EmptyDocument):
            parse(DOCS / "fake-text-all-whitespace.txt", None)
    finally:
        parse(DOCS / "fake-text.txt", tagger_path)  # leave the trained tagger installed


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # an image attachment (no "fast" strategy for images) or an audio one (no whisper)
        ("eml/email-with-image.eml", None),
        ("eml/fake-email-image-embedded.eml", None),
        ("eml/mime-attach-mp3.eml", None),
        # a digest: the text lives in nested message/rfc822 parts
        ("eml/mime-multipart-digest.eml", "This is the third message in the digest."),
        # UTF-16 with a byte-order mark, and a CSV whose rows are of uneven width
        ("stanley-cups-utf-16.csv", "Stanley Cups"),
        ("single-column.csv", None),
    ],
)
def test_awkward_but_valid_files_keep_their_text(
    tagger_path: Path, name: str, expected: str | None,
) -> None:
    parsed = parse(DOCS / name, tagger_path)
    text = "\n".join(e.text for e in parsed.elements)
    assert text.strip()
    assert "\x00" not in text
    if expected is not None:
        assert expected in text


def test_pdf_pages_the_partitioner_drops_are_read_with_pypdf(tagger_path: Path) -> None:
    """pdfminer gives up on this file's pages without an error reaching us: without the
    second reading, 76 pages of text came back as an empty (or, split in parts, a partial)
    document."""
    parsed = parse(DOCS / "pdf" / "failure-after-repair.pdf", tagger_path)
    pages = {e.page for e in parsed.elements}
    assert pages == set(range(1, 77))
    assert "Understanding Breast Cancer" in " ".join(e.text for e in parsed.elements[:5])
