"""Stage work that writes its results in batches, so no document's size sets the memory of a
worker or the length of a task.

- **Embedding** reads a document's chunks a batch at a time, encodes them, and writes each
  batch's vectors in its own short transaction (guarded by the claim: a takeover or cancel
  rolls the batch back). A retry skips chunks already embedded by this model version, so a
  failure loses one batch of work, not the document's. After ``embed_slice_s`` the stage hands
  itself back to the queue (same stage, fresh attempt) and the next delivery carries on: a
  million-chunk document never holds an embed worker for hours, and other documents' jobs
  interleave with its slices. Vectors written before the end are invisible to search: only
  ready documents are searched, and the document turns ready in the stage's last transaction.
- **Large plain text** is parsed without unstructured: decoded and chunked as a stream
  (``pipelines.textstream``), chunks inserted a batch per transaction, in slices of
  ``text_slice_s``: a slice stops at a paragraph end, and in one transaction writes its last
  chunks and the point to resume from (byte offset, chunks so far) into the job's payload, then
  hands the job back to the parse queue; the next delivery resumes there. A 1 GB file is many
  tasks of minutes, never one over the soft time limit. A retry resumes from the last slice's
  point, first deleting whatever a failed attempt inserted past it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Row, delete, func, or_, select, update
from sqlalchemy.orm import Session

from models import Chunk, Document, DocumentStatus, Job, Stage, documents, ledger
from pipelines.errors import EmptyDocument
from pipelines.hygiene import HygieneLimits
from sluice.db import read_scope, session_scope
from sluice.settings import get_settings
from tasks.runner import Handoff, StageContext
from workers import resources

EMBED_BATCH_CHUNKS: Final = 256
"""Chunks encoded and written per transaction (and between two checkpoints)."""
TEXT_INSERT_BATCH: Final = 2000
"""Chunks of a streamed text inserted per transaction."""
TEXT_RESUME_KEY: Final = "text_resume"
"""The job payload's resume point of a sliced text parse: {"offset": bytes, "chunks": n}."""


# Embedding ----------------------------------------------------------------------------------


def embed(ctx: StageContext, *, document_id: str) -> Handoff:
    settings = get_settings()
    embedder = resources.embedder()
    version = embedder.model_version
    slice_s = settings.embed_slice_s
    started = time.monotonic()
    with read_scope() as session:  # the counts and the first batch in one read transaction
        total, done = _embed_counts(session, document_id, version)
        batch = _pending_batch(session, document_id, version, after_id=0)
    if total == 0:
        raise EmptyDocument("the document has no chunks to embed")
    last: tuple[list[int], list[Any]] | None = None
    while batch:
        ids, vectors = [c.id for c in batch], list(embedder.encode([c.text for c in batch]))
        done += len(batch)
        if len(batch) < EMBED_BATCH_CHUNKS:  # the last batch: written with the outcome
            last = ids, vectors
            break
        with session_scope() as session:
            ctx.guard(session)
            documents.set_embeddings(session, ids, vectors, model=embedder.model_name,
                                     version=version)
        ctx.checkpoint(progress=0.4 + 0.55 * done / total)
        if time.monotonic() - started > slice_s:
            return ctx.finish(
                lambda session: ledger.advance(session, ctx.claim, next_stage=Stage.EMBED),
                then=Stage.EMBED,
            )
        with read_scope() as session:
            batch = _pending_batch(session, document_id, version, after_id=ids[-1])

    def persist(session: Session) -> bool:
        if last is not None:
            documents.set_embeddings(session, *last, model=embedder.model_name,
                                     version=version)
        session.execute(
            update(Document).where(Document.id == document_id).values(
                status=DocumentStatus.READY, chunk_count=total, error_code=None,
                error_message=None,
            ).execution_options(synchronize_session=False)
        )
        return ledger.succeed(session, ctx.claim, result={"document_id": document_id,
                                                          "chunks": total})

    return ctx.finish(persist)


def _needs_embedding(version: str) -> Any:
    return or_(Chunk.embedding.is_(None), Chunk.embedding_version.is_(None),
               Chunk.embedding_version != version)


def _pending_batch(session: Session, document_id: str, version: str, *, after_id: int
                   ) -> Sequence[Row[tuple[int, str]]]:
    """The next chunks (id, text) after `after_id` that `version` has not embedded."""
    return session.execute(
        select(Chunk.id, Chunk.text)
        .where(Chunk.document_id == document_id, Chunk.id > after_id, _needs_embedding(version))
        .order_by(Chunk.id).limit(EMBED_BATCH_CHUNKS)
    ).all()


def _embed_counts(session: Session, document_id: str, version: str) -> tuple[int, int]:
    """(chunks of the document, chunks already embedded by `version`), in one statement."""
    total, pending = session.execute(
        select(func.count(), func.count().filter(_needs_embedding(version)))
        .select_from(Chunk).where(Chunk.document_id == document_id)).one()
    return int(total), int(total) - int(pending)


# Large plain text -------------------------------------------------------------------------------


def parse_large_text(
    ctx: StageContext, *, path: Path, filename: str, document_id: str,
    hygiene_limits: HygieneLimits,
) -> Handoff | None:
    """Parse a plain-text file above the streaming threshold as a stream; None for anything
    else (the regular parse handles it)."""
    from pipelines import textstream

    settings = get_settings()
    size = path.stat().st_size
    if size < settings.stream_text_over_bytes or not textstream.is_plain_text(
            path, filename=filename):
        return None
    with path.open("rb") as handle:
        encoding = textstream.detect_encoding(handle.read(textstream.SAMPLE_BYTES))
    resume = ctx.payload.get(TEXT_RESUME_KEY) or {"offset": 0, "chunks": 0}
    start, count = int(resume["offset"]), int(resume["chunks"])
    if start == 0:
        textstream.check_sample(path, filename=filename, encoding=encoding,
                                limits=hygiene_limits)
    with session_scope() as session:  # whatever an attempt inserted past the resume point
        ctx.guard(session)
        session.execute(delete(Chunk).where(Chunk.document_id == document_id,
                                            Chunk.ord >= count))

    deadline = time.monotonic() + settings.text_slice_s
    slice_ = textstream.Slice()
    rows: list[dict[str, Any]] = []
    for draft in textstream.chunk_file(path, encoding=encoding, start=start,
                                       max_words=settings.chunk_max_words,
                                       should_stop=lambda: time.monotonic() > deadline,
                                       slice_=slice_):
        rows.append({"workspace_id": ctx.workspace_id, "document_id": document_id,
                     "ord": count, "text": draft.text, "page": None, "section": None,
                     "meta": draft.metadata})
        count += 1
        if len(rows) == TEXT_INSERT_BATCH:
            with session_scope() as session:
                ctx.guard(session)
                documents.insert_chunks(session, rows)
            rows = []
            read = slice_.next_offset or start  # (an estimate until the slice ends)
            ctx.checkpoint(progress=min(0.39, 0.4 * read / size))
    final_rows = rows
    if slice_.next_offset is not None:  # more to read: the next delivery goes on from here
        point = {"offset": slice_.next_offset, "chunks": count}

        def hand_back(session: Session) -> bool:
            documents.insert_chunks(session, final_rows)
            session.execute(update(Job).where(Job.id == ctx.claim.job_id).values(
                payload={**ctx.payload, TEXT_RESUME_KEY: point},
                progress=min(0.39, 0.4 * point["offset"] / size)))
            return ledger.advance(session, ctx.claim, next_stage=Stage.PARSE)

        return ctx.finish(hand_back, then=Stage.PARSE)
    if count == 0:
        raise EmptyDocument(f"{filename!r} contains no text to index")

    def persist(session: Session) -> bool:
        documents.insert_chunks(session, final_rows)
        session.execute(
            update(Document).where(Document.id == document_id).values(
                chunk_count=count, content_type=f"text/plain; charset={encoding}",
            )
        )
        payload = {k: v for k, v in ctx.payload.items() if k != TEXT_RESUME_KEY}
        session.execute(update(Job).where(Job.id == ctx.claim.job_id).values(payload=payload))
        return ledger.advance(session, ctx.claim, next_stage=Stage.EMBED)

    return ctx.finish(persist, then=Stage.EMBED)
