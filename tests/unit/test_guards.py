"""The defences before parsing, on the real hostile samples and on real documents.

A bomb must be refused from what the guards read, not from what they inflate: every refusal
of an archive bomb below inflates nothing, and XML bombs inside Office files are found by
inflating only the parts' prologs.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from pipelines.errors import (
    ArchiveBomb,
    CorruptDocument,
    PipelineError,
    TooLarge,
    TooManyPages,
    TypeMismatch,
    XmlBomb,
)
from pipelines.guards import (
    DEFAULT_LIMITS,
    GuardLimits,
    GuardStats,
    check_file,
    check_pdf_pages,
)
from pipelines.nlp import ensure_tagger
from pipelines.parsing import parse_document

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
HOSTILE = DATA / "hostile"
DOCS = DATA / "docs" / "unstructured"
POI = "office/apache-poi"

# Every hostile sample the guards refuse, with its code. Every other hostile sample passes
# the guards (password-protected, truncated and fuzzed files are the parser's to judge).
REFUSED = {
    "zip/zbsm.zip": "archive_bomb",  # 42 kB, 250 overlapping entries declaring 5.46 GB
    "zip/zipbomb_1G.zip": "archive_bomb",  # 1 MB → 1 GB, ratio 1,030:1
    "xml/defusedxml/xmlbomb.xml": "xml_bomb",  # billion laughs
    "xml/defusedxml/xmlbomb2.xml": "xml_bomb",
    "xml/defusedxml/cyclic.xml": "xml_bomb",
    "xml/defusedxml/quadratic.xml": "xml_bomb",  # quadratic blowup
    "xml/defusedxml/external.xml": "xml_bomb",  # XXE over http
    "xml/defusedxml/external_file.xml": "xml_bomb",  # XXE, file://
    f"{POI}/document/ExternalEntityInText.docx": "xml_bomb",
    f"{POI}/openxml4j/ContentTypeHasEntities.ooxml": "xml_bomb",
    f"{POI}/openxml4j/CorePropertiesHasEntities.ooxml": "xml_bomb",
    f"{POI}/openxml4j/PackageRelsHasEntities.ooxml": "xml_bomb",
    f"{POI}/spreadsheet/54764.xlsx": "xml_bomb",  # billion laughs in sharedStrings.xml
    f"{POI}/spreadsheet/54764-2.xlsx": "xml_bomb",
    f"{POI}/spreadsheet/poc-xmlbomb.xlsx": "xml_bomb",
    f"{POI}/spreadsheet/poc-xmlbomb-empty.xlsx": "xml_bomb",
}


def _hostile_files() -> list[str]:
    return sorted(
        str(p.relative_to(HOSTILE)) for p in HOSTILE.rglob("*")
        if p.is_file() and not p.name.startswith("_")
    )


def _outcome(path: Path, *, limits: GuardLimits = DEFAULT_LIMITS,
             stats: GuardStats | None = None) -> str | None:
    try:
        check_file(path, filename=path.name, limits=limits, stats=stats)
    except PipelineError as exc:
        return exc.code
    return None


@pytest.fixture(scope="module")
def tagger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tagger(DATA / "nlp" / "ud-english-ewt",
                         tmp_path_factory.getbasetemp() / "pos-tagger-cache")


def test_the_hostile_samples_are_all_there() -> None:
    files = _hostile_files()
    assert set(REFUSED) <= set(files)
    assert len(files) >= 40


@pytest.mark.parametrize("name", _hostile_files())
def test_every_hostile_sample_gets_its_expected_guard_outcome(name: str) -> None:
    assert _outcome(HOSTILE / name) == REFUSED.get(name)


@pytest.mark.parametrize("name", ["zip/zbsm.zip", "zip/zipbomb_1G.zip"])
def test_zip_bombs_are_refused_from_the_directory_without_inflating(name: str) -> None:
    path = HOSTILE / name
    stats = GuardStats()
    with pytest.raises(ArchiveBomb, match="zip bomb") as caught:
        check_file(path, filename=path.name, stats=stats)
    assert stats.bytes_inflated == 0
    # The tail (end record + central directory) and the local headers; never the data.
    declared = sum(i.file_size for i in zipfile.ZipFile(path).infolist())
    assert stats.bytes_read < 70_000 < declared
    assert str(path) not in str(caught.value)


def test_overlapping_entries_are_named() -> None:
    with pytest.raises(ArchiveBomb, match="overlap"):
        check_file(HOSTILE / "zip/zbsm.zip", filename="zbsm.zip")


def test_ratio_bomb_message_gives_the_ratio() -> None:
    with pytest.raises(ArchiveBomb, match=r"1,030:1"):
        check_file(HOSTILE / "zip/zipbomb_1G.zip", filename="zipbomb_1G.zip")


@pytest.mark.parametrize(
    "name",
    [f"{POI}/spreadsheet/poc-xmlbomb.xlsx", f"{POI}/spreadsheet/54764.xlsx",
     f"{POI}/document/ExternalEntityInText.docx"],
)
def test_office_xml_bombs_inflate_only_prologs(name: str) -> None:
    path = HOSTILE / name
    stats = GuardStats()
    with pytest.raises(XmlBomb, match="part"):
        check_file(path, filename=path.name, stats=stats)
    declared = sum(i.file_size for i in zipfile.ZipFile(path).infolist())
    assert 0 < stats.bytes_inflated < declared


def test_external_entity_is_called_xxe() -> None:
    with pytest.raises(XmlBomb, match="external entity"):
        check_file(HOSTILE / "xml/defusedxml/external_file.xml", filename="external_file.xml")


REAL_CONTAINERS = sorted(
    p for p in DOCS.rglob("*")
    if p.suffix.lower() in {".docx", ".xlsx", ".pptx", ".epub", ".odt", ".zip"}
)
REAL_MARKUP_AND_IMAGES = sorted(
    p for p in DOCS.rglob("*")
    if p.suffix.lower() in {".xml", ".html", ".htm", ".xsl", ".jpg", ".jpeg", ".png", ".tiff",
                            ".bmp", ".heic"}
    and "_expected_outputs" not in str(p)
)


def test_there_are_real_files_of_every_container_kind() -> None:
    assert {p.suffix for p in REAL_CONTAINERS} == {".docx", ".xlsx", ".pptx", ".epub", ".odt",
                                                   ".zip"}
    assert len(REAL_CONTAINERS) >= 40


@pytest.mark.parametrize("path", REAL_CONTAINERS + REAL_MARKUP_AND_IMAGES,
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_real_documents_pass_the_guards(path: Path) -> None:
    assert _outcome(path) is None


# --- synthetic cases ---------------------------------------------------------------------


def _zip(tmp_path: Path, entries: list[tuple[str, bytes]], name: str = "a.zip") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry_name, data in entries:
            archive.writestr(entry_name, data)
    return path


def test_per_entry_ratio_is_judged_only_above_the_grace_size(tmp_path: Path) -> None:
    small = _zip(tmp_path, [("zeros", bytes(512 * 1024))], "small.zip")  # ~500:1, 512 KiB
    assert _outcome(small) is None
    big = _zip(tmp_path, [("zeros", bytes(4 << 20))], "big.zip")
    stats = GuardStats()
    assert _outcome(big, stats=stats) == "archive_bomb"
    assert stats.bytes_inflated == 0


def test_total_size_and_entry_count_limits(tmp_path: Path) -> None:
    docx = DOCS / "fake.docx"
    assert _outcome(docx, limits=GuardLimits(max_archive_bytes=100_000)) == "archive_bomb"
    assert _outcome(docx, limits=GuardLimits(max_archive_entries=5)) == "archive_bomb"
    assert _outcome(docx) is None


def test_duplicate_entry_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.zip"
    with (pytest.warns(UserWarning, match="Duplicate name"),
          zipfile.ZipFile(path, "w") as archive):
        archive.writestr("word/document.xml", b"<a/>")
        archive.writestr("word/document.xml", b"<b/>")
    with pytest.raises(ArchiveBomb, match="more than once"):
        check_file(path, filename="dup.docx")


def test_entity_declaration_in_any_part_of_a_zip_is_found(tmp_path: Path) -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><r>&a;</r>'
    path = _zip(tmp_path, [("mimetype", b"application/epub+zip"),
                           ("OEBPS/chapter.bin", bomb)], "book.epub")
    with pytest.raises(XmlBomb, match="chapter.bin"):
        check_file(path, filename="book.epub")


def test_doctype_without_entities_is_fine(tmp_path: Path) -> None:
    xhtml = (b'<?xml version="1.0"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.1//EN" '
             b'"http://www.w3.org/TR/xhtml11/DTD/xhtml11.dtd">\n<html><body>Hi</body></html>')
    path = tmp_path / "page.xhtml"
    path.write_bytes(xhtml)
    assert _outcome(path) is None


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_entity_declarations_are_found_in_utf16(tmp_path: Path, encoding: str) -> None:
    text = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r [<!ENTITY a "x">]><r>&a;</r>'
    path = tmp_path / "bomb.xml"
    path.write_bytes(text.encode(encoding))
    assert _outcome(path) == "xml_bomb"


def test_html_that_expat_cannot_read_is_scanned_for_entities(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_bytes(b'<!doctype html [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;">]>\n'
                     b"<html><body><p>&b;<br></body></html>")
    assert _outcome(path) == "xml_bomb"
    path.write_bytes(b"<!doctype html>\n<html><body><p>Hello<br>there</body></html>")
    assert _outcome(path) is None


def test_an_endless_prolog_is_refused_without_reading_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "long.xml"
    path.write_bytes(b"<?xml version='1.0'?><!-- " + b"x" * (4 << 20) + b" --><r/>")
    stats = GuardStats()
    assert _outcome(path, stats=stats) == "xml_bomb"
    assert stats.bytes_read < 2 << 20


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_image_decompression_bomb_is_too_large_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(100_000, 100_000))  # 10 billion pixels in 80 bytes
    stats = GuardStats()
    with pytest.raises(TooLarge, match="pixels"):
        check_file(path, filename="bomb.png", stats=stats)
    assert stats.bytes_read <= 2 * path.stat().st_size + 8192
    path.write_bytes(_png(20_000, 20_000))  # 400 M pixels: under Pillow's own bomb error
    assert _outcome(path, limits=GuardLimits(max_image_pixels=10_000_000)) == "too_large"
    path.write_bytes(_png(2_000, 1_000))
    assert _outcome(path) is None


def test_file_size_limit(tmp_path: Path) -> None:
    assert _outcome(DOCS / "fake.docx", limits=GuardLimits(max_file_bytes=1000)) == "too_large"


def test_pdf_page_limit() -> None:
    check_pdf_pages(2000, filename="a.pdf", limits=GuardLimits(max_pdf_pages=2000))
    check_pdf_pages(None, filename="a.pdf", limits=GuardLimits(max_pdf_pages=1))
    with pytest.raises(TooManyPages, match="2,001 pages"):
        check_pdf_pages(2001, filename="a.pdf", limits=GuardLimits(max_pdf_pages=2000))


# --- through parse_document --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["zip/zipbomb_1G.zip", "xml/defusedxml/xmlbomb.xml",
             f"{POI}/spreadsheet/poc-xmlbomb.xlsx", f"{POI}/document/ExternalEntityInText.docx"]
)
def test_parse_document_refuses_bombs_before_parsing(tagger_path: Path, name: str) -> None:
    path = HOSTILE / name
    with pytest.raises(PipelineError) as caught:
        parse_document(path, filename=path.name, tagger_path=tagger_path)
    assert caught.value.code == REFUSED[name]


def test_parse_document_page_limit(tagger_path: Path) -> None:
    pdf = DOCS / "pdf" / "layout-parser-paper-fast.pdf"
    with pytest.raises(TooManyPages, match="2 pages"):
        parse_document(pdf, filename=pdf.name, tagger_path=tagger_path,
                       guard_limits=GuardLimits(max_pdf_pages=1))
    assert parse_document(pdf, filename=pdf.name, tagger_path=tagger_path,
                          guard_limits=GuardLimits(max_pdf_pages=2)).page_count == 2


@pytest.mark.parametrize(
    ("source", "name", "match"),
    [
        ("example-10k-1p.html", "report.pdf", "not a PDF"),  # an HTML page saved as .pdf
        ("fake.docx", "report.pdf", "they are docx"),
        ("fake-text.txt", "report.pdf", "no %PDF- header"),
        ("simple.zip", "report.docx", "the bytes are zip"),
        ("img/example.jpg", "scan.pdf", "jpg"),
        ("img/DA-1p.png", "notes.txt", "png"),
    ],
)
def test_type_mismatch(tagger_path: Path, tmp_path: Path, source: str, name: str,
                       match: str) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes((DOCS / source).read_bytes())
    with pytest.raises(TypeMismatch, match=match) as caught:
        parse_document(blob, filename=name, tagger_path=tagger_path)
    assert caught.value.code == "type_mismatch"


@pytest.mark.parametrize(
    ("source", "name"),
    [("fake.docx", "notes.txt"), ("fake-power-point.pptx", "slides.docx"),
     ("stanley-cups.csv", "cups.xlsx"), ("fake-text.txt", "notes.md")],
)
def test_a_document_under_another_documents_name_is_parsed(
    tagger_path: Path, tmp_path: Path, source: str, name: str
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes((DOCS / source).read_bytes())
    assert parse_document(blob, filename=name, tagger_path=tagger_path).elements


def test_a_broken_zip_named_as_a_spreadsheet_is_corrupt_not_a_mismatch(
    tagger_path: Path,
) -> None:
    fuzzed = "clusterfuzz-testcase-minimized-XLSX2CSVFuzzer-5636439151607808.xlsx"
    path = HOSTILE / POI / "spreadsheet" / fuzzed
    with pytest.raises(CorruptDocument, match="damaged"):
        parse_document(path, filename="sheet.xlsx", tagger_path=tagger_path)


def test_guard_stats_count_reads() -> None:
    stats = GuardStats()
    check_file(DOCS / "fake.docx", filename="fake.docx", stats=stats)
    assert stats.bytes_read > 0
    assert stats.bytes_inflated > 0
