"""Document-level writes shared by the ingest stages and the reconciler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, insert, update
from sqlalchemy.orm import Session

from models.entities import Chunk, Document, DocumentStatus, new_id, utcnow

# The table, not the entity: a plain Core insert, its defaults applied as the ORM's are.
_INSERT = insert(Document.__table__)


@dataclass(frozen=True, slots=True)
class NewDocument:
    workspace_id: str
    filename: str
    content_type: str | None
    sha256: str
    size_bytes: int
    id: str = field(default_factory=new_id)


def insert_documents(session: Session, docs: Sequence[NewDocument]) -> None:
    """New pending documents' rows (uploads', recorded in batches). One
    prebuilt insert (an `executemany`), not ORM objects and their flush: an upload runs it
    under its workspace's lock."""
    if not docs:
        return
    now = utcnow()
    rows = [{"id": d.id, "workspace_id": d.workspace_id, "filename": d.filename,
             "content_type": d.content_type, "sha256": d.sha256, "size_bytes": d.size_bytes,
             "status": DocumentStatus.PENDING, "created_at": now, "updated_at": now}
            for d in docs]
    session.execute(_INSERT, rows)


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
