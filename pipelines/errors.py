"""Errors a pipeline raises, with stable codes. The task layer maps them onto the job ledger."""

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


class EmptyDocument(PermanentError):
    code = "empty_document"


class CorruptDocument(PermanentError):
    code = "corrupt_document"


class EncryptedDocument(PermanentError):
    code = "encrypted_document"
