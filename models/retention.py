"""What retention deletes from the database: finished jobs past their retention (with their
attempts and events), expired idempotency records; and which blobs documents still reference.

Each function deletes at most `limit` rows and takes a Session without committing, so the
caller runs it in short transactions until it returns less than `limit`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime

from sqlalchemy import delete, func, or_, select, tuple_
from sqlalchemy.orm import Session

from models.entities import (
    FINAL_STATES,
    Document,
    IdempotencyRecord,
    Job,
    JobAttempt,
    JobEvent,
    JobKind,
    JobState,
)


def purge_jobs(
    session: Session,
    *,
    states: Collection[JobState],
    finished_before: datetime,
    keep_live_ingest: bool,
    limit: int,
) -> int:
    """Delete up to `limit` jobs in `states` that finished before `finished_before`, with
    their attempts and events; returns how many jobs went.

    Only final states can be purged: a queued, running or retrying job is never touched, and a
    job replayed meanwhile no longer matches (the state is checked again by the DELETE).
    `keep_live_ingest` keeps the ingest job of a document that still exists: it is that
    document's status (`GET /v1/documents/{id}`) and what a duplicate upload is matched to."""
    if not states or not set(states) <= FINAL_STATES:
        raise ValueError(f"only final states can be purged, not {sorted(states)}")
    expired = [
        Job.state.in_(list(states)),
        func.coalesce(Job.finished_at, Job.updated_at) < finished_before,
    ]
    if keep_live_ingest:
        expired.append(or_(Job.kind != JobKind.INGEST, Job.document_id.is_(None)))
    candidates = list(session.scalars(select(Job.id).where(*expired).limit(limit)))
    if not candidates:
        return 0
    deleted = list(session.scalars(
        delete(Job).where(Job.id.in_(candidates), *expired).returning(Job.id)
        .execution_options(synchronize_session=False)
    ))
    if deleted:
        # The foreign keys cascade already; deleting explicitly keeps retention correct even
        # on a SQLite connection opened without `PRAGMA foreign_keys=ON`.
        session.execute(delete(JobAttempt).where(JobAttempt.job_id.in_(deleted))
                        .execution_options(synchronize_session=False))
        session.execute(delete(JobEvent).where(JobEvent.job_id.in_(deleted))
                        .execution_options(synchronize_session=False))
    return len(deleted)


def purge_idempotency_keys(session: Session, *, created_before: datetime, limit: int) -> int:
    """Delete up to `limit` stored Idempotency-Key responses older than `created_before`."""
    key = tuple_(IdempotencyRecord.workspace_id, IdempotencyRecord.key)
    expired = (
        select(IdempotencyRecord.workspace_id, IdempotencyRecord.key)
        .where(IdempotencyRecord.created_at < created_before)
        .limit(limit)
    )
    rows = [tuple(r) for r in session.execute(expired)]
    if not rows:
        return 0
    session.execute(
        delete(IdempotencyRecord)
        .where(key.in_(rows), IdempotencyRecord.created_at < created_before)
        .execution_options(synchronize_session=False)
    )
    return len(rows)


def referenced_blobs(session: Session, *, workspace_id: str, sha256s: Iterable[str]) -> set[str]:
    """Which of `sha256s` a document of `workspace_id` references."""
    wanted = list(sha256s)
    if not wanted:
        return set()
    return set(session.scalars(
        select(Document.sha256).where(Document.workspace_id == workspace_id,
                                      Document.sha256.in_(wanted))
    ))
