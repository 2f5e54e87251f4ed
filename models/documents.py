"""Document-level writes shared by the ingest stages and the reconciler."""

from __future__ import annotations

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from models.entities import Chunk, Document, DocumentStatus


def mark_failed(session: Session, *, document_id: str, code: str, message: str) -> None:
    """The document's ingest ended without success. Search shows only ready documents; chunks
    already parsed are kept so that a replay of a dead embed stage does not parse again."""
    session.execute(
        update(Document)
        .where(Document.id == document_id)
        .values(status=DocumentStatus.FAILED, error_code=code, error_message=message)
    )


def mark_cancelled(session: Session, *, document_id: str) -> None:
    """A cancelled ingest leaves no partial data."""
    session.execute(delete(Chunk).where(Chunk.document_id == document_id))
    session.execute(
        update(Document)
        .where(Document.id == document_id)
        .values(status=DocumentStatus.FAILED, error_code="cancelled",
                error_message="ingest cancelled", chunk_count=0)
    )


def mark_requeued(session: Session, *, document_id: str) -> None:
    """Its ingest job was replayed: processing again, the old error cleared."""
    session.execute(
        update(Document)
        .where(Document.id == document_id)
        .values(status=DocumentStatus.PROCESSING, error_code=None, error_message=None)
    )
