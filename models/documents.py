"""Document-level writes shared by the ingest stages and the reconciler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, delete, insert, update
from sqlalchemy.orm import Session

from models.entities import Chunk, Document, DocumentStatus, new_id, utcnow

# The table, not the entity: a plain Core insert, its defaults applied as the ORM's are.
_INSERT = insert(Document.__table__)
_chunks = Chunk.__table__
# Built once, Core executemany statements: the ORM's bulk insert and bulk UPDATE by primary key
# cost more Python per row than the statements cost the database (~6% of an embed worker's CPU
# on small documents).
_INSERT_CHUNKS = insert(_chunks)
_SET_EMBEDDING = (
    update(_chunks).where(_chunks.c.id == bindparam("chunk_id"))
    .values(embedding=bindparam("vector", type_=_chunks.c.embedding.type),
            embedding_model=bindparam("model"), embedding_version=bindparam("version"))
)


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


def insert_chunks(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Chunk rows, each with the same keys (`workspace_id`, `document_id`, `ord`, `text`,
    `page`, `section`, `meta`)."""
    if rows:
        session.execute(_INSERT_CHUNKS, rows)


def set_embeddings(session: Session, chunk_ids: Sequence[int], vectors: Sequence[Any], *,
                   model: str, version: str) -> None:
    """Overwrite the vectors of chunks `chunk_ids` (made by `model` at `version`)."""
    session.execute(_SET_EMBEDDING, [
        {"chunk_id": chunk_id, "vector": vector, "model": model, "version": version}
        for chunk_id, vector in zip(chunk_ids, vectors, strict=True)])


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
