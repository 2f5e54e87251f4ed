"""Document-level writes shared by the ingest stages and the reconciler."""

from __future__ import annotations

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from models.entities import Chunk, Document, DocumentStatus


def mark_failed(session: Session, *, document_id: str, code: str, message: str) -> None:
    """The document's ingest ended without success: drop any partial chunks, keep the error."""
    session.execute(delete(Chunk).where(Chunk.document_id == document_id))
    session.execute(
        update(Document)
        .where(Document.id == document_id)
        .values(status=DocumentStatus.FAILED, error_code=code, error_message=message,
                chunk_count=0)
    )
