"""Large PDFs parsed in page ranges, one job per range, in parallel across parse workers.

The ingest job's parse stage calls `split_if_large` first: a PDF with more pages than
`pdf_part_pages` is not parsed there. In one transaction the ingest job becomes a parent that
waits (`models.ledger.split`) for one `ingest_part` job per page range, queued at stage parse
and held: the stage runner dispatches them after commit within the workspace's in-flight cap
(`models.fairness`; the parent's slot is free while it waits), and the reconciler dispatches
any that a killed worker did not. Each part runs `parse_part` on the parse queue, through the
same sandboxed `parse_document` as a whole document, and in one transaction stores its chunks
and succeeds, counted on its parent; the transaction whose count completes the set queues the
parent at embed, and its message is published after commit. No chord: the counter is in the
database.

A part's chunks are told apart by their `ord`: part `i` writes `i * PART_ORD_STRIDE + n`.
Document order is kept (embedding and re-embedding read chunks by `ord`), the existing
`(document_id, ord)` index finds a part's range, and the schema of chunks is unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from models import Chunk, Document, DocumentStatus, Job, documents, ledger
from pipelines.errors import PermanentError
from pipelines.pdfparts import MAX_PARTS, PageRange, count_pages, looks_like_pdf, parse_pages, plan
from sluice.db import session_scope
from sluice.logs import bind_context
from sluice.settings import get_settings
from tasks import sandboxed
from tasks.publish import publish
from tasks.runner import Handoff, JobCancelled, StageContext
from workers import resources

log = logging.getLogger(__name__)

PART_KEY: Final = "part"
"""The payload key of a part job: {document_id, index, first, last, of} (`of`: how many)."""
PART_ORD_STRIDE: Final = 1_000_000
"""Chunk `ord`s of part `i` are `i * PART_ORD_STRIDE + n`: with at most `MAX_PARTS` parts
they stay below 2**31 (a 32-bit `ord` on PostgreSQL)."""
assert MAX_PARTS * PART_ORD_STRIDE < 2**31


def is_part(ctx: StageContext) -> bool:
    return PART_KEY in ctx.payload


def split_if_large(
    ctx: StageContext, *, path: Path, filename: str, document_id: str
) -> Handoff | None:
    """Split the document being parsed into page-range parts when it is a PDF over
    `pdf_part_pages` pages; None (parse it whole) otherwise. A PDF pypdf cannot read, one
    that needs a password or one over `max_pdf_pages` is parsed whole, which refuses it with
    the proper error."""
    settings = get_settings()
    part_pages = settings.pdf_part_pages
    if part_pages is None or not looks_like_pdf(path):
        return None
    pages = sandboxed.run_parser(ctx, count_pages, {"path": path},
                        label=f"counting the pages of {filename!r}")
    if pages is None or pages <= part_pages:
        return None
    if settings.max_pdf_pages is not None and pages > settings.max_pdf_pages:
        return None
    ranges = plan(pages, part_pages=part_pages)

    def persist(session: Session) -> bool:
        part_ids = ledger.split(session, ctx.claim, held=True, parts=[
            {PART_KEY: {"document_id": document_id, "index": r.index, "first": r.first,
                        "last": r.last, "of": len(ranges)}, "label": r.label}
            for r in ranges
        ])
        if part_ids is None:
            return _not_held(session, ctx)
        session.execute(update(Document).where(Document.id == document_id).values(
            page_count=pages, status=DocumentStatus.PROCESSING))
        return True

    handoff = ctx.finish(persist)  # (held parts: the runner dispatches them)
    log.info("job %s: %r has %d pages, split into %d parts of up to %d pages",
             ctx.claim.job_id, filename, pages, len(ranges), ranges[0].last)
    return handoff


def parse_part(ctx: StageContext) -> Handoff:
    """Parse one page range of its parent's document, store its chunks and count it in."""
    from pipelines.chunking import chunk_elements

    settings = get_settings()
    spec = ctx.payload[PART_KEY]
    document_id: str = spec["document_id"]
    pages = PageRange(index=spec["index"], first=spec["first"], last=spec["last"])
    bind_context(document_id=document_id)
    with session_scope() as session:
        doc = session.get(Document, document_id)
        if doc is None:
            raise PermanentError("the part's document was deleted", code="document_gone")
        filename, content_type, sha = doc.filename, doc.content_type, doc.sha256
    path = resources.blob_store().path_for(ctx.workspace_id, sha)
    if not path.exists():
        raise PermanentError(f"the uploaded bytes of {filename!r} are gone from the blob store",
                             code="blob_missing")
    options = sandboxed.parse_options(filename=filename, content_type=content_type)
    parsed = sandboxed.run_parser(ctx, parse_pages,
                         {"path": Path(path), "first": pages.first, "last": pages.last, **options},
                         label=f"parsing {pages.label} of {filename!r}")
    ctx.checkpoint(progress=0.7)
    drafts = chunk_elements(parsed.elements, max_words=settings.chunk_max_words,
                            min_words=settings.chunk_min_words)
    if len(drafts) >= PART_ORD_STRIDE:
        raise PermanentError(f"{filename}: {pages.label} yield {len(drafts)} chunks, over "
                             f"{PART_ORD_STRIDE - 1}", code="too_large")
    base = pages.index * PART_ORD_STRIDE
    rows = [
        {"workspace_id": ctx.workspace_id, "document_id": document_id, "ord": base + d.order,
         "text": d.text, "page": d.page, "section": d.section, "meta": d.metadata}
        for d in drafts
    ]
    fan_in: list[ledger.FanIn] = []

    def persist(session: Session) -> bool:
        # The parent's row first (the ledger's lock order): nothing is written for a parent
        # that was cancelled meanwhile.
        if not ledger.parent_waits(session, ctx.claim.job_id):
            raise JobCancelled(ctx.claim.job_id)
        # Idempotent: a re-run replaces this part's chunks, never adds to them.
        session.execute(delete(Chunk).where(
            Chunk.document_id == document_id, Chunk.ord >= base,
            Chunk.ord < base + PART_ORD_STRIDE))
        documents.insert_chunks(session, rows)
        counted = ledger.succeed_part(session, ctx.claim, result={
            "document_id": document_id, "pages": [pages.first, pages.last],
            "chunks": len(rows)})
        if counted is None:
            return _not_held(session, ctx)
        fan_in.append(counted)
        return True

    handoff = ctx.finish(persist)
    counted = fan_in[0]
    log.info("job %s: %s of %r parsed into %d chunks (%d of %d parts done, %d failed)",
             ctx.claim.job_id, pages.label, filename, len(rows), counted.done, counted.total,
             counted.failed)
    if counted.released is not None:
        publish(counted.parent_id, counted.released)
    return handoff


def _not_held(session: Session, ctx: StageContext) -> bool:
    """Why a transition was refused: a cancel request (stop as cancelled) or a lost claim."""
    job = session.get(Job, ctx.claim.job_id, populate_existing=True)
    if job is not None and job.cancel_requested:
        raise JobCancelled(ctx.claim.job_id)
    return False
