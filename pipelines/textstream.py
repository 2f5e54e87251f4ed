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
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
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


def iter_lines(path: Path, *, encoding: str) -> Iterator[str]:
    """The file's lines (without line ends), decoded block by block; undecodable bytes become
    U+FFFD; no line is longer than ``MAX_LINE_CHARS``."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    pending = ""
    with path.open("rb") as handle:
        while True:
            block = handle.read(BLOCK_BYTES)
            pending += decoder.decode(block, final=not block)
            *lines, pending = pending.split("\n")
            for line in lines:
                yield from _cut(line.rstrip("\r"))
            if len(pending) > MAX_LINE_CHARS:
                head, pending = _split_long(pending)
                yield head
            if not block:
                break
    if pending:
        yield from _cut(pending.rstrip("\r"))


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


def chunk_file(path: Path, *, encoding: str, max_words: int) -> Iterator[ChunkDraft]:
    """The file's chunks, in order, as they are cut."""
    return chunk_text_stream(iter_lines(path, encoding=encoding), max_words=max_words)
