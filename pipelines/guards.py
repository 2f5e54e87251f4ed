"""Defences run on a file's bytes before any parser opens it.

Each check reads only what it needs and decompresses nothing it has not bounded first:

- **Zip containers** (docx, pptx, xlsx, epub, odt, plain zip, and anything with a zip
  directory at its end) are judged from the central directory alone: entry count, duplicate
  names, overlapping entries (the local headers, read for their lengths, must not overlap one
  another's data: the "zbsm" technique of one compressed kernel referenced by every entry),
  total and per-entry declared size, compression ratio per entry and overall → ``archive_bomb``.
  Only then are the entries that look like XML opened, and only their prologs are streamed
  (at most ``max_xml_prolog_bytes`` each) to look for entity declarations.
- **XML** (a file, or a part inside a zip, whose first character is ``<``): the prolog — the
  only place a DOCTYPE can be — is fed to expat until the root element starts. Any entity
  declaration (billion laughs, quadratic blowup, external entities / XXE, parameter entities)
  → ``xml_bomb``. A DOCTYPE that only names an external DTD (XHTML, EPUB) or declares elements
  is fine: no parser we use fetches DTDs. Markup expat cannot read (HTML) falls back to a byte
  scan of the head for ``<!ENTITY`` after a ``<!DOCTYPE``.
- **Images** (PNG, JPEG, GIF, TIFF, BMP, WebP...): the pixel count from the header (Pillow's
  lazy ``Image.open`` decodes nothing) → ``too_large`` over ``max_image_pixels``.
- **PDF pages**: ``check_pdf_pages`` takes the page count the parser's pypdf probe already read
  (``/Count``, nothing rendered) → ``too_many_pages``.

``GuardStats`` counts the bytes read from the file and inflated from archive entries, so tests
can show that a bomb is refused from its directory alone.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Protocol, cast
from xml.parsers import expat

from pipelines.errors import ArchiveBomb, TooLarge, TooManyPages, XmlBomb

HEAD_BYTES: Final = 8192
_ZIP_LOCAL_HEADER: Final = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_ZIP_LOCAL_MAGIC: Final = b"PK\x03\x04"
_XML_CHUNK: Final = 4096
_BOMS: Final = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
_IMAGE_MAGIC: Final = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
    b"BM", b"8BPS", b"\x00\x00\x01\x00",
)
# "<!entity" after a "<!doctype" (lower-cased), in the encodings a markup head can be in.
_DECLARATION_WORDS: Final = tuple(
    ("<!doctype".encode(enc), "<!entity".encode(enc))
    for enc in ("ascii", "utf-16-le", "utf-16-be")
)
_ZIP_READ_ERRORS: Final = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError)


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """Limits on what a parser may be handed. ``None`` turns a size limit off."""

    max_file_bytes: int | None = None
    max_archive_bytes: int = 1 << 30  # total declared uncompressed size of a zip
    max_archive_entries: int = 10_000
    max_compression_ratio: float = 100.0
    ratio_grace_bytes: int = 1 << 20  # entries (and archives) smaller than this: no ratio test
    max_xml_prolog_bytes: int = 1 << 20  # per XML document or part: where a DOCTYPE can be
    max_xml_prolog_total_bytes: int = 16 << 20  # over all the parts of one archive
    max_image_pixels: int = 89_478_485  # Pillow's own default warning threshold
    max_pdf_pages: int | None = 2000


DEFAULT_LIMITS: Final = GuardLimits()


@dataclass(slots=True)
class GuardStats:
    """Bytes the guards read from the file, and inflated from archive entries."""

    bytes_read: int = 0
    bytes_inflated: int = 0


def check_file(
    path: Path,
    *,
    filename: str,
    limits: GuardLimits = DEFAULT_LIMITS,
    stats: GuardStats | None = None,
) -> None:
    """Raise ``TooLarge``, ``ArchiveBomb`` or ``XmlBomb`` if the file must not be parsed.
    ``filename`` (the client's name) is used in messages; ``path`` is never shown."""
    stats = stats if stats is not None else GuardStats()
    size = path.stat().st_size
    if limits.max_file_bytes is not None and size > limits.max_file_bytes:
        raise TooLarge(
            f"{filename}: {_mib(size)} is over the limit of {_mib(limits.max_file_bytes)}"
        )
    with path.open("rb") as raw:
        handle = cast(IO[bytes], _CountingReader(raw, stats))
        head = handle.read(HEAD_BYTES)
        handle.seek(0)
        if _is_zip(handle, head):
            check_archive(handle, filename=filename, limits=limits, stats=stats)
        elif _looks_like_markup(head):
            handle.seek(0)
            check_xml(_chunks(handle), what=filename, limits=limits)
        elif head.startswith(_IMAGE_MAGIC) or head[8:12] == b"WEBP":
            handle.seek(0)
            check_image(handle, filename=filename, limits=limits)


def check_pdf_pages(page_count: int | None, *, filename: str, limits: GuardLimits) -> None:
    limit = limits.max_pdf_pages
    if page_count is not None and limit is not None and page_count > limit:
        raise TooManyPages(f"{filename}: {page_count:,} pages is over the limit of {limit:,}")


# --- zip ---------------------------------------------------------------------------------


def check_archive(
    handle: IO[bytes], *, filename: str, limits: GuardLimits, stats: GuardStats
) -> None:
    """Judge a zip from its central directory, then check its XML parts' prologs."""
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return  # not readable as a zip: the parser will say it is corrupt
    with archive:
        infos = archive.infolist()
        _check_directory(infos, handle, filename=filename, limits=limits)
        _check_xml_parts(archive, infos, filename=filename, limits=limits, stats=stats)


def _check_directory(
    infos: list[zipfile.ZipInfo], handle: IO[bytes], *, filename: str, limits: GuardLimits
) -> None:
    bomb = f"{filename}: refused as a zip bomb:"
    if len(infos) > limits.max_archive_entries:
        raise ArchiveBomb(
            f"{bomb} {len(infos):,} entries (limit {limits.max_archive_entries:,})"
        )
    names: set[str] = set()
    for info in infos:
        if info.filename in names:
            raise ArchiveBomb(f"{bomb} the entry {info.filename!r} appears more than once")
        names.add(info.filename)
    _check_overlaps(infos, handle, bomb=bomb)
    total = sum(i.file_size for i in infos)
    if total > limits.max_archive_bytes:
        raise ArchiveBomb(
            f"{bomb} its entries declare {_mib(total)} uncompressed "
            f"(limit {_mib(limits.max_archive_bytes)})"
        )
    for info in infos:
        ratio = _ratio(info.file_size, info.compress_size)
        if info.file_size > limits.ratio_grace_bytes and ratio > limits.max_compression_ratio:
            raise ArchiveBomb(
                f"{bomb} {info.filename!r} inflates {ratio:,.0f}:1 ({_mib(info.compress_size)} → "
                f"{_mib(info.file_size)}; limit {limits.max_compression_ratio:g}:1)"
            )
    compressed = sum(i.compress_size for i in infos)
    ratio = _ratio(total, compressed)
    if total > limits.ratio_grace_bytes and ratio > limits.max_compression_ratio:
        raise ArchiveBomb(
            f"{bomb} it inflates {ratio:,.0f}:1 overall (limit {limits.max_compression_ratio:g}:1)"
        )


def _check_overlaps(infos: list[zipfile.ZipInfo], handle: IO[bytes], *, bomb: str) -> None:
    """Each entry's local header + data must end before the next entry begins. The local
    header is read (30 bytes + its name/extra lengths) for its true length; nothing inflates."""
    spans = []
    for info in infos:
        start = info.header_offset
        header = _local_header_length(handle, start)
        if header is None:
            header = _ZIP_LOCAL_HEADER.size + len(info.orig_filename.encode("utf-8", "replace"))
        spans.append((start, start + header + info.compress_size, info.filename))
    spans.sort()
    for (_, end, name), (next_start, _, next_name) in zip(spans, spans[1:], strict=False):
        if next_start < end:
            raise ArchiveBomb(
                f"{bomb} entries overlap ({next_name!r} starts inside {name!r}): "
                f"one compressed block is shared by several entries"
            )


def _local_header_length(handle: IO[bytes], offset: int) -> int | None:
    try:
        handle.seek(offset)
        raw = handle.read(_ZIP_LOCAL_HEADER.size)
    except (OSError, ValueError):
        return None
    if len(raw) != _ZIP_LOCAL_HEADER.size:
        return None
    fields = _ZIP_LOCAL_HEADER.unpack(raw)
    if fields[0] != _ZIP_LOCAL_MAGIC:
        return None
    name_length, extra_length = fields[9], fields[10]
    return int(_ZIP_LOCAL_HEADER.size + name_length + extra_length)


def _check_xml_parts(
    archive: zipfile.ZipFile,
    infos: list[zipfile.ZipInfo],
    *,
    filename: str,
    limits: GuardLimits,
    stats: GuardStats,
) -> None:
    """Stream the prolog of every entry that starts like markup; bounded per part and in all."""
    budget = limits.max_xml_prolog_total_bytes
    for info in infos:
        if info.is_dir() or info.file_size == 0:
            continue
        try:
            entry = archive.open(info)
        except (RuntimeError, NotImplementedError, zipfile.BadZipFile, OSError, ValueError):
            continue  # encrypted, unknown method, bad header: for the parser to judge
        with entry:
            reader = _InflateCounter(entry, stats)
            try:
                first = reader.read(_XML_CHUNK)
            except _ZIP_READ_ERRORS:
                continue  # zlib error, CRC: the parser will call it corrupt
            if not _looks_like_markup(first):
                continue
            with contextlib.suppress(*_ZIP_READ_ERRORS):
                used = check_xml(
                    _chunks(reader, first=first), what=f"{filename}: part {info.filename!r}",
                    limits=limits,
                )
                budget -= used
        if budget < 0:
            raise XmlBomb(
                f"{filename}: the XML prologs of its parts add up to more than "
                f"{_mib(limits.max_xml_prolog_total_bytes)}"
            )


def _is_zip(handle: IO[bytes], head: bytes) -> bool:
    if head.startswith(_ZIP_LOCAL_MAGIC):
        return True
    try:
        return zipfile.is_zipfile(handle)  # an end-of-directory record near the end
    finally:
        handle.seek(0)


def _ratio(uncompressed: int, compressed: int) -> float:
    if uncompressed == 0:
        return 0.0
    return uncompressed / compressed if compressed > 0 else float("inf")


# --- XML ---------------------------------------------------------------------------------


class _RootReached(Exception):
    pass


class _EntityDeclared(Exception):
    def __init__(self, name: str, *, external: bool, parameter: bool) -> None:
        super().__init__(name)
        self.name, self.external, self.parameter = name, external, parameter


def check_xml(chunks: Iterator[bytes], *, what: str, limits: GuardLimits) -> int:
    """Raise ``XmlBomb`` if the XML prolog in ``chunks`` declares an entity; returns the bytes
    consumed. Stops at the root element (no DOCTYPE can follow) or at the cap."""
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def on_entity(name: str, is_parameter: int, _value: str | None, _base: str | None,
                  system_id: str | None, public_id: str | None, _notation: str | None) -> None:
        external = system_id is not None or public_id is not None
        raise _EntityDeclared(name, external=external, parameter=bool(is_parameter))

    def on_start(*_: object) -> None:
        raise _RootReached

    parser.EntityDeclHandler = on_entity
    parser.StartElementHandler = on_start
    consumed = 0
    head = bytearray()
    for chunk in chunks:
        consumed += len(chunk)
        if len(head) < limits.max_xml_prolog_bytes:
            head += chunk
        try:
            parser.Parse(chunk, False)
        except _RootReached:
            return consumed
        except _EntityDeclared as declared:
            raise XmlBomb(_entity_message(what, declared)) from None
        except expat.ExpatError:
            # Not well-formed (HTML, an encoding expat lacks): look for the words instead.
            consumed += _scan_head(chunks, head, what=what, limits=limits)
            return consumed
        if consumed > limits.max_xml_prolog_bytes:
            raise XmlBomb(
                f"{what}: no root element within the first {_mib(limits.max_xml_prolog_bytes)} "
                "(an oversized DOCTYPE or prolog)"
            )
    return consumed


def _scan_head(chunks: Iterator[bytes], head: bytearray, *, what: str, limits: GuardLimits) -> int:
    more = 0
    for chunk in chunks:
        if len(head) >= limits.max_xml_prolog_bytes:
            break
        head += chunk
        more += len(chunk)
    window = bytes(head[: limits.max_xml_prolog_bytes]).lower()
    for doctype, entity in _DECLARATION_WORDS:
        start = window.find(doctype)
        if start < 0 or window.find(entity, start) < 0:
            continue
        raise XmlBomb(f"{what}: its DOCTYPE declares entities (<!ENTITY); entity declarations "
                      "are refused (entity expansion and external entity attacks)")
    return more


def _entity_message(what: str, declared: _EntityDeclared) -> str:
    if declared.external:
        kind = "an external entity (XXE: it would read a file or URL)"
    elif declared.parameter:
        kind = "a parameter entity"
    else:
        kind = "an entity (entity expansion: billion laughs, quadratic blowup)"
    return (f"{what}: its DOCTYPE declares {kind}, {declared.name!r}; XML entity declarations "
            "are refused")


def _looks_like_markup(head: bytes) -> bool:
    for bom in _BOMS:
        if head.startswith(bom):
            head = head[len(bom):]
            break
    stripped = head.lstrip(b" \t\r\n\x00")
    return stripped.startswith(b"<")


def _chunks(handle: _Reader, *, first: bytes = b"") -> Iterator[bytes]:
    if first:
        yield first
    while chunk := handle.read(_XML_CHUNK):
        yield chunk


# --- images ------------------------------------------------------------------------------


def check_image(handle: IO[bytes], *, filename: str, limits: GuardLimits) -> None:
    """``TooLarge`` when the header declares more pixels than the limit (nothing decoded)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(handle) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:
            raise TooLarge(f"{filename}: the image is a decompression bomb ({exc})") from None
        except Exception:  # noqa: BLE001 - not an image Pillow knows: other checks decide
            return
    if width * height > limits.max_image_pixels:
        raise TooLarge(
            f"{filename}: the image is {width:,} × {height:,} = {width * height:,} pixels "
            f"(limit {limits.max_image_pixels:,}): a decompression bomb"
        )


# --- helpers -----------------------------------------------------------------------------


def _mib(size: int) -> str:
    if size < 1 << 20:
        return f"{size:,} bytes"
    return f"{size / 2**20:,.1f} MiB"


class _CountingReader:
    """A read/seek/tell file wrapper counting the bytes read (zipfile needs seek/tell)."""

    def __init__(self, raw: IO[bytes], stats: GuardStats) -> None:
        self._raw, self._stats = raw, stats

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._stats.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


class _InflateCounter:
    def __init__(self, entry: IO[bytes], stats: GuardStats) -> None:
        self._entry, self._stats = entry, stats

    def read(self, size: int = -1) -> bytes:
        data = self._entry.read(size)
        self._stats.bytes_inflated += len(data)
        return data
