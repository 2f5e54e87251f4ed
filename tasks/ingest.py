"""Ingest stages: parse (partition + chunk, store chunks) then embed (encode, store vectors)."""

from __future__ import annotations

from pathlib import Path

from celery import Task
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from models import Chunk, Document, DocumentStatus, Stage, documents, ledger
from pipelines.errors import EmptyDocument, PermanentError
from sluice.db import session_scope
from sluice.settings import get_settings
from tasks import batches, names, parts, sandboxed
from tasks.runner import Handoff, StageContext, run_stage
from workers import resources
from workers.app import app


@app.task(name=names.PARSE_DOCUMENT, bind=True)
def parse_document(self: Task, job_id: str) -> str:
    return run_stage(job_id=job_id, stage=Stage.PARSE, worker=self.request.hostname,
                     work=_parse, on_cancel=_drop_chunks)


@app.task(name=names.EMBED_DOCUMENT, bind=True)
def embed_document(self: Task, job_id: str) -> str:
    return run_stage(job_id=job_id, stage=Stage.EMBED, worker=self.request.hostname,
                     work=_embed, on_cancel=_drop_chunks)


def _parse(ctx: StageContext) -> Handoff:
    if parts.is_part(ctx):  # one page range of a large PDF (tasks.parts)
        return parts.parse_part(ctx)
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
    streamed = batches.parse_large_text(ctx, path=Path(path), filename=filename,
                                        document_id=document_id,
                                        hygiene_limits=sandboxed.hygiene_limits())
    if streamed is not None:  # large plain text: decoded and chunked as a stream
        return streamed
    split = parts.split_if_large(ctx, path=Path(path), filename=filename,
                                 document_id=document_id)
    if split is not None:  # a large PDF: its page ranges are parsed as jobs of their own
        return split
    parsed = sandboxed.run_parser(
        ctx, parse_document,
        {"path": Path(path), **sandboxed.parse_options(filename=filename,
                                                        content_type=content_type)},
        label=f"parsing {filename!r}")
    ctx.checkpoint(progress=0.3)
    drafts = chunk_elements(parsed.elements, max_words=settings.chunk_max_words,
                            min_words=settings.chunk_min_words)
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
        documents.insert_chunks(session, rows)
        session.execute(
            update(Document).where(Document.id == document_id).values(
                page_count=parsed.page_count, chunk_count=len(rows),
                content_type=parsed.content_type or content_type,
            ).execution_options(synchronize_session=False)
        )
        return ledger.advance(session, ctx.claim, next_stage=Stage.EMBED)

    return ctx.finish(persist, then=Stage.EMBED)


def _embed(ctx: StageContext) -> Handoff:
    return batches.embed(ctx, document_id=_document_id(ctx))


def _drop_chunks(session: Session, ctx: StageContext) -> None:
    if ctx.document_id is not None:
        documents.mark_cancelled(session, document_id=ctx.document_id)


def _document_id(ctx: StageContext) -> str:
    if ctx.document_id is None:
        raise PermanentError("ingest job has no document (it was deleted)", code="document_gone")
    return ctx.document_id
