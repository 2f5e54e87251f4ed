"""Errors a pipeline raises, with stable codes. The task layer maps them onto the job ledger.

Every ``PermanentError`` code below is shown on the job and on the document and is never
retried (the input cannot succeed by trying again):

======================== =====================================================================
``unsupported_type``     a format we do not partition (images, audio, zip, JSON, .doc/.ppt)
``type_mismatch``        the bytes are not what the file name says, in a way we cannot use
                         (a ``.pdf`` that is an HTML page, a ``.docx`` that is a plain zip)
``empty_document``       an empty file, or a non-empty one that yields no text
``corrupt_document``     the parser fails on the file, or crashes on it (signal named)
``encrypted_document``   a password-protected PDF, Office file or e-mail
``too_large``            over a size limit (the file, or an image's pixel count)
``too_many_pages``       a PDF with more pages than the limit
``archive_bomb``         a zip container whose central directory declares too much, too many
                         entries, an absurd compression ratio, or overlapping entries
``xml_bomb``             XML that declares entities (billion laughs, quadratic blowup, XXE)
``timeout``              parsing ran past its wall-time limit
``memory_limit``         parsing ran past its memory limit
``garbage_text``         the extracted text is mostly not text (binary, replacement characters)
======================== =====================================================================
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base for errors with a stable, machine-readable code."""

    code = "pipeline_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class PermanentError(PipelineError):
    """The input can never succeed (unsupported, corrupt, encrypted, over a limit): never
    retried."""

    code = "permanent_error"


class TransientError(PipelineError):
    """A passing fault (connection, timeout): retried with backoff, then dead-lettered."""

    code = "transient_error"


class UnsupportedType(PermanentError):
    code = "unsupported_type"


class TypeMismatch(PermanentError):
    code = "type_mismatch"


class EmptyDocument(PermanentError):
    code = "empty_document"


class CorruptDocument(PermanentError):
    code = "corrupt_document"


class EncryptedDocument(PermanentError):
    code = "encrypted_document"


class TooLarge(PermanentError):
    code = "too_large"


class TooManyPages(PermanentError):
    code = "too_many_pages"


class ArchiveBomb(PermanentError):
    code = "archive_bomb"


class XmlBomb(PermanentError):
    code = "xml_bomb"


class ParseTimeout(PermanentError):
    """Over the sandbox's wall-time limit. (Celery's own soft/hard limits are a different,
    retried ``timeout``: see tasks/runner.py.)"""

    code = "timeout"


class MemoryLimitExceeded(PermanentError):
    code = "memory_limit"


class GarbageText(PermanentError):
    code = "garbage_text"


# The stable codes of the document errors above, for docs and tests.
DOCUMENT_ERROR_CODES = frozenset(
    cls.code
    for cls in (
        UnsupportedType, TypeMismatch, EmptyDocument, CorruptDocument, EncryptedDocument,
        TooLarge, TooManyPages, ArchiveBomb, XmlBomb, ParseTimeout, MemoryLimitExceeded,
        GarbageText,
    )
)
