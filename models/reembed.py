"""Finding chunks embedded by another model version, and switching a document's chunks to new
vectors in one transaction, so that a document is never searched with vectors of two models.

A chunk's `embedding_version` names its model (`<model name>@<weights version>`), so a
different version is a different model; comparing it as `< v OR > v OR NULL` lets the
`ix_chunks_embedding_version` index find the outdated chunks instead of reading every vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from models.entities import Chunk, Document, DocumentStatus


@dataclass(frozen=True, slots=True)
class ChunkText:
    id: int
    text: str


def _outdated(version: str) -> ColumnElement[bool]:
    return or_(Chunk.embedding_version < version, Chunk.embedding_version > version,
               Chunk.embedding_version.is_(None))


def next_outdated_document(
    session: Session, *, version: str, exclude: Sequence[str] = ()
) -> str | None:
    """A ready document with a chunk whose vector is not of `version`, or None when every
    ready document is on `version`. Documents still being ingested are left to their embed
    stage, which writes vectors of the configured model."""
    stmt = (
        select(Chunk.document_id)
        .join(Document, Document.id == Chunk.document_id)
        .where(_outdated(version), Chunk.embedding.is_not(None),
               Document.status == DocumentStatus.READY)
        .limit(1)
    )
    if exclude:
        stmt = stmt.where(Chunk.document_id.not_in(list(exclude)))
    document_id: str | None = session.scalar(stmt)
    return document_id


def count_outdated(session: Session, *, version: str) -> int:
    """Chunks of ready documents whose vectors are not of `version`."""
    return session.scalar(
        select(func.count())
        .select_from(Chunk)
        .join(Document, Document.id == Chunk.document_id)
        .where(_outdated(version), Chunk.embedding.is_not(None),
               Document.status == DocumentStatus.READY)
    ) or 0


def document_chunks(session: Session, *, document_id: str) -> list[ChunkText]:
    rows = session.execute(
        select(Chunk.id, Chunk.text).where(Chunk.document_id == document_id).order_by(Chunk.ord)
    )
    return [ChunkText(id=r.id, text=r.text) for r in rows]


def switch_document(
    session: Session,
    *,
    document_id: str,
    chunk_ids: Sequence[int],
    vectors: Sequence[np.ndarray],
    model: str,
    version: str,
) -> bool:
    """Give every chunk of a document its new vector, all in the caller's transaction
    (compare-and-set: False, and nothing written, when the document is no longer ready or its
    chunks changed since they were read, e.g. it was parsed again)."""
    doc = session.get(Document, document_id, with_for_update=True)
    if doc is None or doc.status != DocumentStatus.READY:
        return False
    current = set(session.scalars(select(Chunk.id).where(Chunk.document_id == document_id)))
    if current != set(chunk_ids):
        return False
    rows = [
        {"id": chunk_id, "embedding": vector, "embedding_model": model,
         "embedding_version": version}
        for chunk_id, vector in zip(chunk_ids, vectors, strict=True)
    ]
    if rows:
        session.execute(update(Chunk), rows)  # bulk UPDATE by primary key
    return True
