"""Plain text too large to hold in memory, decoded and chunked as a stream.

unstructured reads a text file whole and builds an element per paragraph; for a 1 GB log or
dump that is gigabytes of Python objects. Large plain text bypasses it: the bytes are decoded
block by block with an incremental decoder, cut into lines (an endless line is cut at a space
near ``MAX_LINE_CHARS``), and fed to ``chunk_text_stream``, which holds a paragraph and a few
chunks at a time. Memory is bounded by the block size, whatever the file size.

The encoding is decided once, on the first block: UTF-8 (with or without a byte-order mark)
when it decodes, else UTF-16 by its byte-order mark, else charset-normalizer's best guess.
The same first block is judged by ``pipelines.hygiene`` so binary data named ``.txt`` is
refused (``garbage_text``) before a single chunk is stored.

A file is chunked in slices: ``chunk_file(..., start=offset, should_stop=...)`` reads from a
byte offset and, once ``should_stop()`` says so, stops at the next paragraph end (a blank line;
a line end if a block holds none), flushing its last chunk; ``Slice.next_offset`` says where
the next slice starts. A slice never splits a character or a line, so the slices' chunks are
the file's chunks, except that a chunk never spans two slices.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pipelines.chunking import chunk_text_stream
from pipelines.errors import EmptyDocument
from pipelines.hygiene import DEFAULT_LIMITS, HygieneLimits, TextQuality
from pipelines.types import ChunkDraft

BLOCK_BYTES: Final = 1 << 20
SAMPLE_BYTES: Final = 1 << 20
MAX_LINE_CHARS: Final = 64 * 1024
TEXT_SUFFIXES: Final = frozenset({"", ".txt", ".text", ".log", ".asc"})


def is_plain_text(path: Path, *, filename: str) -> bool:
    """Whether the bytes are plain text (libmagic) under a plain-text name (Markdown, CSV,
    RST and friends keep their own partitioners, whatever their size)."""
    import magic

    if Path(filename).suffix.lower() not in TEXT_SUFFIXES:
        return False
    with path.open("rb") as handle:
        head = handle.read(64 * 1024)
    return bool(magic.from_buffer(head, mime=True) == "text/plain")


def detect_encoding(sample: bytes) -> str:
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
        return "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(sample[:SAMPLE_BYTES]).best()
    return best.encoding if best is not None else "latin-1"


@dataclass
class Slice:
    """Where the next slice starts: None until a slice stops early (and when the file ended)."""

    next_offset: int | None = None


def iter_lines(path: Path, *, encoding: str, start: int = 0,
               should_stop: Callable[[], bool] | None = None, slice_: Slice | None = None,
               ) -> Iterator[str]:
    """The file's lines (without line ends) from byte ``start``, decoded block by block;
    undecodable bytes become U+FFFD; no line is longer than ``MAX_LINE_CHARS``. Between two
    blocks ``should_stop()`` is asked; once true, the lines end at the next paragraph end and
    ``slice_.next_offset`` is set to the byte after it."""
    decoder = codecs.getincrementaldecoder(encoding_at(path, encoding, start))(errors="replace")
    unmarked = encoding_at(path, encoding, max(start, 1))  # the code units, without a BOM
    pending = ""
    with path.open("rb") as handle:
        handle.seek(start)
        position = start
        while True:
            block = handle.read(BLOCK_BYTES)
            stopping = False
            if block and should_stop is not None and slice_ is not None and should_stop():
                cut = paragraph_end(block, encoding=unmarked, position=position)
                if cut is not None:
                    block, stopping = block[:cut], True
                    slice_.next_offset = position + cut
            position += len(block)
            pending += decoder.decode(block, final=stopping or not block)
            *lines, pending = pending.split("\n")
            for line in lines:
                yield from _cut(line.rstrip("\r"))
            if len(pending) > MAX_LINE_CHARS:
                head, pending = _split_long(pending)
                yield head
            if stopping or not block:
                break
    if pending:
        yield from _cut(pending.rstrip("\r"))


def encoding_at(path: Path, encoding: str, start: int) -> str:
    """The codec that decodes the file from byte ``start``: past the first byte there is no
    byte-order mark to read, so UTF-16 takes the mark's byte order and UTF-8-sig is UTF-8."""
    if start == 0:
        return encoding
    if encoding == "utf-8-sig":
        return "utf-8"
    if encoding == "utf-16":
        with path.open("rb") as handle:
            return "utf-16-be" if handle.read(2) == codecs.BOM_UTF16_BE else "utf-16-le"
    return encoding


def paragraph_end(block: bytes, *, encoding: str, position: int) -> int | None:
    """The index just past the first blank line in ``block`` (a line end when it has none),
    on a code-unit boundary (``position`` is the block's offset in the file); None if
    neither is there. ``encoding`` must not write a byte-order mark (see ``encoding_at``)."""
    unit = 2 if encoding.startswith("utf-16") else 1
    for marks in (("\n\n", "\r\n\r\n"), ("\n",)):
        ends = []
        for mark in marks:
            pattern = mark.encode(encoding)
            found = block.find(pattern)
            while found != -1 and (position + found) % unit:
                found = block.find(pattern, found + 1)
            if found != -1:
                ends.append(found + len(pattern))
        if ends:
            return min(ends)
    return None


def _cut(line: str) -> Iterator[str]:
    while len(line) > MAX_LINE_CHARS:
        head, line = _split_long(line)
        yield head
    yield line


def _split_long(text: str) -> tuple[str, str]:
    cut = text.rfind(" ", MAX_LINE_CHARS // 2, MAX_LINE_CHARS)
    cut = cut if cut > 0 else MAX_LINE_CHARS
    return text[:cut], text[cut:].lstrip(" ")


def check_sample(
    path: Path, *, filename: str, encoding: str, limits: HygieneLimits = DEFAULT_LIMITS
) -> TextQuality:
    """Judge the first block as ``pipelines.hygiene`` judges parsed text."""
    from pipelines.hygiene import check_text
    from pipelines.types import Element

    with path.open("rb") as handle:
        sample = handle.read(SAMPLE_BYTES)
    text = codecs.getincrementaldecoder(encoding)(errors="replace").decode(sample)
    if not text.strip():
        raise EmptyDocument(f"{filename}: no text in its first {len(sample):,} bytes")
    return check_text([Element(text=text, category="NarrativeText")], filename=filename,
                      limits=limits)


def chunk_file(path: Path, *, encoding: str, max_words: int, start: int = 0,
               should_stop: Callable[[], bool] | None = None, slice_: Slice | None = None,
               ) -> Iterator[ChunkDraft]:
    """The file's chunks from byte ``start``, in order (``order`` from 0), as they are cut; see
    ``iter_lines`` for ``should_stop`` and ``slice_``."""
    return chunk_text_stream(iter_lines(path, encoding=encoding, start=start,
                                        should_stop=should_stop, slice_=slice_),
                             max_words=max_words)
