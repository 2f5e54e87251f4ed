"""Document-level writes shared by the ingest stages and the reconciler."""

from __future__ import annotations

from sqlalchemy import delete, insert, update
from sqlalchemy.orm import Session

from models.entities import Chunk, Document, DocumentStatus, new_id, utcnow

# The table, not the entity: a plain Core insert, its defaults applied as the ORM's are.
_INSERT = insert(Document.__table__)


def insert_document(session: Session, *, workspace_id: str, filename: str,
                    content_type: str | None, sha256: str, size_bytes: int) -> str:
    """A new pending document's row (an upload's); returns its id. One prebuilt insert, not
    an ORM object and its flush: an upload runs it under its workspace's lock."""
    document_id, now = new_id(), utcnow()
    session.execute(_INSERT, {
        "id": document_id, "workspace_id": workspace_id, "filename": filename,
        "content_type": content_type, "sha256": sha256, "size_bytes": size_bytes,
        "status": DocumentStatus.PENDING, "created_at": now, "updated_at": now})
    return document_id


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
