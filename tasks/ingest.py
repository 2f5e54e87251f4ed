"""Ingest stages: parse (partition + chunk, store chunks) then embed (encode, store vectors)."""

from __future__ import annotations

from pathlib import Path

from celery import Task
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from models import Chunk, Document, DocumentStatus, Stage, documents, ledger
from pipelines.errors import EmptyDocument, PermanentError
from sluice.db import session_scope
from sluice.settings import get_settings
from tasks import names
from tasks.runner import Handoff, StageContext, run_stage
from workers import resources
from workers.app import app

EMBED_BATCH_CHUNKS = 256  # chunks encoded between two checkpoints


@app.task(name=names.PARSE_DOCUMENT, bind=True)
def parse_document(self: Task, job_id: str) -> str:
    return run_stage(job_id=job_id, stage=Stage.PARSE, worker=self.request.hostname,
                     work=_parse, on_cancel=_drop_chunks)


@app.task(name=names.EMBED_DOCUMENT, bind=True)
def embed_document(self: Task, job_id: str) -> str:
    return run_stage(job_id=job_id, stage=Stage.EMBED, worker=self.request.hostname,
                     work=_embed, on_cancel=_drop_chunks)


def _parse(ctx: StageContext) -> Handoff:
    from pipelines.chunking import chunk_elements
    from pipelines.parsing import parse_document

    settings = get_settings()
    document_id = _document_id(ctx)
    with session_scope() as session:
        doc = session.get_one(Document, document_id)
        filename, content_type, sha = doc.filename, doc.content_type, doc.sha256
        doc.status = DocumentStatus.PROCESSING
    path = resources.blob_store().path_for(ctx.workspace_id, sha)
    if not path.exists():
        raise PermanentError(f"the uploaded bytes of {filename!r} are gone from the blob store",
                             code="blob_missing")
    parsed = parse_document(
        Path(path),
        filename=filename,
        content_type=content_type,
        pdf_strategy=settings.pdf_strategy,
        languages=settings.parse_languages,
        tagger_path=resources.tagger_path(),
    )
    ctx.checkpoint(progress=0.3)
    drafts = chunk_elements(parsed.elements, max_words=settings.chunk_max_words)
    if not drafts:
        raise EmptyDocument(f"{filename!r} contains no text to index")
    ctx.checkpoint(progress=0.4)
    rows = [
        {"workspace_id": ctx.workspace_id, "document_id": document_id, "ord": d.order,
         "text": d.text, "page": d.page, "section": d.section, "meta": d.metadata}
        for d in drafts
    ]

    def persist(session: Session) -> bool:
        # Idempotent: a re-run replaces the document's chunks, never adds to them.
        session.execute(delete(Chunk).where(Chunk.document_id == document_id))
        session.execute(insert(Chunk), rows)
        session.execute(
            update(Document).where(Document.id == document_id).values(
                page_count=parsed.page_count, chunk_count=len(rows),
                content_type=parsed.content_type or content_type,
            )
        )
        return ledger.advance(session, ctx.claim, next_stage=Stage.EMBED)

    return ctx.finish(persist, then=Stage.EMBED)


def _embed(ctx: StageContext) -> Handoff:
    document_id = _document_id(ctx)
    with session_scope() as session:
        chunks = session.execute(
            select(Chunk.id, Chunk.text).where(Chunk.document_id == document_id).order_by(Chunk.ord)
        ).all()
    if not chunks:
        raise EmptyDocument("the document has no chunks to embed")
    embedder = resources.embedder()
    vectors = []
    for start in range(0, len(chunks), EMBED_BATCH_CHUNKS):
        batch = chunks[start : start + EMBED_BATCH_CHUNKS]
        vectors.extend(embedder.encode([c.text for c in batch]))
        ctx.checkpoint(progress=0.4 + 0.55 * (start + len(batch)) / len(chunks))
    rows = [
        {"id": c.id, "embedding": v, "embedding_model": embedder.model_name,
         "embedding_version": embedder.model_version}
        for c, v in zip(chunks, vectors, strict=True)
    ]

    def persist(session: Session) -> bool:
        session.execute(update(Chunk), rows)  # bulk UPDATE by primary key: overwrite, never add
        session.execute(
            update(Document).where(Document.id == document_id).values(
                status=DocumentStatus.READY, chunk_count=len(rows), error_code=None,
                error_message=None,
            )
        )
        return ledger.succeed(session, ctx.claim, result={"document_id": document_id,
                                                          "chunks": len(rows)})

    return ctx.finish(persist)


def _drop_chunks(session: Session, ctx: StageContext) -> None:
    if ctx.document_id is not None:
        documents.mark_cancelled(session, document_id=ctx.document_id)


def _document_id(ctx: StageContext) -> str:
    if ctx.document_id is None:
        raise PermanentError("ingest job has no document (it was deleted)", code="document_gone")
    return ctx.document_id
