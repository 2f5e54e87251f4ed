"""Parse one document into structural elements with unstructured, offline.

The type is sniffed from the bytes (libmagic, then the file name's extension), never taken from
the client's word. Before any parser sees the file, ``pipelines.guards`` refuses zip bombs, XML
entity declarations, oversized images and files over the size limit; PDFs over the page limit
are refused from pypdf's page count. After parsing, ``pipelines.hygiene`` refuses text that is
mostly garbage. Failures become ``PermanentError`` subclasses with stable codes (the full table
is in ``pipelines.errors``):

====================== =======================================================================
``unsupported_type``   a format we do not partition (images, audio, zip, JSON, .doc/.ppt, unknown)
``type_mismatch``      named ``.pdf`` but not a PDF; named as a document we parse, but the bytes
                       are an archive, image or media file
``empty_document``     an empty file, or a non-empty one that yields no text
``corrupt_document``   the library fails on the file (any unexpected exception, message kept)
``encrypted_document`` a password-protected PDF, Office file or e-mail
``too_large``          over the file size limit, or an image over the pixel limit
``too_many_pages``     a PDF over the page limit
``archive_bomb``       a zip container refused from its central directory
``xml_bomb``           XML (or an XML part of an Office file) that declares entities
``garbage_text``       the extracted text is mostly not text, or a "text" file in no encoding
====================== =======================================================================

``timeout`` and ``memory_limit`` come from running this in ``pipelines.sandbox``.
``MemoryError`` (and ``BaseException``s such as ``KeyboardInterrupt``) propagate unwrapped;
so does an ``OSError`` from reading ``path`` itself, which is the blob store's fault, not the
document's.
"""

from __future__ import annotations

import email.parser
import email.policy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from pipelines import guards, hygiene, nlp
from pipelines.errors import (
    CorruptDocument,
    EmptyDocument,
    EncryptedDocument,
    GarbageText,
    PermanentError,
    PipelineError,
    TypeMismatch,
    UnsupportedType,
)
from pipelines.types import Element, ParsedDocument

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from unstructured.documents.elements import Element as UnstructuredElement
    from unstructured.file_utils.model import FileType

PDF_STRATEGIES: Final = frozenset({"fast", "ocr_only", "hi_res", "auto"})

# FileType member names we partition. .doc/.ppt need LibreOffice (`soffice`), which the
# images do not carry (see docs/parsing.md); images and audio need models from the hub.
SUPPORTED_TYPES: Final = frozenset(
    {
        "TXT", "MD", "HTML", "XML", "EML", "MSG", "DOCX", "PPTX", "XLSX", "XLS", "CSV", "TSV",
        "PDF", "EPUB", "ODT", "RTF", "ORG", "RST",
    }
)
_NEEDS_LIBREOFFICE: Final = frozenset({"DOC", "PPT"})
# Recognised formats that are never a document under another name: a supported extension on
# one of these is a type mismatch, not merely an unsupported type.
_NOT_DOCUMENTS: Final = frozenset(
    {
        "ZIP", "BMP", "JPG", "PNG", "TIFF", "HEIC", "WEBP", "FLAC", "M4A", "MP3", "OGG",
        "OPUS", "WAV", "WEBM",
    }
)
_ZIP_DOCUMENTS: Final = frozenset({"DOCX", "PPTX", "XLSX", "EPUB", "ODT"})
_PDF_HEADER_WINDOW: Final = 1024  # readers accept "%PDF-" anywhere in the first 1 kB
# Raised by pdfminer / pypdf / msoffcrypto when a password is needed.
_ENCRYPTION_ERRORS: Final = frozenset(
    {"PDFPasswordIncorrect", "PDFEncryptionError", "FileEncryptedError"}
)
MAX_DETAIL_CHARS: Final = 1000

# Element metadata worth keeping downstream; the rest (coordinates, file paths, detection
# internals) is noise or not JSON-friendly.
KEPT_METADATA: Final = (
    "parent_id",
    "category_depth",
    "text_as_html",
    "languages",
    "page_name",
    "link_urls",
    "header_footer_type",
    "sent_from",
    "sent_to",
    "subject",
    "attached_to_filename",
)


def parse_document(
    path: Path,
    *,
    filename: str,
    content_type: str | None = None,
    pdf_strategy: str = "fast",
    languages: Sequence[str] | None = None,
    tagger_path: Path | None = None,
    guard_limits: guards.GuardLimits = guards.DEFAULT_LIMITS,
    hygiene_limits: hygiene.HygieneLimits = hygiene.DEFAULT_LIMITS,
) -> ParsedDocument:
    """Partition the file at ``path`` into elements.

    ``filename`` is the client's name for it: its extension helps tell apart formats that
    share a MIME type (Markdown, CSV, RST are all ``text/plain`` to libmagic). ``content_type``
    (the client's claim) is only used when sniffing finds nothing. ``languages`` are ISO 639-3
    codes passed to unstructured; ``None`` lets it decide. ``tagger_path`` is the weights file
    of the part-of-speech tagger (``pipelines.nlp.ensure_tagger``); ``None`` uses the rule-based
    fallback, which classifies elements less well (see docs/parsing.md). ``guard_limits`` and
    ``hygiene_limits`` are the limits of ``pipelines.guards`` and ``pipelines.hygiene``.
    """
    if pdf_strategy not in PDF_STRATEGIES:
        raise ValueError(f"pdf_strategy must be one of {sorted(PDF_STRATEGIES)}: {pdf_strategy!r}")
    if path.stat().st_size == 0:
        raise EmptyDocument(f"{filename}: the file is empty")
    with path.open("rb") as handle:
        try:
            guards.check_file(path, filename=filename, limits=guard_limits)
            nlp.install(tagger_path)
            parsed = _parse(
                handle,
                filename=filename,
                content_type=content_type,
                pdf_strategy=pdf_strategy,
                languages=languages,
                guard_limits=guard_limits,
            )
            hygiene.check_text(parsed.elements, filename=filename, limits=hygiene_limits)
            return parsed
        except (PipelineError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - every library failure gets a stable code
            raise _classify_failure(exc, filename=filename, path=path) from exc


def warm_up(tagger_path: Path | None) -> None:
    """Install the tagger, import unstructured's partitioners and load what they load lazily
    (language profiles: ~0.7 s) — several seconds, once per process; then a dictionary lookup.
    Optional in-process (the first ``parse_document`` does the same lazily); needed before
    forking one sandboxed child per document, or every child pays it again. Call it after the
    worker's own fork, never at import."""
    global _warmed
    nlp.install(tagger_path)
    if _warmed:
        return
    import io

    import unstructured.partition.pdf  # noqa: F401
    from unstructured.partition.auto import partition

    partition(file=io.BytesIO(_WARM_UP_TEXT), content_type="text/plain")
    _warmed = True


_warmed = False
_WARM_UP_TEXT: Final = b"Warm-up\n\nThis short paragraph loads the language profiles once."


def _parse(
    handle: IO[bytes],
    *,
    filename: str,
    content_type: str | None,
    pdf_strategy: str,
    languages: Sequence[str] | None,
    guard_limits: guards.GuardLimits,
) -> ParsedDocument:
    from unstructured.partition.auto import partition

    file_type = _sniff_type(handle, filename=filename, content_type=content_type)
    _refuse_mismatch(handle, file_type, filename=filename, content_type=content_type)
    if file_type.name in _TRANSCODED_TEXT:
        handle = _wide_text_as_utf8(handle) or handle
    _refuse_encrypted(handle, file_type, filename)
    _refuse_unsupported(file_type, filename)
    pdf = _probe_pdf(handle) if file_type.name == "PDF" else None
    if pdf is not None and pdf.needs_password:
        raise EncryptedDocument(f"{filename}: the PDF is encrypted and needs a password")
    if pdf is not None:
        guards.check_pdf_pages(pdf.page_count, filename=filename, limits=guard_limits)
    handle.seek(0)
    options: dict[str, Any] = {
        "file": handle,
        "metadata_filename": filename,
        "content_type": file_type.mime_type,
        "strategy": pdf_strategy,
        "languages": list(languages) if languages is not None else None,
    }
    try:
        raw = partition(**options)
    except (PipelineError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a second, plainer reading where one exists
        lenient = _LENIENT_RETRY.get(file_type.name)
        if lenient is None:
            raise
        log.warning("%s: %s: %s; parsing it again %s", filename, type(exc).__name__,
                    str(exc)[:200], lenient.reason)
        handle.seek(0)
        raw = partition(**{**options, **lenient.options})
    elements = convert_elements(raw)
    if pdf is not None and pdf.page_count:
        elements = _with_lost_pages(handle, elements, page_count=pdf.page_count,
                                    filename=filename)
    if not elements and file_type.name == "EML":
        elements = _digest_messages(handle, partition=partition, options=options)
    if not elements:
        # partition_pdf logs and swallows pdfminer's errors, so a broken PDF comes back empty.
        if pdf is not None and pdf.error is not None:
            raise CorruptDocument(f"{filename}: the PDF cannot be read ({pdf.error})")
        raise EmptyDocument(_no_text_message(filename, file_type.name))
    page_count = pdf.page_count if pdf is not None else None
    if page_count is None:
        pages = [e.page for e in elements if e.page is not None]
        page_count = max(pages) if pages else None
    return ParsedDocument(
        elements=elements, content_type=file_type.mime_type, page_count=page_count
    )


def _sniff_type(handle: IO[bytes], *, filename: str, content_type: str | None) -> FileType:
    from unstructured.file_utils.filetype import detect_filetype
    from unstructured.file_utils.model import FileType

    handle.seek(0)
    file_type = detect_filetype(file=handle, metadata_file_path=filename)
    if file_type is FileType.UNK and content_type:
        claimed = FileType.from_mime_type(content_type.split(";")[0].strip().lower())
        file_type = claimed or FileType.UNK
    if file_type is FileType.EMPTY:
        raise EmptyDocument(f"{filename}: the file holds no content")
    return file_type


def _refuse_mismatch(
    handle: IO[bytes], file_type: FileType, *, filename: str, content_type: str | None
) -> None:
    """``TypeMismatch`` only where the bytes cannot be what the name says *and* parsing them as
    what they are would mislead or fail: a ``.pdf`` that is not a PDF (an HTML error page
    saved as ``report.pdf`` would otherwise be indexed as the report), or a document name on
    an archive, image or media file. A document under another document's name (a ``.docx``
    named ``notes.txt``, a ``.pptx`` named ``.docx``) is parsed as what its bytes are."""
    from unstructured.file_utils.model import FileType

    claimed = FileType.from_extension(Path(filename).suffix.lower() or None)
    if claimed is None and content_type:
        claimed = FileType.from_mime_type(content_type.split(";")[0].strip().lower())
    if claimed is None or claimed.name not in SUPPORTED_TYPES:
        return
    if claimed.name == "PDF" and (file_type.name != "PDF" or not _has_pdf_header(handle)):
        actual = "" if file_type.name in ("PDF", "UNK") else f"; they are {_describe(file_type)}"
        raise TypeMismatch(
            f"{filename}: named as a PDF, but the bytes are not a PDF (no %PDF- header{actual})"
        )
    if file_type.name == "ZIP" and claimed.name in _ZIP_DOCUMENTS and not _is_zipfile(handle):
        raise CorruptDocument(f"{filename}: the {claimed.name.lower()} file is damaged (its zip "
                              "directory is missing or broken: truncated?)")
    if file_type.name in _NOT_DOCUMENTS and file_type is not claimed:
        raise TypeMismatch(f"{filename}: named as {claimed.name.lower()}, but the bytes are "
                           f"{_describe(file_type)}")


@dataclass(frozen=True)
class _Lenient:
    options: dict[str, Any]
    reason: str


# Formats with a plainer second reading when unstructured's full one raises: an e-mail whose
# attachment cannot be partitioned (an image under the "fast" strategy, audio, a nested digest)
# keeps its body; a ragged CSV (rows of uneven width, which pandas refuses) keeps its text.
_LENIENT_RETRY: Final = {
    "EML": _Lenient({"process_attachments": False}, "without its attachments"),
    "CSV": _Lenient({"content_type": "text/plain"}, "as plain text"),
    "TSV": _Lenient({"content_type": "text/plain"}, "as plain text"),
}

# Text formats unstructured reads as UTF-8 or 8-bit only: UTF-16/32 ones are transcoded first.
_TRANSCODED_TEXT: Final = frozenset({"EML", "CSV", "TSV", "TXT", "MD", "RST", "ORG"})


def _wide_text_as_utf8(handle: IO[bytes]) -> IO[bytes] | None:
    """A UTF-16 text file (with a byte-order mark, or ASCII-headed like an e-mail's RFC 5322
    headers, so every other byte of its head is zero), or a UTF-32 one with its mark,
    re-encoded as UTF-8; None for any other.
    unstructured reads the UTF-16 bytes as 8-bit text, a NUL between every two letters
    (garbage that ``pipelines.hygiene`` would refuse), or fails to decode them at all."""
    import io

    handle.seek(0)
    head = handle.read(64)
    handle.seek(0)
    encoding = None
    if head[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        encoding = "utf-32"  # (its little-endian mark starts like UTF-16's)
    elif head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding = "utf-16"
    elif len(head) >= 16 and not any(head[1::2]) and all(head[0::2]):
        encoding = "utf-16-le"
    elif len(head) >= 16 and not any(head[0::2]) and all(head[1::2]):
        encoding = "utf-16-be"
    if encoding is None:
        return None
    try:
        text = handle.read().decode(encoding)
    except UnicodeDecodeError:
        return None
    finally:
        handle.seek(0)
    return io.BytesIO(text.encode("utf-8"))


def _is_zipfile(handle: IO[bytes]) -> bool:
    import zipfile

    try:
        return zipfile.is_zipfile(handle)
    finally:
        handle.seek(0)


def _has_pdf_header(handle: IO[bytes]) -> bool:
    handle.seek(0)
    try:
        return b"%PDF-" in handle.read(_PDF_HEADER_WINDOW)
    finally:
        handle.seek(0)


def _describe(file_type: FileType) -> str:
    return f"{file_type.name.lower()} ({file_type.mime_type})"


def _refuse_unsupported(file_type: FileType, filename: str) -> None:
    if file_type.name in SUPPORTED_TYPES:
        return
    if file_type.name in _NEEDS_LIBREOFFICE:
        reason = "legacy binary Office formats (.doc, .ppt) are not supported: use .docx/.pptx"
    elif file_type.name == "UNK":
        reason = "the file type could not be recognised"
    else:
        reason = f"{file_type.name.lower()} files ({file_type.mime_type}) are not supported"
    raise UnsupportedType(f"{filename}: {reason}")


def _refuse_encrypted(handle: IO[bytes], file_type: FileType, filename: str) -> None:
    """Raise ``EncryptedDocument`` for files that need a password to read."""
    handle.seek(0)
    if _is_ole(handle) and _office_encrypted(handle):
        raise EncryptedDocument(f"{filename}: the Office file is password-protected")
    checks = {"EML": _eml_encrypted, "MSG": _msg_encrypted}
    check = checks.get(file_type.name)
    handle.seek(0)
    if check is not None and check(handle):
        raise EncryptedDocument(f"{filename}: the message is encrypted")


def _is_ole(handle: IO[bytes]) -> bool:
    import olefile

    is_ole = bool(olefile.isOleFile(handle))
    handle.seek(0)
    return is_ole


def _office_encrypted(handle: IO[bytes]) -> bool:
    """Encrypted OOXML (an OLE wrapper around an EncryptedPackage) or legacy Office."""
    import msoffcrypto

    try:
        return bool(msoffcrypto.OfficeFile(handle).is_encrypted())
    except Exception:  # noqa: BLE001 - not a container msoffcrypto knows: the partitioner judges
        return False
    finally:
        handle.seek(0)


@dataclass(frozen=True, slots=True)
class _PdfProbe:
    page_count: int | None
    needs_password: bool
    error: str | None  # why pypdf could not read the file, if it could not


def _probe_pdf(handle: IO[bytes]) -> _PdfProbe:
    """Page count, and whether a user password is needed (an owner password alone does not
    stop reading), from pypdf; a file pypdf cannot read is left to the partitioner to judge."""
    from pypdf import PasswordType, PdfReader

    handle.seek(0)
    try:
        reader = PdfReader(handle)
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            return _PdfProbe(page_count=None, needs_password=True, error=None)
        return _PdfProbe(page_count=len(reader.pages), needs_password=False, error=None)
    except Exception as exc:  # noqa: BLE001 - recorded; decisive only if nothing is extracted
        error = f"{type(exc).__name__}: {exc}"
        return _PdfProbe(page_count=None, needs_password=False, error=error)


def _with_lost_pages(handle: IO[bytes], elements: list[Element], *, page_count: int,
                     filename: str) -> list[Element]:
    """``elements`` plus the text pypdf reads from pages that produced no element.

    pdfminer (under unstructured) gives up on some pages without a word, and unstructured
    swallows its error: pages of text vanish from a document that "succeeds". A page with no
    element is read again with pypdf; one with text there becomes one element of its own
    (``metadata["extracted_by"] = "pypdf"``), in page order. Pages without text in either
    (figures, blanks, scans) stay empty."""
    from pypdf import PdfReader

    missing = set(range(1, page_count + 1)) - {e.page for e in elements if e.page is not None}
    if not missing:
        return elements
    handle.seek(0)
    try:
        reader = PdfReader(handle)
    except Exception:  # noqa: BLE001 - it was read once already; nothing more to recover
        return elements
    recovered = []
    for page in sorted(missing):
        try:
            text = " ".join((reader.pages[page - 1].extract_text() or "").split())
        except Exception:  # noqa: BLE001 - this page stays empty; the others still count
            continue
        if text:
            recovered.append(Element(text=text, category="NarrativeText", page=page,
                                     metadata={"section": None, "extracted_by": "pypdf"}))
    if not recovered:
        return elements
    log.warning("%s: %d page(s) had no text from the partitioner; read with pypdf instead",
                filename, len(recovered))
    return sorted([*elements, *recovered], key=lambda e: e.page or 0)


def _digest_messages(handle: IO[bytes], *, partition: Any, options: dict[str, Any]
                     ) -> list[Element]:
    """The elements of the messages a digest (multipart/digest, or any message/rfc822 parts)
    carries, each partitioned as an e-mail of its own: unstructured finds no body in such a
    message and returns nothing."""
    import io

    handle.seek(0)
    message = email.parser.BytesParser(policy=email.policy.default).parse(handle)
    elements: list[Element] = []
    for part in message.walk():
        if part.get_content_type() != "message/rfc822":
            continue
        for inner in part.iter_parts():
            raw = partition(**{**options, "file": io.BytesIO(inner.as_bytes()),
                               "process_attachments": False})
            elements.extend(convert_elements(raw))
    return elements


def _eml_encrypted(handle: IO[bytes]) -> bool:
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parse(handle)
    return _encrypted_mime(str(headers.get("Content-Type", "")))


def _msg_encrypted(handle: IO[bytes]) -> bool:
    from oxmsg import Message

    try:
        message = Message.load(handle)
    except Exception:  # noqa: BLE001 - a broken MSG is for the partitioner to judge
        return False
    message_class = (message.message_class or "").upper()
    if message_class.startswith("IPM.NOTE.SMIME") and "MULTIPARTSIGNED" not in message_class:
        return True
    return _encrypted_mime(message.message_headers.get("Content-Type", "") or "")


def _encrypted_mime(content_type: str) -> bool:
    value = content_type.lower()
    return value.startswith("multipart/encrypted") or (
        "pkcs7-mime" in value and "signed-data" not in value
    )


def convert_elements(raw: Iterable[UnstructuredElement]) -> list[Element]:
    """unstructured elements → ours, dropping those without text and adding ``section``.

    ``section`` is the text of the nearest Title above the element: its ancestor through
    ``parent_id`` when unstructured built a hierarchy, else the last Title seen.
    """
    elements: list[Element] = []
    titles: dict[str, str] = {}
    last_title: str | None = None
    for item in raw:
        text = (item.text or "").strip()
        meta = item.metadata.to_dict()
        if item.category == "Title" and text:
            titles[str(item.id)] = text
            last_title = text
        if not text:
            continue
        kept: dict[str, Any] = {
            key: meta[key] for key in KEPT_METADATA if meta.get(key) not in (None, [], "")
        }
        kept["element_id"] = str(item.id)
        parent = meta.get("parent_id")
        section = text if item.category == "Title" else titles.get(parent) if parent else None
        kept["section"] = section or last_title
        page = meta.get("page_number")
        page_number = int(page) if page else None
        elements.append(Element(text=text, category=item.category, page=page_number, metadata=kept))
    return elements


def _no_text_message(filename: str, type_name: str) -> str:
    if type_name == "PDF":
        return f"{filename}: the PDF has no extractable text (scanned? OCR is not enabled)"
    return f"{filename}: no text could be extracted from this {type_name.lower()} file"


def _classify_failure(exc: Exception, *, filename: str, path: Path) -> PermanentError:
    """Give an unexpected library exception its stable code, keeping the original message
    (with our storage path replaced by the client's file name, and cut to a sane length)."""
    from unstructured.errors import UnprocessableEntityError
    from unstructured.partition.common import UnsupportedFileFormatError

    detail = f"{type(exc).__name__}: {exc}".replace(str(path), filename)[:MAX_DETAIL_CHARS]
    if isinstance(exc, UnsupportedFileFormatError):
        return UnsupportedType(f"{filename}: {detail}")
    if isinstance(exc, UnprocessableEntityError) and "determine file encoding" in str(exc):
        return GarbageText(f"{filename}: the bytes are not text in any encoding we can detect "
                           f"(a binary file?) ({detail})")
    if isinstance(exc, UnprocessableEntityError) and "password" in str(exc).lower():
        return EncryptedDocument(f"{filename}: {detail}")
    if type(exc).__name__ in _ENCRYPTION_ERRORS:
        return EncryptedDocument(f"{filename}: {detail}")
    return CorruptDocument(f"{filename}: {detail}")
